"""The built-in synthetic default: H&E-like tiles rendered from a simple tissue model.

Each tile is rendered as hematoxylin and eosin *concentration* maps that are mixed with
(per-patient perturbed) Ruifrok-Johnston stain vectors in optical density, so colours behave like
real stains: pink eosin stroma with fibre texture, purple-blue hematoxylin nuclei, white lumina.

A latent grade per tile (benign ~0.3, malignant ~0.7, overlapping) drives what a pathologist
looks at: nuclear density, size, pleomorphism (size/shape spread), hyperchromasia and vesicular
chromatin, and loss of glandular organisation (glands with an orderly ring of nuclei give way to
solid nests). Stain colour, intensity, blur and noise vary per patient (~10 tiles each) and per
tile, with the same spread in both classes, so colour alone is a poor classifier and some tiles
are genuinely ambiguous.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from histoshield.data.records import ImageSet, Record
from histoshield.errors import HistoshieldError

GENERATOR_VERSION = "3"  # bump when the rendering changes so cached sets are regenerated
_H = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston 2001 optical-density stain vectors
_E = np.array([0.072, 0.990, 0.105])
_CHUNK = 50  # tiles rendered together: bounds memory, keeps output independent of n's chunking


def synthetic_dir(n: int = 400, size: int = 96, seed: int = 0) -> Path:
    """Cache folder of the synthetic set with these parameters (under `$HISTOSHIELD_CACHE`)."""
    from histoshield.data.arrays import cache_root

    return cache_root() / "synthetic" / f"v{GENERATOR_VERSION}-n{n}-size{size}-seed{seed}"


def parse_synthetic_spec(spec: str) -> dict[str, int]:
    """`synthetic` or `synthetic:n=200,size=64,seed=1` → keyword arguments for `synthesize`."""
    params = {"n": 400, "size": 96, "seed": 0}
    _, _, rest = spec.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or key.strip() not in params:
            raise HistoshieldError(
                f"bad synthetic spec {spec!r}: use synthetic or synthetic:n=400,size=96,seed=0"
            )
        try:
            params[key.strip()] = int(val)
        except ValueError:
            raise HistoshieldError(
                f"bad synthetic spec {spec!r}: {key} must be an integer"
            ) from None
    return params


def ensure_synthetic(spec: str = "synthetic") -> Path:
    """Generate the synthetic set into its cache folder once (atomically) and return the folder."""
    params = parse_synthetic_spec(spec)
    out = synthetic_dir(**params)
    if (out / "manifest.csv").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        synthesize(tmp / "set", **params)
        try:
            os.replace(tmp / "set", out)
        except OSError:
            if not (out / "manifest.csv").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_params(n: int, size: int) -> None:
    if n < 4:
        raise HistoshieldError(f"--n must be at least 4 (two tiles per class), got {n}")
    if not 16 <= size <= 1024:
        raise HistoshieldError(f"--size must be between 16 and 1024 pixels, got {size}")


def synthesize(out: str | Path, n: int = 400, size: int = 96, seed: int = 0) -> ImageSet:
    """Write `n` H&E-like PNG tiles (half benign, half malignant) plus manifest.csv into `out`."""
    _check_params(n, size)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HistoshieldError(f"{out} already exists and is not empty; choose a new --out folder")
    created = not out.exists()
    records = []
    try:
        for c in ("benign", "malignant"):  # first: an unwritable --out fails before rendering
            (out / c).mkdir(parents=True, exist_ok=True)
        plan = _plan(n, seed)
        labels, patients = plan.labels, plan.patients
        tiles = np.concatenate(
            [_render_chunk(size, plan, slice(i, i + _CHUNK), seed) for i in range(0, n, _CHUNK)]
        )
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "patient", "subtype", "magnification"])
        for i in range(n):
            rel = f"{labels[i]}/{labels[i]}_{i:04d}.png"
            Image.fromarray(tiles[i]).save(out / rel, compress_level=1)
            w.writerow([rel, labels[i], patients[i], "", ""])
            records.append(Record((out / rel).resolve(), labels[i], patients[i]))
        (out / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    except BaseException as e:  # full disk, Ctrl-C...: a half-written set must not look whole
        shutil.rmtree(out if created else out / "benign", ignore_errors=True)
        if not created:
            shutil.rmtree(out / "malignant", ignore_errors=True)
        if isinstance(e, OSError):
            from histoshield.runfolder import os_error

            raise os_error(e, out) from None
        raise
    return ImageSet(out.resolve(), "synthetic", records, [])


class _Plan(NamedTuple):
    """Per-tile class, patient and latent grade, and the patient's stain (repeated per tile)."""

    labels: list[str]
    patients: list[str]
    grades: np.ndarray  # (n,)
    h_vec: np.ndarray  # (n,3) hematoxylin OD vector
    e_vec: np.ndarray  # (n,3) eosin OD vector
    h_amt: np.ndarray  # (n,) hematoxylin amount
    e_amt: np.ndarray  # (n,) eosin amount
    bright: np.ndarray  # (n,) illumination


def _stratified(rng: np.random.Generator, k: int, lo: float, hi: float) -> np.ndarray:
    """k values covering [lo, hi] evenly in random order (one per stratum)."""
    return lo + (hi - lo) * (rng.permutation(k) + rng.uniform(0, 1, k)) / k


def _plan(n: int, seed: int) -> _Plan:
    """Class, patient, grade and stain per tile; patients hold ~10 tiles of one class.

    Stain amounts are drawn stratified within each class, so both classes span the same range
    of staining: with only ~20 patients a class, independent draws would often leave one class
    darker by chance, and a model would learn the slide's stain instead of the morphology.
    """
    rng = np.random.default_rng([seed, 1])
    n_b = n // 2
    labels = ["benign"] * n_b + ["malignant"] * (n - n_b)
    patients: list[str] = []
    grades = np.empty(n)
    cols: list[list[np.ndarray]] = [[] for _ in range(5)]
    for cls, start, count in (("b", 0, n_b), ("m", n_b, n - n_b)):
        n_pat = max(2, round(count / 10))
        # Unequal patients (as in BreakHis, ~5-15 tiles here), each with at least one tile.
        w = rng.uniform(0.5, 1.5, n_pat)
        sizes = 1 + rng.multinomial(count - n_pat, w / w.sum())
        pid = np.repeat(np.arange(n_pat), sizes)
        # Patients differ in grade too (some benign lesions look atypical, some carcinomas bland).
        pat_grade = rng.normal(0.3 if cls == "b" else 0.7, 0.05, n_pat)
        g = pat_grade[pid] + rng.normal(0, 0.08, count)
        grades[start : start + count] = np.clip(g, 0.0, 1.0)
        patients += [f"syn{cls}{p:03d}" for p in pid]
        h = np.abs(_H + rng.normal(0, 0.04, (n_pat, 3)))
        e = np.abs(_E + rng.normal(0, 0.04, (n_pat, 3)))
        pat = (
            h / np.linalg.norm(h, axis=1, keepdims=True),
            e / np.linalg.norm(e, axis=1, keepdims=True),
            _stratified(rng, n_pat, 0.8, 1.2),
            _stratified(rng, n_pat, 0.75, 1.25),
            _stratified(rng, n_pat, 0.92, 1.04),
        )
        for lst, arr in zip(cols, pat, strict=True):
            lst.append(arr[pid])
    h_vec, e_vec, h_amt, e_amt, bright = (np.concatenate(c) for c in cols)
    return _Plan(labels, patients, grades, h_vec, e_vec, h_amt, e_amt, bright)


def _lerp(a: float, b: float, t):
    return a + (b - a) * t


def _fft_noise(
    rng: np.random.Generator, n: int, s: int, l_par: float, l_perp: float, theta: np.ndarray
) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed anisotropically (fibres along angle theta)."""
    w = rng.standard_normal((n, s, s))
    f = np.fft.fftfreq(s) * 2 * np.pi
    ky, kx = np.meshgrid(f, np.fft.rfftfreq(s) * 2 * np.pi, indexing="ij")
    c, si = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    kpar, kperp = kx * c + ky * si, -kx * si + ky * c
    h = np.exp(-0.5 * ((kpar * l_par) ** 2 + (kperp * l_perp) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(w) * h, s=(s, s))
    out -= out.mean(axis=(1, 2), keepdims=True)
    return out / (out.std(axis=(1, 2), keepdims=True) + 1e-8)


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-tile isotropic Gaussian blur of (n,s,s,c) in the Fourier domain."""
    s = x.shape[1]
    f = np.fft.fftfreq(s) * 2 * np.pi
    ky, kx = np.meshgrid(f, np.fft.rfftfreq(s) * 2 * np.pi, indexing="ij")
    h = np.exp(-0.5 * (kx**2 + ky**2)[None] * sigma[:, None, None] ** 2)[..., None]
    return np.fft.irfft2(np.fft.rfft2(x, axes=(1, 2)) * h, s=(s, s), axes=(1, 2))


def _stamp(
    target: np.ndarray,
    tile: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    th: np.ndarray,
    value: np.ndarray,
    rim: np.ndarray,
) -> None:
    """Max-composite antialiased filled ellipses into target (n,s,s); rim>0 darkens the edge."""
    if len(cx) == 0:
        return
    s = target.shape[1]
    half = int(np.ceil(max(a.max(), b.max()))) + 2
    o = np.arange(-half, half + 1)
    ix = np.floor(cx)[:, None, None].astype(int) + o[None, None, :]
    iy = np.floor(cy)[:, None, None].astype(int) + o[None, :, None]
    dx, dy = ix - cx[:, None, None], iy - cy[:, None, None]
    c, si = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
    u, v = dx * c + dy * si, -dx * si + dy * c
    r = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    edge = np.clip((1.0 - r) * b[:, None, None] / 0.8 + 0.5, 0.0, 1.0)  # ~1 px soft edge
    val = value[:, None, None] * edge * (1.0 - rim[:, None, None] + rim[:, None, None] * r**2)
    ok = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s) & (val > 0)
    tt = np.broadcast_to(tile[:, None, None], ok.shape)
    ix, iy = np.broadcast_to(ix, ok.shape), np.broadcast_to(iy, ok.shape)
    np.maximum.at(target, (tt[ok], iy[ok], ix[ok]), val[ok])


def _render_chunk(s: int, plan: _Plan, part: slice, seed: int) -> np.ndarray:
    """Render the tiles `part` of the plan as uint8 (n,s,s,3)."""
    grades = plan.grades[part]
    n = len(grades)
    rng = np.random.default_rng([seed, 2, part.start])
    # Structures shrink more slowly than the tile, so small tiles show fewer, still-resolvable
    # nuclei (a smaller field of view) rather than sub-pixel ones.
    scale = (s / 96.0) ** 0.5
    fov = (s / (96.0 * scale)) ** 2  # field of view, relative to a 96 px tile
    g = grades
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)

    # Stroma: eosin with collagen fibres; a little background hematoxylin.
    fib = _fft_noise(rng, n, s, 7 * scale, 0.9 * scale, rng.uniform(0, np.pi, n))
    fib2 = _fft_noise(rng, n, s, 5 * scale, 1.2 * scale, rng.uniform(0, np.pi, n))
    e_base = rng.uniform(0.3, 0.6, n)[:, None, None]
    cE = e_base * (1 + 0.28 * fib + 0.15 * fib2)
    cH = np.full((n, s, s), 0.06) + 0.03 * fib2

    # Epithelial nests: their extent grows with grade (solid sheets in carcinoma).
    blob = _fft_noise(rng, n, s, 10 * scale, 10 * scale, np.zeros(n))
    frac = np.clip(_lerp(0.12, 0.6, g) + rng.normal(0, 0.06, n), 0.05, 0.85)
    srt = np.sort(blob.reshape(n, -1), axis=1)
    thr = srt[np.arange(n), ((1 - frac) * (s * s - 1)).astype(int)][:, None, None]
    nest = np.clip((blob - thr) * 2.5 + 0.5, 0, 1)
    cE = cE * (1 - 0.45 * nest)  # epithelial cytoplasm is paler than collagen
    cH = cH + 0.10 * nest

    nuc = np.zeros((n, s, s))  # hematoxylin from nuclei (max-composited)
    lumen = np.zeros((n, s, s))
    parts: list[list[np.ndarray]] = [[] for _ in range(8)]

    def add(t, cx, cy, a, b, th, val, rim) -> None:
        for lst, arr in zip(parts, (t, cx, cy, a, b, th, val, rim), strict=True):
            lst.append(np.asarray(arr, dtype=float))

    for i in range(n):
        gi = g[i]
        r_mean = _lerp(1.8, 3.8, gi) * scale
        pleo = _lerp(0.10, 0.38, gi)
        hyper = _lerp(1.0, 1.3, gi)
        rim = _lerp(0.0, 0.45, gi)
        # Glands: lumen with an orderly ring of nuclei; fewer and less orderly with grade.
        n_gl = rng.poisson(max(0.05, _lerp(2.2, 0.15, gi)) * fov)
        order = np.clip(1.1 - gi * 1.2, 0, 1)
        for _ in range(min(n_gl, 6)):
            ra = rng.uniform(5, 13) * scale
            rb = ra * rng.uniform(0.55, 1.0)
            gx, gy, gth = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, np.pi)
            c, si = np.cos(gth), np.sin(gth)
            u = (xx - gx) * c + (yy - gy) * si
            v = -(xx - gx) * si + (yy - gy) * c
            rr = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
            lumen[i] = np.maximum(lumen[i], np.clip((1 - rr) * rb / 1.2 + 0.5, 0, 1))
            k = max(6, int(2 * np.pi * np.sqrt((ra**2 + rb**2) / 2) / (2.3 * r_mean)))
            phi = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
            jit = (1 - order) * 2.5 * r_mean
            ru = (ra + 1.3 * r_mean) * np.cos(phi) + rng.normal(0, jit + 0.15, k)
            rv = (rb + 1.3 * r_mean) * np.sin(phi) + rng.normal(0, jit + 0.15, k)
            nx, ny = gx + ru * c - rv * si, gy + ru * si + rv * c
            a = r_mean * np.clip(np.exp(rng.normal(0, pleo, k)), 0.4, 2.2)
            add(
                np.full(k, i), nx, ny, a * 1.25, a * 0.8, phi + gth + np.pi / 2,
                hyper * rng.uniform(0.85, 1.15, k), np.full(k, rim),
            )  # fmt: skip
        # Scattered nuclei, mostly in nests; density and crowding grow with grade.
        k = int(rng.poisson(_lerp(22, 110, gi) * fov))
        cand = rng.uniform(0, s, (3 * k + 3, 2))
        w = nest[i][cand[:, 1].astype(int) % s, cand[:, 0].astype(int) % s] * 0.85 + 0.15
        keep = cand[rng.uniform(size=len(cand)) < w][:k]
        kk = len(keep)
        a = r_mean * np.clip(np.exp(rng.normal(0, pleo, kk)), 0.4, 2.2)
        ecc = 1 + np.abs(rng.normal(0, _lerp(0.15, 0.5, gi), kk))
        add(
            np.full(kk, i), keep[:, 0], keep[:, 1], a * np.sqrt(ecc), a / np.sqrt(ecc),
            rng.uniform(0, np.pi, kk), hyper * rng.uniform(0.8, 1.2, kk), np.full(kk, rim),
        )  # fmt: skip
        # Stromal fibroblasts: thin, elongated, dark nuclei in both classes.
        kf = int(rng.poisson(10 * fov))
        add(
            np.full(kf, i), rng.uniform(0, s, kf), rng.uniform(0, s, kf),
            np.full(kf, 2.8 * scale), np.full(kf, 0.8 * scale), rng.uniform(0, np.pi, kf),
            rng.uniform(0.9, 1.3, kf), np.zeros(kf),
        )  # fmt: skip

    t, cx, cy, a, b, th, val, rimv = (np.concatenate(p) if p else np.zeros(0) for p in parts)
    # Small nuclei first, in batches, so each batch's stamp window fits its largest nucleus only.
    sl_order = np.argsort(np.maximum(a, b), kind="stable")
    step = 4000
    for j in range(0, len(cx), step):
        sl = sl_order[j : j + step]
        _stamp(nuc, t[sl].astype(int), cx[sl], cy[sl], a[sl], b[sl], th[sl], val[sl], rimv[sl])

    chrom = _fft_noise(rng, n, s, 0.7 * scale, 0.7 * scale, np.zeros(n))
    cH = np.maximum(cH, nuc * (1 + 0.22 * chrom))
    cE = cE * (1 - 0.6 * np.clip(nuc, 0, 1))
    cE = cE * (1 - lumen) + 0.02 * lumen
    cH = cH * (1 - lumen) + 0.01 * lumen
    cH, cE = np.clip(cH, 0, None), np.clip(cE, 0, None)

    # Stain variation: per patient (planned in `_plan`) and per tile.
    h_vec, e_vec = plan.h_vec[part], plan.e_vec[part]
    h_amt = plan.h_amt[part] * rng.uniform(0.9, 1.1, n)
    e_amt = plan.e_amt[part] * rng.uniform(0.9, 1.1, n)
    bright = plan.bright[part] * rng.uniform(0.97, 1.03, n)
    od = (
        (cH * h_amt[:, None, None])[..., None] * h_vec[:, None, None, :]
        + (cE * e_amt[:, None, None])[..., None] * e_vec[:, None, None, :]
        + 0.03
    )
    rgb = 255.0 * np.exp(-od)
    rgb = _blur(rgb, rng.uniform(0.0, 1.1, n) * scale)
    rgb = rgb * bright[:, None, None, None]
    rgb += rng.normal(0, 1, rgb.shape) * rng.uniform(1.0, 5.0, n)[:, None, None, None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
