"""What `histoshield data inspect` reports: counts per class, subtype, magnification, patients."""

from __future__ import annotations

from collections import Counter
from typing import Any

from histoshield.data.breakhis import SUBTYPES
from histoshield.data.records import ImageSet


def inspect_imageset(imageset: ImageSet) -> dict[str, Any]:
    """JSON-able counts: layout, n_images, classes, patients, magnifications, subtypes, problems."""
    recs = imageset.records
    classes = Counter(r.label for r in recs)
    mags = Counter(r.magnification for r in recs if r.magnification is not None)
    subs = Counter(r.subtype for r in recs if r.subtype)
    return {
        "layout": imageset.layout,
        "root": str(imageset.root),
        "n_images": len(recs),
        "classes": {c: classes[c] for c in sorted(classes)},
        "patients": {
            c: len({r.patient for r in recs if r.label == c and r.patient}) for c in sorted(classes)
        },
        "magnifications": {str(m): mags[m] for m in sorted(mags)},
        "subtypes": {s: subs[s] for s in sorted(subs, key=_subtype_order)},
        "problems": list(imageset.problems),
    }


def _subtype_order(s: str) -> tuple[int, str]:
    codes = list(SUBTYPES)
    return (codes.index(s), s) if s in codes else (len(codes), s)


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of an `inspect_imageset` result."""
    lines = [f"{info['root']}  (layout: {info['layout']}, {info['n_images']} images)", ""]
    width = max([len(c) for c in info["classes"]] + [5])
    lines.append(f"  {'class':<{width}}  {'images':>7}  {'patients':>8}")
    for c, k in info["classes"].items():
        p = info["patients"].get(c, 0)
        lines.append(f"  {c:<{width}}  {k:>7}  {p if p else '-':>8}")
    if info["subtypes"]:
        lines += [
            "",
            "  subtypes:      " + ", ".join(f"{s} {k}" for s, k in info["subtypes"].items()),
        ]
    if info["magnifications"]:
        lines.append(
            "  magnification: " + ", ".join(f"{m}X {k}" for m, k in info["magnifications"].items())
        )
    probs = info["problems"]
    lines += ["", f"  problems: {len(probs) if probs else 'none'}"]
    lines += [f"    - {p}" for p in probs]
    return "\n".join(lines)
