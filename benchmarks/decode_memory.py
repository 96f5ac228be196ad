"""Peak memory of decoding one image, per megapixel: what the pixel limit protects against.

Each measurement runs `read_rgb` in a fresh Python process (Linux): after the imports the
peak resident set (VmHWM) is reset to the current one, and the growth of the peak over that
baseline is what decoding needed. RGB and RGBA PNGs (RGBA is composited onto white, so it
needs extra copies) are decoded at full size (`read_rgb(path)`), at 224 px (what
`load_arrays` does: PIL decodes the full image, then it is reduced) and at 64 px (how
`data inspect` and `--skip-bad` check that every file decodes).

    python benchmarks/decode_memory.py                     # 4, 16 and 36 MP
    python benchmarks/decode_memory.py --megapixels 4 16 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from histoshield.data.images import CHECK_SIZE
from histoshield.runtime import environment, write_json

_CHILD = """
import json, sys
from pathlib import Path
from histoshield.data.images import read_rgb

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB

path, size = Path(sys.argv[1]), (int(sys.argv[2]) or None)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
base = status("VmRSS")
arr = read_rgb(path, size)
print(json.dumps({"peak_growth_mb": status("VmHWM") - base, "shape": list(arr.shape)}))
"""


def _image(folder: Path, megapixels: float, mode: str) -> Path:
    """A square PNG of about `megapixels` MP with tissue-like smooth structure plus noise."""
    side = int(round((megapixels * 1e6) ** 0.5))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (side // 64 + 1, side // 64 + 1, 4), dtype=np.uint8)
    img = Image.fromarray(small, "RGBA").resize((side, side), Image.Resampling.BILINEAR)
    path = folder / f"{mode}-{side}.png"
    img.convert(mode).save(path, compress_level=1)
    return path


def measure(path: Path, size: int) -> dict:
    """Peak RSS growth (MB) of decoding `path` at `size` px (0 = full size) in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(size)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, measure every size and mode, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", type=float, nargs="+", default=[4, 16, 36])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_memory.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.megapixels:
            for mode in ("RGB", "RGBA"):
                path = _image(Path(tmp), mp, mode)
                w, h = Image.open(path).size
                for size in (0, 224, CHECK_SIZE):
                    r = measure(path, size)
                    mpx = w * h / 1e6
                    rows.append({"mode": mode, "width": w, "height": h, "megapixels": mpx,
                                 "decode_size": size or "full", **r,
                                 "mb_per_megapixel": r["peak_growth_mb"] / mpx})  # fmt: skip
                path.unlink()
    head = f"{'mode':<6}{'pixels':>13}{'MP':>7}{'decode':>8}{'peak MB':>10}{'MB/MP':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<6}{r['width']:>6}x{r['height']:<6}{r['megapixels']:>7.1f}"
              f"{str(r['decode_size']):>8}{r['peak_growth_mb']:>10.0f}"
              f"{r['mb_per_megapixel']:>8.2f}")  # fmt: skip
    write_json(args.out, {"results": rows, "env": environment("cpu")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
