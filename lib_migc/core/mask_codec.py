"""Instance masks as text: PNG data URLs in the layout JSON, the API and the infotext.

Why PNG: it is lossless (a pasted infotext must regenerate the identical image), every browser can
make one from a canvas, and a binary brush mask written as a 1-bit PNG takes a few hundred bytes to a
few kB at 512x512, which keeps the infotext short. Soft masks (uploaded with feathered edges) are kept
as 8-bit grayscale, so values are multiples of 1/255 — the same quantisation the official MIGC++ script
applies when it reads its mask PNG.

Torch-free on purpose: the panel (and the demo's gradio-only venvs) validate layouts without torch.
"""
from __future__ import annotations

import base64
import binascii
import io
import threading
import warnings
from collections import OrderedDict

import numpy as np
from PIL import Image, UnidentifiedImageError

DATA_URL_PREFIX = "data:image/png;base64,"
#: Masks larger than this (per side) are refused: nobody generates at 8k and decoding would cost memory.
#: Checked from the image header, before anything is decoded.
MAX_MASK_SIDE = 4096
#: Longest accepted mask string (base64 characters, data-URL head included): 16 MiB, i.e. a 12 MB image,
#: far above a 4096x4096 8-bit mask PNG of real brush strokes (tens of kB to a few MB).
MAX_MASK_CHARS = 16 * 1024 * 1024
#: Formats a mask may come in; anything else (EPS, PSD, ...) is never handed to a decoder.
MASK_FORMATS = ("PNG", "JPEG", "WEBP")
#: The decode cache holds 8-bit masks (one byte a pixel, lossless for PNG levels) up to this many bytes
#: in all, strings included: a job parses, fits and rasterises the same strings several times.
CACHE_BYTES = 8 * 1024 * 1024


class MaskDecodeError(ValueError):
    """A mask string that is not a readable image; the layout parser adds which instance it was."""


def decode_mask(value: str) -> np.ndarray:
    """A read-only (h, w) float64 array in [0, 1] from a PNG/JPEG/WebP data URL or bare base64.

    Colour images count by luminance; transparent pixels count as 0 (an image painted on a transparent
    layer works as a mask). The 8-bit levels are cached (see :data:`CACHE_BYTES`)."""
    text = value.strip()
    levels = _CACHE.get(text)
    if levels is None:
        levels = _decode(text)
        _CACHE.put(text, levels)
    mask = levels / 255.0
    mask.setflags(write=False)
    return mask


class _ByteBoundedCache:
    """Least-recently-used masks whose levels and keys together stay under ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: str, value: np.ndarray) -> int:
        return len(key) + value.nbytes

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        size = self._size(key, value)
        if size > self.limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.limit:
                old_key, old_value = self._items.popitem(last=False)
                self._bytes -= self._size(old_key, old_value)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_CACHE = _ByteBoundedCache(CACHE_BYTES)


def _decode(text: str) -> np.ndarray:
    """(h, w) uint8 levels, read-only. Size, format and integrity are checked before pixels are decoded."""
    if len(text) > MAX_MASK_CHARS:
        raise MaskDecodeError(f"the mask string has {len(text):,} characters; at most {MAX_MASK_CHARS:,} are allowed "
                              f"(a mask of at most {MAX_MASK_SIDE}x{MAX_MASK_SIDE} px)")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise MaskDecodeError("expected a base64 data URL such as 'data:image/png;base64,iVBOR...'")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MaskDecodeError("not valid base64 (expected a PNG as a data URL or bare base64)") from None
    image = _open_checked(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise MaskDecodeError("the image data is truncated or corrupt") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    levels = np.asarray(image.convert("L"), dtype=np.uint8).copy()
    levels.setflags(write=False)
    return levels


def _open_checked(raw: bytes) -> Image.Image:
    """The image behind ``raw`` with only its header read: format and size checked, PNG chunks verified
    (a truncated PNG is refused even where the host sets ``ImageFile.LOAD_TRUNCATED_IMAGES``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=MASK_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise MaskDecodeError(f"the image header claims a huge size; at most {MAX_MASK_SIDE} px per side is allowed") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise MaskDecodeError(f"the base64 data is not an image ({'/'.join(MASK_FORMATS)} are read)") from None
    width, height = image.size
    if max(width, height) > MAX_MASK_SIDE or min(width, height) < 1:
        raise MaskDecodeError(f"image is {width}x{height}; at most {MAX_MASK_SIDE} px per side is allowed")
    if image.format == "PNG":
        try:
            Image.open(io.BytesIO(raw), formats=("PNG",)).verify()
        except Exception:  # noqa: BLE001 - verify raises many kinds for damaged data
            raise MaskDecodeError("the PNG data is truncated or corrupt") from None
    return image


def encode_mask(mask: np.ndarray) -> str:
    """A PNG data URL of a (h, w) mask in [0, 1]: 1-bit when binary, else 8-bit grayscale."""
    values = np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)
    levels = np.rint(values * 255.0).astype(np.uint8)
    binary = bool(np.isin(levels, (0, 255)).all())
    image = Image.fromarray(levels, mode="L")
    if binary:
        image = image.convert("1", dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring a mask to the image size (bilinear) and to 8-bit levels, so that the generation and the
    infotext see the very same values."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (height, width):
        image = Image.fromarray(mask.astype(np.float32), mode="F")
        mask = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)
    return np.rint(np.clip(mask, 0.0, 1.0) * 255.0) / 255.0


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box MIGC++ derives from a mask: first/last non-zero column and row over the size.

    The end is the *last* pixel's index, not one past it (MIGC++ spec §3.2 and pitfall 11), so the
    position token matches the trained one. Raises ``ValueError`` for an all-zero mask.
    """
    mask = np.asarray(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is empty (all pixels are 0)")
    height, width = mask.shape
    return (cols[0] / width, rows[0] / height, cols[-1] / width, rows[-1] / height)
