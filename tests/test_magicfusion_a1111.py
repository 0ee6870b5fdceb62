"""MagicFusion through the A1111 adapter with two real tiny ldm UNets: model A in the fake WebUI model,
model B loaded from a standard SD1 checkpoint file (``model.diffusion_model.*`` keys) built from A's config."""
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import fake_webui
from helpers import build_unet, finish_job, start_job
from lib_migc import job
from lib_migc.core.errors import MigcError
from lib_migc.modes.magicfusion.method import snb_mask
from lib_migc.modes.magicfusion.runtime import MODEL_B
from lib_migc.params import MigcParams

UNET_YAML = """model:
  params:
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {{image_size: 32, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [4, 2, 1],
               num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_heads: 8, use_spatial_transformer: true,
               transformer_depth: 1, context_dim: {context}, use_checkpoint: false, legacy: false}}
"""
GUIDANCE, SIGMA, T = 7.5, 2.0, 500.0


class CFGDenoiserTimesteps:  # A1111's timestep-sampler denoiser (DDIM/PLMS/UniPC): its rows are ε, not x0
    def __init__(self, p):
        self.p, self.cond_scale_miltiplier = p, 1.0
        self.sampler = SimpleNamespace(sampler_extra_args={"cond_scale": GUIDANCE})


class CFGDenoiserKDiffusion(CFGDenoiserTimesteps):
    pass


class CompVisDenoiser(torch.nn.Module):
    """k_diffusion.external.CompVisDenoiser as A1111 wraps the model for k-diffusion samplers: k-space x and
    sigma in, ``input + eps * (-sigma)`` out (here every sigma maps to the timestep ``T``)."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model

    def sigma_to_t(self, sigma):
        return torch.full_like(sigma, T)

    def forward(self, input, sigma, **kwargs):
        scale = 1 / (float(sigma.flatten()[0]) ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(input * scale, self.sigma_to_t(sigma), **kwargs)
        return input + eps * (-sigma)[:, None, None, None]


INNER = {CFGDenoiserKDiffusion: CompVisDenoiser, CFGDenoiserTimesteps: fake_webui.CompVisTimestepsDenoiser}


def make_p(model, denoiser_class=CFGDenoiserKDiffusion, **kwargs):
    """A txt2img ``p`` whose sampler wraps the model the way A1111 does for ``denoiser_class``."""
    p = fake_webui.FakeProcessing(model, **kwargs)
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=INNER[denoiser_class](model)))
    return p


def save_checkpoint(unet, path, extra=True):
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    if extra:
        state["cond_stage_model.transformer.dummy"] = torch.zeros(3)
    save_file(state, str(path))


@pytest.fixture()
def fusion(webui_modules, tmp_path, unet, text_model):
    """(sd_model A, model B's reference UNet, its checkpoint title)."""
    unet_b = build_unet(model_channels=32, seed=7)
    path = tmp_path / "tiny-b.safetensors"
    save_checkpoint(unet_b, path)
    info = fake_webui.register_checkpoint(str(path), sha256="b0b0b0b0b0cafe")
    config = tmp_path / "tiny.yaml"
    config.write_text(UNET_YAML.format(context=768))
    model = fake_webui.FakeSDModel(unet, text_model)
    model.used_config = str(config)
    yield model, unet_b, info.title
    MODEL_B.clear()


def fusion_args(title, **extra):
    data = {"enabled": False, "magicfusion": {"enabled": True, "model_b": title, "switch_t": 0, **extra}}
    return (data,)


start, finish = start_job, finish_job


def cfg_step(p, x, cond, uncond, denoiser_class, t=T, sigma=SIGMA):
    """One CFGDenoiser.forward of A1111: callback, the sampler's inner model on [cond; uncond] rows,
    on_cfg_denoised."""
    n = x.shape[0]
    x_in = torch.cat([x, x])
    kdiff = denoiser_class is CFGDenoiserKDiffusion
    sigma_in = torch.full((2 * n,), sigma if kdiff else t)
    params = fake_webui.CFGDenoiserParams(x_in, None, sigma_in, 0, 4, cond, uncond, denoiser=denoiser_class(p))
    job.on_cfg_denoiser(params)
    inner = getattr(p, "sampler", None)
    inner = inner.model_wrap_cfg.inner_model if inner is not None else INNER[denoiser_class](p.sd_model)
    cond_in = {"c_crossattn": [torch.cat([cond, uncond])], "c_concat": [torch.zeros(2 * n, 5, 1, 1)]}
    with torch.no_grad():
        x_out = inner(x_in, sigma_in, cond=cond_in)
    job.on_cfg_denoised(fake_webui.CFGDenoisedParams(x_out, 0, 4, None))
    return x_out


def inputs(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, 32, 32), generator=g) * 3
    cond = model.get_learned_conditioning(["a lion with a crown"] * n)
    uncond = model.get_learned_conditioning([""] * n)
    return x, cond, uncond


def expected(unet_a, unet_b, x, cond, uncond, kdiff, context_b=None):
    """The method written out: both UNets on the same rows, SNB's mask, per-row selection."""
    n = x.shape[0]
    x_in = torch.cat([x, x])
    scale = 1 / (SIGMA ** 2 + 1) ** 0.5 if kdiff else 1.0
    ctx = torch.cat([cond, uncond])
    with torch.no_grad():
        ea = unet_a(x_in * scale, torch.full((2 * n,), T), context=ctx)
        eb = unet_b(x_in * scale, torch.full((2 * n,), T), context=ctx if context_b is None else context_b)
    mask = snb_mask(ea[:n], ea[n:], eb[:n], GUIDANCE, 1.0, 1.0)
    rows_a = x_in - SIGMA * ea if kdiff else ea
    rows_b = x_in - SIGMA * eb if kdiff else eb
    m = torch.cat([mask, mask])[:, None]
    return torch.where(m, rows_b, rows_a), mask


@pytest.mark.parametrize("denoiser", [CFGDenoiserKDiffusion, CFGDenoiserTimesteps])
def test_a_fused_step_blends_both_rows_per_pixel(fusion, unet, denoiser):
    model, unet_b, title = fusion
    x, cond, uncond = inputs(model)
    p = make_p(model, denoiser, seeds=[1, 2], prompts=["a lion with a crown"] * 2)
    start(p, fusion_args(title))
    out = cfg_step(p, x, cond, uncond, denoiser)
    finish(p)
    ref, mask = expected(unet, unet_b, x, cond, uncond, denoiser is CFGDenoiserKDiffusion)
    assert 0.05 < mask.float().mean() < 0.95, "both models must win somewhere for the test to mean anything"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert "forward" not in unet.__dict__, "nothing is left on A's UNet"
    assert "forward" not in p.sampler.model_wrap_cfg.inner_model.__dict__, "the model-call wrapper is removed after the batch"
    assert p.sd_model.model.diffusion_model is unet, "model A's UNet is back in place"
    info = MigcParams.from_infotext(p.extra_generation_params["MIGC"])
    assert info.magicfusion.model_b == title and '"model_b_hash":"b0b0b0b0b0"' in p.extra_generation_params["MIGC"]


def test_outside_the_window_model_b_is_not_run(fusion, unet):
    model, unet_b, title = fusion
    x, cond, uncond = inputs(model, n=1)
    p = make_p(model, prompts=["a lion with a crown"])
    start(p, fusion_args(title, window_mode="SNB-then-A", switch_t=600))  # SNB only for t > 600; this step is t = 500
    loaded = MODEL_B.get(MODEL_B._key, lambda: None)
    calls = []
    handle = loaded.register_forward_hook(lambda *a: calls.append(1))
    out = cfg_step(p, x, cond, uncond, CFGDenoiserKDiffusion)
    finish(p)
    handle.remove()
    plain = cfg_step(fake_webui.FakeProcessing(model), x, cond, uncond, CFGDenoiserKDiffusion)
    assert calls == [] and torch.equal(out, plain)


def test_prompt_b_goes_to_model_b_cond_rows_only(fusion, unet, text_model):
    model, unet_b, title = fusion
    x, cond, uncond = inputs(model, n=1)
    p = make_p(model, prompts=["a lion with a crown"])
    start(p, fusion_args(title, prompt_b="a cartoon lion"))
    out = cfg_step(p, x, cond, uncond, CFGDenoiserKDiffusion)
    finish(p)
    prompt_b = model.get_learned_conditioning(["a cartoon lion"])
    ref, _ = expected(unet, unet_b, x, cond, uncond, True, context_b=torch.cat([prompt_b, uncond]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_model_b_is_cached_and_freed_when_magicfusion_is_off(fusion):
    model, _, title = fusion
    p = make_p(model, prompts=["a lion"])
    start(p, fusion_args(title))
    first = weakref.ref(MODEL_B._value)
    finish(p)
    start(p, fusion_args(title))
    assert MODEL_B._value is first(), "the same model B is reused by the next job"
    finish(p)
    start(p, ({"enabled": False, "structure": {"enabled": True, "phrases": ["a lion"]}},))
    finish(p)
    gc.collect()
    assert not MODEL_B.loaded and first() is None, "a job without MagicFusion frees model B"


def test_bad_model_b_and_bad_pairs_stop_the_job_with_a_clear_error(fusion, tmp_path, unet):
    model, _, _ = fusion
    x, cond, uncond = inputs(model, n=1)
    sd2_like = build_unet(model_channels=32, seed=3, context_dim=1024)
    save_checkpoint(sd2_like, tmp_path / "sd2-like.safetensors")
    info = fake_webui.register_checkpoint(str(tmp_path / "sd2-like.safetensors"), sha256="5d25d25d25d2")
    for title, words in (("no-such-model", "model B 'no-such-model' is not in the checkpoint list"),
                         (info.title, "must both be Stable Diffusion 1.x")):
        p = make_p(model, prompts=["a lion"])
        start(p, fusion_args(title))
        with pytest.raises(MigcError, match=words):
            cfg_step(p, x, cond, uncond, CFGDenoiserKDiffusion)
        finish(p)
        assert not any("forward" in m.__dict__ for m in unet.modules())
    with pytest.raises(MigcError, match="needs a 'prompt_b'"):
        MigcParams.from_api({"enabled": False, "magicfusion": {"enabled": True, "model_b": "same"}})
    with pytest.raises(MigcError, match="'k_a' must be a finite number > 0"):
        MigcParams.from_api({"enabled": False, "magicfusion": {"enabled": True, "model_b": "x", "k_a": 0}})


def test_sdxl_declines_with_a_message(fusion, unet, text_model):
    _, _, title = fusion
    p = fake_webui.FakeProcessing(fake_webui.FakeSDModel(unet, text_model, "sdxl"))
    start(p, fusion_args(title))
    assert job.active_job() is None and any("MagicFusion was skipped" in c for c in p.comments)
    finish(p)
