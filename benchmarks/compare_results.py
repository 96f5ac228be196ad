"""Compare every number two study results.json files share (before/after a refactor).

    python benchmarks/compare_results.py RUN_BEFORE RUN_AFTER

Timings, the environment and the config text are skipped; rows of curves/transfer/sanity are
matched by their keys, so a reordering is not a difference. Exit status 1 when any value differs
or is missing after.
"""

import json
import sys

VOLATILE = {
    "seconds",
    "train_seconds",
    "wall_seconds",
    "timings",
    "total_seconds",
    "env",
    "time",
    "config",
    "images_per_second",
    "name",
}
KEYS = {
    "curves": ("model", "attack", "eps"),
    "transfer": ("target", "attack", "eps"),
    "sanity": ("model", "attack", "check"),
}


def walk(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k in VOLATILE:
                continue
            if k not in b:
                out["missing"].append(f"{path}.{k}")
                continue
            if k in KEYS and isinstance(a[k], list):
                kb = {tuple(r.get(x) for x in KEYS[k]): r for r in b[k]}
                for r in a[k]:
                    key = tuple(r.get(x) for x in KEYS[k])
                    if key not in kb:
                        out["missing"].append(f"{path}.{k}{key}")
                    else:
                        walk(r, kb[key], f"{path}.{k}{key}", out)
                continue
            walk(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            walk(x, y, f"{path}[{i}]", out)
    else:
        out["compared"] += 1
        if a != b:
            out["diff"].append(f"{path}: {a!r} -> {b!r}")


def main(argv: list[str]) -> int:
    """Print how many shared values were compared and which differ; 1 when any does."""
    before, after = (json.load(open(f"{p}/results.json")) for p in argv[:2])
    out = {"compared": 0, "diff": [], "missing": []}
    walk(before, after, "", out)
    print(
        f"{out['compared']} shared values compared, {len(out['diff'])} differ, "
        f"{len(out['missing'])} missing after"
    )
    for line in out["diff"][:40] + out["missing"][:40]:
        print(" ", line)
    return 1 if out["diff"] or out["missing"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:3]))
