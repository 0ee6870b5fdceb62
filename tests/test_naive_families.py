"""The weight-free "naive" mode on SD1.x, SD2.x and SDXL-shaped real ldm UNets, through both hosts.

The literal reference patches every attn2 (every transformer block, SDXL's second ones included) with
``reference_migc.naive_fuser`` on the cond rows, with the instance contexts from the model's own text
conditioning; the product's hooks and session must give the same UNet output.
"""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
import reference_migc
from conftest import INSTANCES
from helpers import build_family_unet
from lib_migc import job
from lib_migc.core.masks import MaskCache
from lib_migc.core.unet_layers import attn2_layers
from lib_migc.hosts import a1111, forge

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def unets():
    return {family: build_family_unet(family, seed=1) for family in FAMILIES}


def _data(**overrides):
    data = {"enabled": True, "mode": "naive", "instances": INSTANCES, "migc_steps": 1.0, "weights": "absent.ckpt"}
    data.update(overrides)
    return data


def _rows(model, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 32, 32), generator=g)
    cond = model.get_learned_conditioning(["a room"] * batch)
    uncond = model.get_learned_conditioning([""] * batch)
    return x, cond, uncond


def _split(c):
    return (c["crossattn"], c["vector"]) if isinstance(c, dict) else (c, None)


def _unet_call(unet, x, cond, uncond):
    (cc, cv), (uc, uv) = _split(cond), _split(uncond)
    extra = {"y": torch.cat([cv, uv])} if cv is not None else {}
    with torch.no_grad():
        return unet(torch.cat([x, x]), torch.full((2 * x.shape[0],), 500.0), context=torch.cat([cc, uc]), **extra)


def _a1111_run(p, x, cond, uncond, data, steps=1):
    job.before_process(p)
    job.process(p, (data,), a1111)
    job.before_sampling(p)
    outs = []
    try:
        for step in range(steps):
            params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, step, 4, cond, uncond, denoiser=SimpleNamespace(p=p))
            job.on_cfg_denoiser(params)
            outs.append(_unet_call(p.sd_model.model.diffusion_model, x, cond, uncond))
    finally:
        job.after_batch(p)
        job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    return outs


def _literal_reference(model, x, cond, uncond, width=256, height=256):
    """Every attn2's cond rows through the literal naive fuser; uncond rows plain."""
    unet = model.model.diffusion_model
    inst_ctx = _split(model.get_learned_conditioning([i["description"] for i in INSTANCES]))[0]
    cache = MaskCache.from_boxes([tuple(i["box"]) for i in INSTANCES], height, width)
    batch = x.shape[0]
    layers = attn2_layers(unet)
    for attn in layers.values():
        def forward(h, context=None, mask=None, attn=attn, **kw):
            plain = type(attn).forward(attn, h, context=context)
            masks = cache.for_tokens(h.shape[1], h.device, h.dtype)
            cond_rows = reference_migc.naive_fuser(attn, h[:batch], context[:batch], inst_ctx, masks.instances)
            return torch.cat([cond_rows, plain[batch:]])
        attn.forward = forward
    try:
        return _unet_call(unet, x, cond, uncond), len(layers)
    finally:
        for attn in layers.values():
            del attn.forward


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_mode_equals_the_literal_fuser_on_every_attn2(webui_modules, unets, text_model, family):
    model = fake_webui.FakeFamilyModel(unets[family], text_model, family) if family != "sd1" else fake_webui.FakeSDModel(unets[family], text_model)
    p = fake_webui.FakeProcessing(model, seeds=[7])
    x, cond, uncond = _rows(model)
    ours = _a1111_run(p, x, cond, uncond, _data())[0]
    reference, layer_count = _literal_reference(model, x, cond, uncond)
    assert layer_count == (16 if family != "sdxl" else 32)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    plain = _unet_call(unets[family], x, cond, uncond)
    assert (ours[:1] - plain[:1]).abs().amax() > 1e-3
    torch.testing.assert_close(ours[1:], plain[1:], rtol=1e-4, atol=1e-5)
    assert not p.comments, p.comments  # no decline, no weights needed
    assert not any("forward" in m.__dict__ for m in unets[family].modules())


def test_migc_mode_on_sdxl_declines_and_points_to_the_training_free_modes(webui_modules, unets, text_model):
    model = fake_webui.FakeFamilyModel(unets["sdxl"], text_model, "sdxl")
    p = fake_webui.FakeProcessing(model, seeds=[7])
    x, cond, uncond = _rows(model)
    out = _a1111_run(p, x, cond, uncond, _data(mode="migc"))[0]
    torch.testing.assert_close(out, _unet_call(unets["sdxl"], x, cond, uncond), rtol=0, atol=0)
    message = " ".join(p.comments)
    assert "needs an SD1.x checkpoint" in message and "'naive'" in message and "'multidiffusion'" in message


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_forge_gives_the_same_naive_rows_as_a1111(webui_modules, unets, text_model, family):
    unet = unets[family]
    a_model = fake_webui.FakeFamilyModel(unet, text_model, family)
    x, cond, uncond = _rows(a_model)
    a_out = _a1111_run(fake_webui.FakeProcessing(a_model, seeds=[7]), x, cond, uncond, _data())[0]
    with fake_forge.backend_modules():
        f_model = fake_forge.ForgeFamilyModel(unet, text_model, family)
        p = fake_webui.FakeProcessing(f_model, seeds=[7])
        job.before_process(p)
        job.process(p, (_data(),), forge)
        job.before_sampling(p)
        params = fake_webui.CFGDenoiserParams(x, None, torch.ones(1), 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p))
        job.on_cfg_denoiser(params)
        (cc, cv), (uc, uv) = _split(cond), _split(uncond)
        extra = {"y": torch.cat([uv, cv])} if cv is not None else {}
        out = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uc, cc]), (1, 0), **extra)
        job.after_batch(p)
        job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    torch.testing.assert_close(out[1:], a_out[:1], rtol=1e-4, atol=1e-5)  # Forge: uncond rows first
    torch.testing.assert_close(out[:1], a_out[1:], rtol=1e-4, atol=1e-5)
