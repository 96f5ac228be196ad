"""Uploaded bytes → an RGB tile, safely: type by magic bytes, byte and pixel limits, Pillow.

Nothing here opens a path: the client sends bytes, and only bytes are decoded. The decode is
`data.images.read_rgb` (the project's one decoder: 16-bit, alpha and CMYK handled, its own
`HISTOSHIELD_MAX_PIXELS` guard); before it, the header alone is read to refuse images over the
server's (lower) pixel limit without decoding them.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from histoshield.errors import HistoshieldError

# PNG, JPEG and TIFF (both byte orders): the formats slides and tiles are exported in.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF")
# read_rgb swaps PIL's global MAX_IMAGE_PIXELS while it opens a file; serialising decodes keeps
# two request threads from interleaving that swap (decoding one tile takes milliseconds).
_DECODE_LOCK = threading.Lock()


class UploadError(HistoshieldError):
    """A refused upload; `status` is the HTTP code to answer with (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Upload(io.BytesIO):
    """In-memory upload that names itself in read_rgb's error messages."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label


def sniff_format(data: bytes) -> str | None:
    """'PNG' | 'JPEG' | 'TIFF' from the first bytes, else None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def decode_upload(
    data: bytes, filename: str | None, *, max_bytes: int, max_pixels: int, size: int
) -> np.ndarray:
    """Decode an uploaded PNG/JPEG/TIFF to uint8 RGB (size, size, 3); refusals are UploadError."""
    label = f"upload {filename!r}" if filename else "upload"
    if not data:
        raise UploadError(f"{label} is empty: send a PNG, JPEG or TIFF tile in the 'file' field")
    if len(data) > max_bytes:
        raise UploadError(
            f"{label} is {len(data):,} bytes, over the {max_bytes:,}-byte limit", status=413
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(
            f"{label} is not a PNG, JPEG or TIFF image (by its first bytes)", status=415
        )
    with _DECODE_LOCK:
        _check_pixels(data, label, max_pixels)
        from histoshield.data.images import read_rgb

        try:
            arr = read_rgb(_Upload(data, label), size)
        except HistoshieldError as e:
            raise UploadError(str(e).removesuffix("; replace or remove it")) from None
    return arr


def _check_pixels(data: bytes, label: str, max_pixels: int) -> None:
    """Refuse from the header alone: an image of `max_pixels` pixels or more (a bomb too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: we decide below
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        w, h = _bomb_size(data)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UploadError(f"{label} is not a readable image ({type(e).__name__}: {e})") from None
    if w * h >= max_pixels:
        raise UploadError(
            f"{label} is {w}x{h} ({w * h:,} pixels), at or over the server's {max_pixels:,}-pixel "
            "limit: send a tile, not a whole slide",
            status=413,
        )


def _bomb_size(data: bytes) -> tuple[int, int]:
    """Header size of an image PIL refused as a decompression bomb (opened without its guard)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # under _DECODE_LOCK; only the header is read
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            return img.size
    finally:
        Image.MAX_IMAGE_PIXELS = old


def png_bytes(arr: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Lossless PNG of a uint8 (H,W,3) array, with optional tEXt metadata chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()
