"""Masks as the official method builds them, at any size that is a multiple of 8."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import load_shared_module
from lib_migc.core.masks import MaskCache, box_mask, feature_size, latent_masks

CPU = torch.device("cpu")


def test_box_rasterisation_truncates_like_python_int():
    m = box_mask((0.1, 0.15, 0.55, 0.7), 512, 512)
    rows = torch.nonzero(m.sum(1)).flatten()
    cols = torch.nonzero(m.sum(0)).flatten()
    assert (rows[0].item(), rows[-1].item()) == (76, 357)  # int(76.8) .. int(358.4) - 1 = 357
    assert (cols[0].item(), cols[-1].item()) == (51, 280)  # int(51.2) .. int(281.6) - 1
    assert m.sum().item() == (358 - 76) * (281 - 51)


def test_latent_masks_match_the_official_ones_recorded_in_the_migcplus_case(shared_dir):
    """The MIGC++ reference stores the latent-resolution masks the official block received."""
    inputs = load_shared_module("data/modes/migcplus/inputs.py", "migcplus_inputs")
    name = "up16_512_mixed4_overlap"
    spec = inputs.CASES[name]
    full, _, _ = inputs.case_instances(name)
    ref = load_file(str(shared_dir / "data" / "modes" / "migcplus" / f"{name}.safetensors"))
    inst, bg = latent_masks(full, spec["img_h"], spec["img_w"])
    torch.testing.assert_close(inst, ref["masks_latent"][0], rtol=0, atol=1e-7)
    torch.testing.assert_close(bg, ref["supplement_latent"][0, 0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("latent", [(64, 64), (64, 96), (75, 45), (97, 33), (8, 8)])
def test_feature_size_follows_the_unets_own_downsampling(latent):
    from ldm.modules.diffusionmodules.openaimodel import Downsample

    down = Downsample(4, use_conv=True, dims=2, out_channels=4)
    x = torch.zeros((1, 4, *latent))
    for level in range(4):
        h, w = x.shape[-2:]
        assert feature_size(latent, h * w) == (h, w), level
        x = down(x)


def test_background_is_one_minus_the_clamped_union():
    cache = MaskCache.from_boxes([(0.0, 0.0, 0.5, 1.0), (0.25, 0.0, 1.0, 0.5)], 64, 64)
    assert cache.latent_instances.shape == (2, 8, 8)
    expected = 1 - cache.latent_instances.sum(0).clamp(max=1)
    torch.testing.assert_close(cache.latent_background, expected)


@pytest.mark.parametrize("width,height", [(512, 512), (768, 512), (512, 768), (640, 448), (520, 392)])
def test_masks_for_every_unet_level_of_any_multiple_of_8(width, height):
    cache = MaskCache.from_boxes([(0.1, 0.2, 0.6, 0.9), (0.5, 0.0, 1.0, 0.5)], height, width)
    h, w = height // 8, width // 8
    for _ in range(4):
        m = cache.for_tokens(h * w, CPU, torch.float32)
        assert m.size == (h, w)
        assert m.instances.shape == (2, h * w) and m.background.shape == (h * w,)
        assert m.layout_allowed.shape == (h * w, h * w)
        h, w = -(-h // 2), -(-w // 2)


def test_masks_are_built_once_per_resolution_and_dtype():
    cache = MaskCache.from_boxes([(0.1, 0.2, 0.6, 0.9)], 512, 512)
    a = cache.for_tokens(256, CPU, torch.float32)
    assert cache.for_tokens(256, CPU, torch.float32) is a
    assert cache.for_tokens(256, CPU, torch.float16) is not a
    assert cache.for_tokens(256, CPU, torch.float16).instances.dtype == torch.float16


def test_layout_attention_lets_pixels_see_only_pixels_of_a_shared_region():
    cache = MaskCache.from_boxes([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], 512, 512)
    m = cache.at((16, 16), CPU, torch.float32)
    allowed = m.layout_allowed
    regions = torch.cat([m.instances, m.background[None]]) > 0
    for p, q in [(0, 255), (0, 17), (34, 221), (0, 15)]:
        assert allowed[p, q].item() == bool((regions[:, p] & regions[:, q]).any())
    assert not allowed[0, 255]  # deep inside box 1 vs deep inside box 2
    assert allowed[0, 17]  # both inside box 1
    assert torch.equal(allowed, allowed.T) and allowed.diagonal().all()


def test_sizes_must_be_multiples_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        MaskCache.from_boxes([(0, 0, 1, 1)], 500, 512)
