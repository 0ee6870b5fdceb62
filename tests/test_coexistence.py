"""Other extensions' hooks survive ours: an attention replacement or ``forward`` override registered before
a MIGC job is called wherever MIGC does not shade, and CFG results of other extensions are kept."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from helpers import build_unet, finish_job, start_job
from lib_migc import job
from lib_migc.hosts import a1111, forge
from lib_migc.modes.magicfusion.method import snb_mask
from lib_migc.modes.magicfusion.runtime import MODEL_B
from test_forge import args, forge_p, inputs
from test_magicfusion_forge import GUIDANCE, TINY, conds
from test_magicfusion_a1111 import fusion_args, save_checkpoint


def other_attention(rows: list, scale: float = 0.5):
    """Another extension's attn2 replacement (IP-Adapter-like): Forge's attention, scaled, recording its
    calls. A function, as extensions register them: Forge deep-copies the model options on every clone."""

    def replace(q, k, v, extra_options):
        rows.append((extra_options["block"], q.shape[0]))
        return fake_forge.attention_function(q, k, v, extra_options["n_heads"]) * scale

    return replace


def _with_other(p, other, key):
    patcher = p.sd_model.forge_objects.unet.clone()
    patcher.set_model_attn2_replace(other, *key)
    p.sd_model.forge_objects.unet = patcher


def _forge_steps(p, x, cond, uncond, steps):
    out = []
    for step in range(steps):
        job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, torch.ones(x.shape[0]), step, steps, cond, uncond,
                                                         denoiser=SimpleNamespace(p=p)))
        rows = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
        out.append(rows)
    return out


@pytest.mark.parametrize("key", [("output", 3, 0), ("output", 3)], ids=["block+index", "block"])
def test_forge_keeps_another_extensions_attn2_replacement(webui_modules, unet, text_model, key):
    x, cond, uncond = inputs(1)
    with fake_forge.backend_modules():
        alone = forge_p(unet, text_model)
        calls_alone = []
        _with_other(alone, other_attention(calls_alone), key)
        reference = _forge_steps(alone, x, cond, uncond, steps=4)

        p = forge_p(unet, text_model)
        calls = []
        _with_other(p, other_attention(calls), key)
        start_job(p, args(migc_steps=0.25), forge)  # MIGC at steps 0 and 1 of 4
        outs = _forge_steps(p, x, cond, uncond, steps=4)
        finish_job(p)
    assert len(calls) == len(calls_alone) == 4, "called at every step, MIGC's included"
    for step in (2, 3):  # MIGC inactive: exactly "that extension alone"
        assert torch.equal(outs[step], reference[step])
    for step in (0, 1):  # MIGC shades the cond row; the uncond row is still the other extension's
        assert torch.equal(outs[step][0], reference[step][0])
        assert not torch.equal(outs[step][1], reference[step][1])
    plain = forge_p(unet, text_model)
    assert not torch.equal(_forge_steps(plain, x, cond, uncond, steps=4)[3], reference[3]), "the stand-in changes the image"


def test_forge_magicfusion_keeps_earlier_cfg_results(webui_modules, tmp_path, text_model):
    unet_a, unet_b = build_unet(seed=0), build_unet(seed=7)
    unet_a.config = dict(TINY)
    save_checkpoint(unet_b, tmp_path / "tiny-b.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "tiny-b.safetensors"), sha256="f0f0f0f0f0f0")
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn((2, 4, 32, 32), generator=g) * 3, torch.full((2,), 2.0)

    def thresholding(args):  # a sampler_cfg_function (Dynamic Thresholding-like): returns x − CFG result
        guided = args["uncond_denoised"] + args["cond_scale"] * (args["cond_denoised"] - args["uncond_denoised"])
        return args["input"] - guided.clamp(-1.5, 1.5)

    def shift(args):  # an earlier post-CFG function
        return args["denoised"] + 0.125

    def with_others(model):
        patcher = model.forge_objects.unet.clone()
        patcher.set_model_sampler_cfg_function(thresholding)
        patcher.set_model_sampler_post_cfg_function(shift)
        model.forge_objects.unet = patcher
        return model

    with fake_forge.backend_modules():
        model = with_others(fake_forge.ForgeSDModel(unet_a, text_model))
        cond_ctx, uncond_ctx = model.get_learned_conditioning(["a lion"] * 2), model.get_learned_conditioning([""] * 2)
        with torch.no_grad():
            others_alone = fake_forge.sampling_function_inner(model.forge_objects.unet, x, sigma, conds(uncond_ctx), conds(cond_ctx), GUIDANCE)
        results = {}
        for name, fusion in (("fused", fusion_args(info.title)), ("outside", fusion_args(info.title, switch_t=700))):
            p = fake_webui.FakeProcessing(with_others(fake_forge.ForgeSDModel(unet_a, text_model)), seeds=[1, 2], prompts=["a lion"] * 2)
            start_job(p, fusion, forge)
            with torch.no_grad():
                results[name] = fake_forge.sampling_function_inner(p.sd_model.forge_objects.unet, x, sigma, conds(uncond_ctx),
                                                                   conds(cond_ctx), GUIDANCE)
            finish_job(p)
    assert torch.equal(results["outside"], others_alone), "outside the window: the other extensions alone, bit for bit"
    ka, kb = fake_forge.KModel(unet_a), fake_forge.KModel(unet_b)
    with torch.no_grad():
        d = {(m, c): k.apply_model(x, sigma, c_crossattn=ctx) for m, k in (("a", ka), ("b", kb))
             for c, ctx in (("c", cond_ctx), ("u", uncond_ctx))}
    eps = {key: (x - value) / 2.0 for key, value in d.items()}
    mask = snb_mask(eps["a", "c"], eps["a", "u"], eps["b", "c"], GUIDANCE, 1.0, 1.0)[:, None]
    blend = lambda c, u: u + GUIDANCE * (c - u)  # noqa: E731
    change = (blend(torch.where(mask, d["b", "c"], d["a", "c"]), torch.where(mask, d["b", "u"], d["a", "u"]))
              - blend(d["a", "c"], d["a", "u"]))
    torch.testing.assert_close(results["fused"], others_alone + change, rtol=1e-4, atol=1e-4)
    assert change.abs().amax() > 0.1
    MODEL_B.clear()


# ------------------------------------------------------------------------------------------ A1111
def test_a1111_chains_and_restores_another_extensions_attention_forward(webui_modules, unet, text_model):
    from lib_migc.core.unet_layers import attn2_layers

    layer = attn2_layers(unet)["output_blocks.3.1"]
    calls = []

    def other_forward(x, context=None, mask=None, **kwargs):
        calls.append(x.shape[0])
        return type(layer).forward(layer, x, context=context, mask=mask, **kwargs) * 0.5

    from test_lifecycle import a1111_p, cfg_step

    layer.forward = other_forward
    try:
        reference = [cfg_step(a1111_p(unet, text_model), step=s) for s in range(4)]
        p = a1111_p(unet, text_model)
        start_job(p, args(migc_steps=0.25))
        outs = [cfg_step(p, step=s) for s in range(4)]
        finish_job(p)
        assert layer.__dict__["forward"] is other_forward, "restored exactly"
        for step in (2, 3):
            assert torch.equal(outs[step], reference[step])
        assert torch.equal(outs[0][1], reference[0][1]) and not torch.equal(outs[0][0], reference[0][0])
        # 4 reference steps with both rows; MIGC's 2 steps with the uncond row; 2 vanilla steps with both rows
        assert calls == [2] * 4 + [1, 1] + [2, 2]
    finally:
        del layer.forward


def test_a1111_multidiffusion_restores_another_extensions_denoiser_wrapper(webui_modules, unet, text_model):
    from test_multidiffusion_hosts import KDenoiser, _model, _p

    p = _p(_model({"sd1": unet}, text_model, "sd1"), KDenoiser)
    inner = p.sampler.model_wrap_cfg.inner_model
    class_forward = type(inner).forward

    def other(x, sigma, **kwargs):  # another extension's wrapper around the inner model
        return class_forward(inner, x, sigma, **kwargs)

    inner.forward = other
    start_job(p, ({"enabled": True, "mode": "multidiffusion", "instances": [{"description": "a cat", "box": [0, 0, 0.5, 1]}]},))
    assert inner.__dict__["forward"] is not other
    finish_job(p)
    assert inner.__dict__["forward"] is other
