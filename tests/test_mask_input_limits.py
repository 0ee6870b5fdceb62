"""Mask images from users: every bad payload is refused with a message naming the instance and the field,
the size is checked from the header before any pixel is decoded, and the decode cache stays small."""
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lib_migc.core import mask_codec
from lib_migc.core.errors import LayoutError
from lib_migc.core.layout import parse_layout
from lib_migc.core.mask_codec import CACHE_BYTES, MAX_MASK_CHARS, MAX_MASK_SIDE, decode_mask, encode_mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _with_header_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG whose IHDR claims another size (CRC fixed): what a decompression bomb looks like."""
    ihdr_at = png.index(b"IHDR")
    body = struct.pack(">II", width, height) + png[ihdr_at + 12:ihdr_at + 17]
    chunk = b"IHDR" + body
    return png[:ihdr_at] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[ihdr_at + 21:]


def _layout_error(mask: str) -> str:
    layout = {"instances": [{"description": "a cat", "box": [0, 0, 0.5, 0.5]},
                            {"description": "a dog", "mask": mask}]}
    with pytest.raises(LayoutError) as info:
        parse_layout(layout)
    message = str(info.value)
    assert "instances[1]" in message and "'mask'" in message, message
    return message


@pytest.fixture(autouse=True)
def _empty_cache():
    mask_codec._CACHE.clear()
    yield
    mask_codec._CACHE.clear()


def test_the_size_is_checked_from_the_header_before_decoding(monkeypatch):
    from PIL import ImageFile

    wide = _png(np.zeros((4, MAX_MASK_SIDE + 8), np.uint8))
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    message = _layout_error(_url(wide))
    assert f"at most {MAX_MASK_SIDE} px" in message
    assert decoded == [], "no pixel was decoded"


def test_a_decompression_bomb_is_refused_by_its_header():
    bomb = _with_header_size(_png(np.zeros((8, 8), np.uint8)), 200_000, 200_000)
    assert "px per side" in _layout_error(_url(bomb))


def test_a_string_over_the_limit_is_refused_before_base64_decoding(monkeypatch):
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("decoded an oversized string"))
    message = _layout_error("data:image/png;base64," + "A" * (MAX_MASK_CHARS + 4))
    assert f"{MAX_MASK_CHARS:,}" in message


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.95])
def test_a_truncated_png_is_refused_even_when_the_host_loads_truncated_images(monkeypatch, cut):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # some WebUI setups set this globally
    noise = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    png = _png(noise)
    assert "truncated or corrupt" in _layout_error(_url(png[: int(len(png) * cut)]))


@pytest.mark.parametrize("payload,needle", [
    (b"just some text, not an image", "not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),  # EPS would start Ghostscript
    (b"GIF89a" + b"\0" * 20, "not an image"),
])
def test_non_images_and_formats_outside_png_jpeg_webp_are_refused(payload, needle):
    assert needle in _layout_error(_url(payload))


def test_invalid_base64_names_the_instance():
    assert "not valid base64" in _layout_error("data:image/png;base64,@@@@")


def test_the_decode_cache_stays_within_its_byte_budget():
    rng = np.random.default_rng(1)
    for i in range(12):
        mask = (rng.random((1024, 1024)) > 0.5).astype(np.float64)
        url = encode_mask(mask)
        assert np.array_equal(decode_mask(url), mask)
        assert mask_codec._CACHE.nbytes <= CACHE_BYTES
    assert mask_codec._CACHE.nbytes > 0


def test_cached_masks_are_read_only_and_equal_to_a_fresh_decode():
    url = encode_mask(np.eye(64))
    first, second = decode_mask(url), decode_mask(url)
    assert np.array_equal(first, second) and first.dtype == np.float64
    with pytest.raises(ValueError):
        first[0, 0] = 0.5
