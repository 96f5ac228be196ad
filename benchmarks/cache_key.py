"""Cost of keying the decode cache on file content: hashing vs decoding, per image.

`load_arrays` hashes every file (SHA-256) to build its cache key, on every call, hit or
miss, so content replaced with the same size and mtime is never served stale. This measures
that cost against what the cache saves (decoding + resizing), and against the alternatives
(zlib.crc32, BLAKE2b-128), on real images. Files are read once first so every side reads from the
page cache (a cold read costs the same for hashing and decoding, which both read the file).

    python benchmarks/cache_key.py                                 # ../shared tiles + full size
    python benchmarks/cache_key.py --data DIR --size 224 --limit 200 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from histoshield.data import load_arrays, load_imageset
from histoshield.data.images import content_digest, read_rgb
from histoshield.runtime import environment, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOSHIELD_SHARED", REPO.parent / "shared")) / "data"
DEFAULT_DATA = [str(SHARED / "breakhis-tiles"), str(SHARED / "breakhis")]


def _read(p: Path) -> bytes:
    return p.read_bytes()


def _crc32(p: Path) -> int:
    return zlib.crc32(p.read_bytes())


def _blake2b(p: Path) -> bytes:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).digest()


def _per_image(fn: Callable[[Path], object], paths: list[Path], repeats: int) -> float:
    """Best-of-`repeats` seconds per image of `fn` over all `paths`."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t)
    return best / len(paths)


def bench(data: str, size: int, limit: int | None, repeats: int) -> dict:
    """Per-image ms of reading, each hash, and decoding at `size` px, for one data set."""
    ims = load_imageset(data)
    paths = [r.path for r in ims.records][:limit]
    for p in paths:  # warm the page cache for every side alike
        p.read_bytes()
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    mp = sum(read_rgb(p).shape[0] * read_rgb(p).shape[1] for p in paths[:5]) / min(5, len(paths))
    sides = {
        "read bytes": _read,
        "sha256 (used)": content_digest,
        "blake2b-128": _blake2b,
        "zlib.crc32": _crc32,
        f"decode+resize {size}px": lambda p: read_rgb(p, size),
    }
    ms = {k: 1e3 * _per_image(fn, paths, repeats) for k, fn in sides.items()}
    decode = ms[f"decode+resize {size}px"]
    records = [r for r in ims.records if r.path in set(paths)]
    with tempfile.TemporaryDirectory() as cache:  # end to end, with load_arrays' threads
        t = time.perf_counter()
        load_arrays(records, size, cache_dir=cache, progress=False)
        ms["load_arrays, cache miss"] = 1e3 * (time.perf_counter() - t) / len(records)
        hit = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            load_arrays(records, size, cache_dir=cache, progress=False)
            hit = min(hit, time.perf_counter() - t)
        ms["load_arrays, cache hit"] = 1e3 * hit / len(records)
    return {
        "data": data,
        "n": len(paths),
        "mean_file_mb": round(mb, 3),
        "mean_megapixels": round(mp / 1e6, 3),
        "size": size,
        "repeats": repeats,
        "ms_per_image": {k: round(v, 4) for k, v in ms.items()},
        "hash_vs_decode": round(ms["sha256 (used)"] / decode, 4),
    }


def main() -> None:
    """Parse arguments, measure every data set, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=DEFAULT_DATA, help="data sets to read")
    ap.add_argument("--size", type=int, default=224, help="decode size (the cache's unit)")
    ap.add_argument("--limit", type=int, default=200, help="images per data set")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (best kept)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_key.json"))
    args = ap.parse_args()
    rows = [bench(d, args.size, args.limit, args.repeats) for d in args.data]
    for r in rows:
        print(f"{r['data']}: {r['n']} images, {r['mean_file_mb']:.3f} MB and "
              f"{r['mean_megapixels']:.2f} MP each, best of {r['repeats']}")  # fmt: skip
        head = f"  {'per image':<26}{'ms':>10}{'x decode':>10}"
        print(head)
        decode = r["ms_per_image"][f"decode+resize {r['size']}px"]
        for k, v in r["ms_per_image"].items():
            print(f"  {k:<26}{v:>10.3f}{v / decode:>10.3f}")
    write_json(args.out, {"results": rows, "env": environment("cpu")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
