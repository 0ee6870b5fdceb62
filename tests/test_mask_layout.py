"""Mask instances in the layout: parsing, errors that name the instance, sizes, the infotext round trip."""
import numpy as np
import pytest
import torch

from lib_migc.core.errors import LayoutError
from lib_migc.core.layout import fit_masks, parse_layout
from lib_migc.core.mask_codec import decode_mask, encode_mask, fit_mask, mask_to_box
from lib_migc.core.masks import MaskCache, box_mask, full_res_masks


def _disc(h, w, cx, cy, r, soft=False):
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    return np.clip(r + 0.5 - d, 0, 1) if soft else (d <= r).astype(np.float64)


def test_binary_masks_round_trip_exactly_and_compactly():
    mask = _disc(512, 512, 200, 260, 90)
    url = encode_mask(mask)
    assert url.startswith("data:image/png;base64,") and len(url) < 4000  # a 1-bit PNG
    assert np.array_equal(decode_mask(url), mask)


def test_soft_masks_keep_8_bit_levels():
    mask = fit_mask(_disc(64, 96, 40, 30, 20, soft=True), 64, 96)
    assert 0 < ((mask > 0) & (mask < 1)).sum()
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)


def test_transparent_pixels_count_as_outside():
    from PIL import Image
    import base64
    import io

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 255, 255, 255)
    rgba[0:4, 0:4] = (255, 255, 255, 0)  # white but transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    mask = decode_mask(base64.b64encode(buf.getvalue()).decode())
    assert mask[0:4, 0:4].max() == 0 and mask[8:24, 8:24].min() == 1


def test_mask_to_box_uses_the_last_pixel_index():
    mask = np.zeros((100, 200))
    mask[10:50, 20:200] = 0.3
    assert mask_to_box(mask) == (20 / 200, 10 / 100, 199 / 200, 49 / 100)


def test_a_mask_instance_gets_its_derived_box_and_writes_no_box():
    url = encode_mask(_disc(64, 64, 32, 32, 10))
    layout = parse_layout([{"description": "a cat", "mask": url}])
    inst = layout.instances[0]
    assert inst.mask == url and not inst.box_given
    assert inst.box == mask_to_box(decode_mask(url))
    assert layout.to_dict()["instances"][0] == {"description": "a cat", "mask": url}
    both = parse_layout([{"description": "a cat", "mask": url, "box": [0.1, 0.1, 0.9, 0.9]}]).instances[0]
    assert both.box == (0.1, 0.1, 0.9, 0.9) and both.box_given


@pytest.mark.parametrize("mask,words", [
    ("", ["instances[1]", "'mask'", "data URL"]),
    (12, ["instances[1]", "'mask'"]),
    ("data:image/png;base64,!!!", ["instances[1]", "'mask'", "base64"]),
    ("data:image/png;base64,aGVsbG8=", ["instances[1]", "'mask'", "not an image"]),
    (encode_mask(np.zeros((16, 16))), ["instances[1]", "box #2 ('a cat')", "'mask' is empty"]),
    (encode_mask(np.pad(np.ones((1, 8)), ((4, 11), (4, 4)))), ["instances[1]", "single row or column"]),
])
def test_bad_masks_name_the_instance_and_the_field(mask, words):
    layout = [{"description": "a dog", "box": [0, 0, 0.5, 0.5]}, {"description": "a cat", "mask": mask}]
    with pytest.raises(LayoutError) as info:
        parse_layout(layout)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_fit_masks_brings_masks_to_the_image_and_is_idempotent():
    small = encode_mask(_disc(64, 48, 24, 30, 12))
    layout = parse_layout([{"description": "a cat", "mask": small}, {"description": "a dog", "box": [0.5, 0, 1, 0.5]}])
    fitted = fit_masks(layout, width=384, height=512)
    values = decode_mask(fitted.instances[0].mask)
    assert values.shape == (512, 384)
    assert fitted.instances[0].box == mask_to_box(values)  # derived again at the image size
    assert fitted.instances[1] == layout.instances[1]
    again = fit_masks(parse_layout(fitted.to_json()), width=384, height=512)
    assert again == fitted  # a regeneration from the infotext sees identical values


def test_full_res_masks_use_the_mask_values_and_rasterise_boxes():
    soft = fit_mask(_disc(64, 64, 20, 20, 10, soft=True), 64, 64)
    layout = parse_layout([{"description": "a", "mask": encode_mask(soft)}, {"description": "b", "box": [0.5, 0.5, 1, 1]}])
    full = full_res_masks(layout, 64, 64)
    assert full.dtype == torch.float64
    torch.testing.assert_close(full[0], torch.from_numpy(soft), rtol=0, atol=0)
    torch.testing.assert_close(full[1], box_mask((0.5, 0.5, 1, 1), 64, 64), rtol=0, atol=0)


def test_a_mask_equal_to_its_box_gives_the_boxes_masks():
    box = (0.125, 0.25, 0.625, 0.875)
    rect = box_mask(box, 256, 256).numpy()
    from_mask = MaskCache.from_layout(parse_layout([{"description": "a", "mask": encode_mask(rect)}]), 256, 256)
    from_box = MaskCache.from_boxes([box], 256, 256)
    for tokens in (32 * 32, 16 * 16, 8 * 8):
        a, b = from_mask.for_tokens(tokens, "cpu", torch.float32), from_box.for_tokens(tokens, "cpu", torch.float32)
        assert torch.equal(a.instances, b.instances) and torch.equal(a.background, b.background)


def test_a_mask_thinner_than_a_feature_cell_is_reported():
    from lib_migc.params import MigcParams
    from lib_migc.modes.migc.session import MigcSession
    from lib_migc.modes.migc.shading import InstanceConditioning

    thin = np.zeros((512, 512))
    thin[:, 100:104] = 1.0  # a 4-px line: point-sampled away at 16x16 and 8x8
    layout = parse_layout([{"description": "a pole", "mask": encode_mask(thin)}, {"description": "a cat", "box": [0.5, 0.5, 1, 1]}])
    cond = InstanceConditioning.build(torch.zeros((2, 77, 768)), torch.zeros((2, 768)), layout.boxes)
    session = MigcSession(MigcParams(enabled=True, layout=layout), cond, None)
    session.begin_pass(512, 512, [1], torch.device("cpu"))
    assert session.vanished_instances() == [0]
