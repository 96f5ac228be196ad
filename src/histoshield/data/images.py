"""Reading image files safely: cheap header checks, and a full decode to 8-bit RGB."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histoshield.errors import HistoshieldError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
# Files commonly found next to datasets that are not images and are not a problem.
IGNORED_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})
IGNORED_EXTENSIONS = frozenset(
    {".csv", ".md", ".txt", ".json", ".yaml", ".yml", ".html", ".pdf", ".npy", ".py", ".xml"}
)
_DEFAULT_MAX_PIXELS = 400_000_000  # decoding for training: ~4 MB/MP RGB (docs/reliability.md)


def max_pixels() -> int:
    """Pixel limit (width × height): images of this many pixels or more are refused.

    `$HISTOSHIELD_MAX_PIXELS`, default 400 MP; real BreakHis images are 0.3 MP.
    """
    try:
        return int(os.environ.get("HISTOSHIELD_MAX_PIXELS", _DEFAULT_MAX_PIXELS))
    except ValueError:
        return _DEFAULT_MAX_PIXELS


CHECK_SIZE = 64  # decode size of the full check (`check_image(decode=True)`)


def os_error_text(e: OSError) -> str:
    """Words for an OS-level read failure (not a broken image): permission denied, EIO..."""
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read ({e.strerror or e})"


def content_digest(path: Path) -> str:
    """Hex SHA-256 of a file's bytes: duplicate detection and the decode cache's key.

    SHA-256 rather than BLAKE2b or CRC32: measured faster than BLAKE2b here (CPU SHA
    extensions) and collision-resistant, unlike CRC32; see benchmarks/cache_key.py.
    """
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise HistoshieldError(
            f"{path}: image file disappeared; re-run `histoshield data inspect`"
        ) from None
    except OSError as e:
        raise HistoshieldError(f"{path}: {os_error_text(e)}") from None


def is_image_file(path: Path) -> bool:
    """True for the file extensions we read as images."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_ignorable(path: Path) -> bool:
    """Side files (README, CSV, OS litter, hidden files) that are silently not images."""
    name = path.name.lower()
    return (
        name.startswith(".")
        or name in IGNORED_NAMES
        or path.suffix.lower() in IGNORED_EXTENSIONS
        or name.startswith("readme")
    )


def _open(path: Path) -> Image.Image:
    """Open lazily with our own pixel limit instead of PIL's global decompression-bomb guard."""
    limit = max_pixels()
    old = Image.MAX_IMAGE_PIXELS
    try:
        # PIL raises past 2x its limit; we check the size ourselves below with a clear message.
        Image.MAX_IMAGE_PIXELS = None
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    w, h = img.size
    if w * h >= limit:  # exclusive: the limit itself is the first size refused
        img.close()
        raise ValueError(
            f"image is {w}x{h} ({w * h / 1e6:.0f} megapixels), at or over the "
            f"{limit / 1e6:.0f} MP limit (downscale it, or raise HISTOSHIELD_MAX_PIXELS)"
        )
    if w < 1 or h < 1:
        img.close()
        raise ValueError(f"image has an empty size {w}x{h}")
    return img


def check_image(path: Path, *, decode: bool = False, decoded_ok: Path | None = None) -> str | None:
    """Validity check; returns a problem description or None.

    Without `decode` only headers and (PNG) chunk checksums are read, which misses files whose
    pixel data is bad (an empty IDAT behind a valid header); `decode=True` also decodes them.
    `decoded_ok` is a folder of markers named by content digest: a file whose bytes decoded
    before is not decoded again, and one that decodes now gets a marker.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        return os_error_text(e)
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _open(path)
            fmt = img.format
            img.verify()  # PNG: chunk CRCs through IEND, so truncation is caught here
    except ValueError as e:
        return str(e)
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except OSError as e:
        if e.errno is not None:  # a read failure, not a format error (PIL's have no errno)
            return os_error_text(e)
        return f"corrupt image ({type(e).__name__}: {e})"
    except Exception as e:  # PIL raises many types for broken files
        return f"corrupt image ({type(e).__name__}: {e})"
    if fmt == "JPEG":
        # verify() does not read JPEG data; a cut-off file lacks the end-of-image marker.
        with open(path, "rb") as f:
            f.seek(max(0, size - 2048))
            tail = f.read()
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
    return _decode_problem(path, decoded_ok) if decode else None


def _decode_problem(path: Path, decoded_ok: Path | None) -> str | None:
    marker = None
    try:
        if decoded_ok is not None:
            digest = content_digest(path)
            marker = decoded_ok / digest[:2] / digest
            if marker.exists():
                return None
        # The way load_arrays decodes (JPEG draft, integer reduce) at a small size: the same
        # failures, at about half the memory of a full-size decode.
        read_rgb(path, CHECK_SIZE)
    except HistoshieldError as e:
        return str(e).removeprefix(f"{path}: ").removesuffix("; replace or remove it")
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only cache only costs the next check its speed
    return None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """8-bit RGB for every PIL mode, scaling high bit depths instead of clipping them."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            top = 1.0 if np.nanmax(a) <= 1.0 else 255.0
        elif mode == "I" and np.max(a) <= 255:
            top = 255.0
        else:
            top = 65535.0  # 16-bit data (PIL opens 16-bit grey PNG/TIFF as I;16 or I)
        a = np.clip(np.nan_to_num(a) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in img.info:
        # Transparent pixels would expose arbitrary colour: composite onto white slide glass.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img)


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """Decode `path` to uint8 RGB (H,W,3), resized to (size,size) with antialiased bicubic."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _open(path)
            with img:
                if size is not None and img.format == "JPEG":
                    # Decode large JPEGs at a reduced scale (never below 2x target): fast, low RAM.
                    img.draft("RGB", (2 * size, 2 * size))
                img.load()
                if size is not None and img.mode in ("RGB", "L", "RGBA"):
                    # Reduce very large images by an integer factor first to bound memory.
                    factor = min(img.size) // (4 * size)
                    if factor >= 2:
                        img = img.reduce(factor)
                arr = _to_rgb_array(img)
    except ValueError as e:
        raise HistoshieldError(f"{path}: {e}") from None
    except UnidentifiedImageError:
        raise HistoshieldError(
            f"{path}: not an image (PIL cannot identify it); replace or remove it"
        ) from None
    except OSError as e:
        if e.errno is None:
            raise HistoshieldError(
                f"{path}: corrupt or truncated image ({type(e).__name__}: {e}); replace or "
                "remove it"
            ) from None
        raise HistoshieldError(f"{path}: {os_error_text(e)}") from None
    except Exception as e:
        raise HistoshieldError(
            f"{path}: corrupt or truncated image ({type(e).__name__}: {e}); replace or remove it"
        ) from None
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(
            Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)
