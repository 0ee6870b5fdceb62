"""MagicFusion through the Forge adapter: model B runs inside Forge's sampling function (a stand-in with
the real call order and signatures), on two real tiny ldm UNets."""

import pytest
import torch

import fake_forge
import fake_webui
from helpers import build_unet, finish_job, start_job
from lib_migc.core.errors import MigcError
from lib_migc.hosts import forge
from lib_migc.modes.magicfusion.method import snb_mask
from lib_migc.modes.magicfusion.runtime import MODEL_B
from test_magicfusion_a1111 import fusion_args, save_checkpoint

TINY = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
GUIDANCE = 7.5


def conds(context):
    return [{"model_conds": {"c_crossattn": fake_forge.CONDCrossAttn(context)}, "control": "controlnet of A"}]


def test_forge_post_cfg_blend_matches_the_method(webui_modules, tmp_path, text_model):
    unet_a, unet_b = build_unet(seed=0), build_unet(seed=7)
    unet_a.config = dict(TINY)  # Forge's UNet keeps its constructor config; B is built from it
    save_checkpoint(unet_b, tmp_path / "tiny-b.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "tiny-b.safetensors"), sha256="f0f0f0f0f0f0")
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet_a, text_model)
        p = fake_webui.FakeProcessing(model, seeds=[1, 2], prompts=["a lion with a crown"] * 2)
        start_job(p, fusion_args(info.title), forge)
        patcher = p.sd_model.forge_objects.unet
        assert [m.model for m in patcher.extra_model_patchers_during_sampling] == [MODEL_B._value], \
            "B is handed to Forge's memory manager"
        g = torch.Generator().manual_seed(1)
        x = torch.randn((2, 4, 32, 32), generator=g) * 3
        sigma = torch.full((2,), 2.0)
        cond_ctx = model.get_learned_conditioning(["a lion with a crown"] * 2)
        uncond_ctx = model.get_learned_conditioning([""] * 2)
        with torch.no_grad():
            out = fake_forge.sampling_function_inner(patcher, x, sigma, conds(uncond_ctx), conds(cond_ctx), GUIDANCE)
        finish_job(p)
    ka, kb = fake_forge.KModel(unet_a), fake_forge.KModel(unet_b)
    with torch.no_grad():
        d = {(m, c): k.apply_model(x, sigma, c_crossattn=ctx) for m, k in (("a", ka), ("b", kb))
             for c, ctx in (("c", cond_ctx), ("u", uncond_ctx))}
    eps = {key: (x - value) / 2.0 for key, value in d.items()}
    mask = snb_mask(eps["a", "c"], eps["a", "u"], eps["b", "c"], GUIDANCE, 1.0, 1.0)
    assert 0.05 < mask.float().mean() < 0.95
    m = mask[:, None]
    cond, uncond = torch.where(m, d["b", "c"], d["a", "c"]), torch.where(m, d["b", "u"], d["a", "u"])
    torch.testing.assert_close(out, uncond + GUIDANCE * (cond - uncond), rtol=1e-4, atol=1e-4)
    MODEL_B.clear()


def test_forge_cfg1_and_outside_the_window_leave_a_alone(webui_modules, tmp_path, text_model):
    unet_a, unet_b = build_unet(seed=0), build_unet(seed=7)
    unet_a.config = dict(TINY)
    save_checkpoint(unet_b, tmp_path / "tiny-b.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "tiny-b.safetensors"), sha256="f0f0f0f0f0f0")
    x, sigma = torch.randn((1, 4, 32, 32)), torch.full((1,), 2.0)  # σ = 2 is t ≈ 610
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet_a, text_model)
        ctx = model.get_learned_conditioning(["a lion"])
        plain = {s: fake_forge.sampling_function_inner(model.forge_objects.unet, x, sigma, conds(ctx * 0), conds(ctx), s) for s in (1.0, 7.5)}
        for args, scale in ((fusion_args(info.title), 1.0), (fusion_args(info.title, switch_t=700), 7.5)):
            p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet_a, text_model), prompts=["a lion"])
            start_job(p, args, forge)
            with torch.no_grad():
                out = fake_forge.sampling_function_inner(p.sd_model.forge_objects.unet, x, sigma, conds(ctx * 0), conds(ctx), scale)
            finish_job(p)
            assert torch.equal(out, plain[scale])
    MODEL_B.clear()


def test_a_job_without_magicfusion_frees_model_b_from_forges_memory_manager_too(webui_modules, tmp_path, text_model):
    import gc
    import sys
    import weakref

    unet_a, unet_b = build_unet(seed=0), build_unet(seed=7)
    unet_a.config = dict(TINY)
    save_checkpoint(unet_b, tmp_path / "tiny-b.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "tiny-b.safetensors"), sha256="f0f0f0f0f0f0")
    with fake_forge.backend_modules():
        p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet_a, text_model), prompts=["a lion"])
        start_job(p, fusion_args(info.title), forge)
        fake_forge.sampling_prepare(p.sd_model.forge_objects.unet)
        finish_job(p)
        loaded = sys.modules["backend.memory_management"].current_loaded_models
        held = weakref.ref(MODEL_B._value)
        assert held() in [entry.model.model for entry in loaded]
        del p
        plain = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet_a, text_model), prompts=["a lion"])
        start_job(plain, (False,), forge)
        finish_job(plain)
        gc.collect()
        assert held() not in [entry.model.model for entry in loaded] and held() is None


def _fused_step(p, x, sigma, cond_ctx, uncond_ctx):
    with torch.no_grad():
        return fake_forge.sampling_function_inner(p.sd_model.forge_objects.unet, x, sigma, conds(uncond_ctx), conds(cond_ctx), GUIDANCE)


def test_forge_same_model_b_is_model_a_with_prompt_b(webui_modules, text_model):
    """Model B "same" on Forge: the loaded UNet itself, prompt B on its cond rows (the method written out)."""
    unet_a = build_unet(seed=0)
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn((1, 4, 32, 32), generator=g) * 3, torch.full((1,), 2.0)
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet_a, text_model)
        cond_ctx, uncond_ctx = model.get_learned_conditioning(["a lion with a crown"]), model.get_learned_conditioning([""])
        prompt_b = model.get_learned_conditioning(["a cartoon lion"])
        p = fake_webui.FakeProcessing(model, prompts=["a lion with a crown"])
        start_job(p, fusion_args("same", prompt_b="a cartoon lion"), forge)
        out = _fused_step(p, x, sigma, cond_ctx, uncond_ctx)
        finish_job(p)
    ka = fake_forge.KModel(unet_a)
    with torch.no_grad():
        d_ac, d_au, d_bc = (ka.apply_model(x, sigma, c_crossattn=ctx) for ctx in (cond_ctx, uncond_ctx, prompt_b))
    eps = lambda d: (x - d) / 2.0  # noqa: E731
    mask = snb_mask(eps(d_ac), eps(d_au), eps(d_bc), GUIDANCE, 1.0, 1.0)
    assert 0.05 < mask.float().mean() < 0.95, "both predictions must win somewhere for the test to mean anything"
    cond = torch.where(mask[:, None], d_bc, d_ac)  # the uncond rows of A and "same" B are the same prediction
    torch.testing.assert_close(out, d_au + GUIDANCE * (cond - d_au), rtol=1e-4, atol=1e-4)


def test_forge_chains_another_extensions_model_function_wrapper(webui_modules, tmp_path, text_model):
    """Another extension's model-function wrapper (Forge Couple, Regional Prompter) still sees every call of
    A's rows under MagicFusion, and the image is what MagicFusion makes without it; MultiDiffusion, which
    builds rows of its own, stops with a message instead."""
    unet_a, unet_b = build_unet(seed=0), build_unet(seed=7)
    unet_a.config = dict(TINY)
    save_checkpoint(unet_b, tmp_path / "tiny-b.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "tiny-b.safetensors"), sha256="f0f0f0f0f0f0")
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn((1, 4, 32, 32), generator=g) * 3, torch.full((1,), 2.0)
    seen = []

    def other(apply_model, args):
        seen.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet_a, text_model)
        cond_ctx, uncond_ctx = model.get_learned_conditioning(["a lion"]), model.get_learned_conditioning([""])
        outs = []
        for wrapped in (False, True):
            p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet_a, text_model), prompts=["a lion"])
            if wrapped:
                p.sd_model.forge_objects.unet.set_model_unet_function_wrapper(other)
            start_job(p, fusion_args(info.title), forge)
            outs.append(_fused_step(p, x, sigma, cond_ctx, uncond_ctx))
            finish_job(p)
        assert seen == [2], "the other wrapper ran for the step's batched call"
        assert torch.equal(outs[0], outs[1])
        p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet_a, text_model), prompts=["a lion"])
        p.sd_model.forge_objects.unet.set_model_unet_function_wrapper(other)
        p.steps = 4
        boxes = [{"description": "a lion", "box": [0.1, 0.1, 0.6, 0.6]}]
        start_job(p, ({"enabled": True, "mode": "multidiffusion", "instances": boxes, "md_bootstrap": 0.0},), forge)
        with pytest.raises(MigcError, match="another extension already wraps Forge's UNet function"):
            _fused_step(p, x, sigma, cond_ctx, uncond_ctx)
        finish_job(p)
    MODEL_B.clear()
