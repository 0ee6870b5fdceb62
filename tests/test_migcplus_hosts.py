"""MIGC++ on the real ldm UNet through the A1111 hooks and the Forge adapter (one core, two hosts)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fake_forge
import fake_webui
from lib_migc import job
from lib_migc.core.errors import MigcError
from lib_migc.core.mask_codec import encode_mask
from lib_migc.core.masks import box_mask
from lib_migc.hosts import a1111, forge
from lib_migc.modes.migc.modules import expected_state_shapes
from lib_migc.params import MigcParams
from test_forge import a1111_step, forge_step

PLUS_FILE = "tiny_plus.safetensors"


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) <= r).astype(np.float64)


@pytest.fixture()
def plus_models(webui_modules):
    """A random MIGC++ file in the official layout (flat, diffusers names) for the tiny UNet's C = 128 layers."""
    g = torch.Generator().manual_seed(9)
    state = {}
    for name in ("mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"):
        for sub, shape in expected_state_shapes(128, plus=True).items():
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[f"{name}.transformer_blocks.0.attn2.processor.migc.{sub}"] = torch.randn(shape, generator=g) / fan_in ** 0.5
        state[f"{name}.transformer_blocks.0.attn2.processor.migc.gamma"] = torch.tensor([0.9])
    save_file(state, str(webui_modules / PLUS_FILE))
    with fake_forge.backend_modules():
        yield webui_modules


def _instances(width, height):
    return [{"description": "a horse", "mask": encode_mask(_disc(height, width, width * 0.35, height * 0.5, min(width, height) * 0.3))},
            {"description": "a blue cube", "box": [0.45, 0.2, 0.95, 0.7]}]


def _data(width=256, height=256, **overrides):
    data = {"enabled": True, "weights": PLUS_FILE, "instances": _instances(width, height), "migc_steps": 1.0}
    data.update(overrides)
    return data


def _inputs(batch, latent_hw=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, 4, *latent_hw), generator=g), torch.randn((batch, 77, 768), generator=g),
            torch.randn((batch, 77, 768), generator=g))


def _run(host, p, step_fn, data, x, cond, uncond, steps=2):
    job.before_process(p)
    job.process(p, (data,), host)
    job.before_sampling(p)
    try:
        return [step_fn(p, x, cond, uncond, step=s) for s in range(steps)]
    finally:
        job.after_batch(p)
        job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def _a1111_p(unet, text_model, batch=1, width=256, height=256):
    return fake_webui.FakeProcessing(fake_webui.FakeSDModel(unet, text_model), width, height,
                                     seeds=list(range(100, 100 + batch)), prompts=["a room"] * batch)


def _plain(unet, x, ctx):
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), 500.0), context=ctx)


def test_migcplus_runs_the_same_on_forge_and_a1111_and_touches_only_cond_rows(plus_models, unet, text_model):
    x, cond, uncond = _inputs(2)
    p_a = _a1111_p(unet, text_model, 2)
    a_outs = _run(a1111, p_a, a1111_step, _data(), x, cond, uncond)
    p_f = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet, text_model), seeds=p_a.seeds, prompts=["a room"] * 2)
    f_outs = _run(forge, p_f, forge_step, _data(), x, cond, uncond)
    plain_cond, plain_uncond = _plain(unet, x, cond), _plain(unet, x, uncond)
    for a, f in zip(a_outs, f_outs):
        torch.testing.assert_close(f[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[1], plain_uncond, rtol=1e-4, atol=1e-5)
        assert (a[0] - plain_cond).abs().amax() > 1e-3
    info = MigcParams  # the infotext names the kind and keeps the mask, and restores the same layout
    text = p_a.extra_generation_params["MIGC"]
    assert '"weights_kind":"migc++"' in text and '"mask":"data:image/png;base64,' in text
    restored = info.from_infotext(text)
    assert restored.layout == MigcParams.from_api(_data()).layout


def test_a_rectangle_mask_with_its_box_gives_the_box_instances_image(plus_models, unet, text_model):
    x, cond, uncond = _inputs(1)
    box = [0.125, 0.25, 0.625, 0.875]
    rect = encode_mask(box_mask(box, 256, 256).numpy())
    as_box = _run(a1111, _a1111_p(unet, text_model), a1111_step, _data(instances=[{"description": "a cat", "box": box}]), x, cond, uncond)
    as_mask = _run(a1111, _a1111_p(unet, text_model), a1111_step,
                   _data(instances=[{"description": "a cat", "mask": rect, "box": box}]), x, cond, uncond)
    for a, b in zip(as_box, as_mask):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("width,height", [(256, 384), (384, 256), (640, 448)])
def test_non_square_sizes_run_on_the_true_feature_grid(plus_models, unet, text_model, width, height):
    latent = (height // 8, width // 8)
    x, cond, uncond = _inputs(1, latent)
    outs = _run(a1111, _a1111_p(unet, text_model, 1, width, height), a1111_step, _data(width, height), x, cond, uncond)
    plain = _plain(unet, x, cond)
    for out in outs:
        assert out[0].shape == plain.shape and torch.isfinite(out[0]).all()
        assert (out[0] - plain).abs().amax() > 1e-3


def test_bfloat16_autocast_gives_finite_migcplus_output_close_to_float32(plus_models, unet, text_model):
    """The WebUI runs the UNet under autocast; half-precision weights are covered at the layer level
    (test_migcplus_parity)."""
    x, cond, uncond = _inputs(1)
    full = _run(a1111, _a1111_p(unet, text_model), a1111_step, _data(), x, cond, uncond, steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = _run(a1111, _a1111_p(unet, text_model), a1111_step, _data(), x, cond, uncond, steps=1)
    assert torch.isfinite(half[0][0].float()).all()
    err = (half[0][0].float() - full[0][0]).abs().amax() / full[0][0].abs().amax()
    assert err < 5e-2


def test_29_instances_need_migcplus_weights(plus_models, unet, text_model):
    x, cond, uncond = _inputs(1)
    many = [{"description": f"thing {i}", "box": [0.0, 0.0, 1.0, 1.0]} for i in range(29)]
    with pytest.raises(MigcError, match="29 instances given; MIGC's aggregation controller has 28"):
        _run(a1111, _a1111_p(unet, text_model), a1111_step, _data(weights="tiny.safetensors", instances=many), x, cond, uncond, steps=1)
    outs = _run(a1111, _a1111_p(unet, text_model), a1111_step, _data(instances=many), x, cond, uncond, steps=1)
    assert torch.isfinite(outs[0][0]).all()
