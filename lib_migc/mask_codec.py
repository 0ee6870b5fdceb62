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
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

DATA_URL_PREFIX = "data:image/png;base64,"
#: Masks larger than this (per side) are refused: nobody generates at 8k and decoding would cost memory.
MAX_MASK_SIDE = 4096


class MaskDecodeError(ValueError):
    """A mask string that is not a readable image; the layout parser adds which instance it was."""


def decode_mask(value: str) -> np.ndarray:
    """A read-only (h, w) float64 array in [0, 1] from a PNG/JPEG/WebP data URL or bare base64.

    Colour images count by luminance; transparent pixels count as 0 (an image painted on a transparent
    layer works as a mask). Cached: a job parses, fits and rasterises the same strings several times.
    """
    return _decode_cached(value.strip())


@lru_cache(maxsize=64)
def _decode_cached(text: str) -> np.ndarray:
    mask = _decode(text)
    mask.setflags(write=False)
    return mask


def _decode(text: str) -> np.ndarray:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise MaskDecodeError("expected a base64 data URL such as 'data:image/png;base64,iVBOR...'")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MaskDecodeError("not valid base64 (expected a PNG as a data URL or bare base64)") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError):
        raise MaskDecodeError("the base64 data is not an image PNG/JPEG/WebP can read") from None
    if max(image.size) > MAX_MASK_SIDE:
        raise MaskDecodeError(f"image is {image.size[0]}x{image.size[1]}; at most {MAX_MASK_SIDE} px per side is allowed")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    gray = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    return gray


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
