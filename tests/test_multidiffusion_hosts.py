"""MultiDiffusion region mode through the A1111 inner-model wrapper and the Forge function wrapper, on
real ldm UNets, against a literal per-region computation (one plain denoiser call per region, fused
by hand)."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from fake_forge import EpsPredictor
from helpers import build_family_unet
from lib_migc import job
from lib_migc.hosts import a1111, forge
from lib_migc.modes.multidiffusion.runtime import layout_region_masks
from lib_migc.params import MigcParams

BOXES = [{"description": "a red ball", "box": [0.0625, 0.125, 0.5, 0.875]},
         {"description": "a blue cube", "box": [0.4375, 0.25, 0.9375, 0.75]}]
W = H = 256


class KDenoiser(torch.nn.Module):
    """k_diffusion.external.CompVisDenoiser as A1111 builds it: k-space x and sigma in, x0 out."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model, self.predictor = sd_model, EpsPredictor()

    def sigma_to_t(self, sigma):
        return self.predictor.timestep(sigma)

    def forward(self, input, sigma, **kwargs):
        eps = self.inner_model.apply_model(self.predictor.calculate_input(sigma, input), self.sigma_to_t(sigma).float(), **kwargs)
        return self.predictor.calculate_denoised(sigma, eps, input)


TimestepsDenoiser = fake_webui.CompVisTimestepsDenoiser


@pytest.fixture(scope="module")
def unets():
    return {"sd1": build_family_unet("sd1", seed=2), "sdxl": build_family_unet("sdxl", seed=2)}


def _model(unets, text_model, family):
    model = (fake_webui.FakeSDModel(unets[family], text_model) if family == "sd1"
             else fake_webui.FakeFamilyModel(unets[family], text_model, family))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    model.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    return model


def _p(model, denoiser_cls, batch=1, steps=10):
    p = fake_webui.FakeProcessing(model, W, H, seeds=list(range(40, 40 + batch)), prompts=["a room"] * batch)
    p.steps, p.negative_prompt = steps, "blurry"
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=denoiser_cls(model)))
    return p


def _data(**overrides):
    data = {"enabled": True, "mode": "multidiffusion", "instances": BOXES, "md_bootstrap": 0.0, "weights": "absent.ckpt"}
    data.update(overrides)
    return data


def _split(c):
    return (c["crossattn"], c["vector"]) if isinstance(c, dict) else (c, None)


def _cond_dict(ctx, vec):
    return {"c_crossattn": [ctx], "c_concat": [torch.zeros(ctx.shape[0], 5, 1, 1)]} if vec is None else \
        {"crossattn": ctx, "vector": vec, "c_concat": [torch.zeros(ctx.shape[0], 5, 1, 1)]}


def _cfg_call(p, x, level, cond, uncond, step):
    """CFGDenoiser.forward as far as rows go: the callback, then one call with [cond rows, uncond rows]."""
    batch = x.shape[0]
    params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, level, step, p.steps, cond, uncond, denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    (cc, cv), (uc, uv) = _split(cond), _split(uncond)
    vec = None if cv is None else torch.cat([cv, uv])
    with torch.no_grad():
        return p.sampler.model_wrap_cfg.inner_model(torch.cat([x, x]), torch.cat([level, level]), cond=_cond_dict(torch.cat([cc, uc]), vec))[:2 * batch]


def _start(p, data, noise=None):
    job.before_process(p)
    job.process(p, (data,), a1111)
    job.before_sampling(p, noise=noise)


def _finish(p):
    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def _reference(p, x, level, cond, uncond, negatives=None, bootstrap=None, step=0, vp=False, background=None):
    """Literal MultiDiffusion: every region of every row through the plain denoiser alone, fused by hand."""
    model, denoiser = p.sd_model, type(p.sampler.model_wrap_cfg.inner_model)(p.sd_model)
    layout = MigcParams.from_api(_data()).layout
    masks = layout_region_masks(layout, W, H)
    descs = _split(model.get_learned_conditioning(layout.descriptions))
    negs = _split(model.get_learned_conditioning(negatives)) if negatives else None
    rows = []
    for kind, (ctx, vec) in ((0, _split(cond)), (1, _split(uncond))):
        for b in range(x.shape[0]):
            num, den = 0.0, 0.0
            for i in range(masks.shape[0]):
                c, v = ctx[b:b + 1], None if vec is None else vec[b:b + 1]
                if i == 0 and kind == 0 and background is not None:
                    c = _split(model.get_learned_conditioning([background]))[0]
                table = descs if kind == 0 else negs
                if i > 0 and table is not None:
                    c, v = table[0][i - 1:i], None if table[1] is None else table[1][i - 1:i]
                xi = x[b:b + 1]
                if bootstrap is not None and i > 0:
                    colour = bootstrap.backgrounds(b, step, masks.shape[0] - 1)[0, i - 1].view(1, -1, 1, 1)
                    n0 = bootstrap.noise0[b:b + 1]
                    if vp:
                        a = model.alphas_cumprod[level[b].long()]
                        background = a.sqrt() * colour + (1 - a).sqrt() * n0
                    else:
                        background = colour + level[b] * n0
                    xi = masks[i] * xi + (1 - masks[i]) * background
                with torch.no_grad():
                    out = denoiser(xi, level[b:b + 1], cond=_cond_dict(c, v))
                num, den = num + masks[i] * out, den + masks[i]
            rows.append(num / den)
    return torch.cat(rows)


def _inputs(model, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, H // 8, W // 8), generator=g)
    return x, model.get_learned_conditioning(["a room"] * batch), model.get_learned_conditioning(["blurry"] * batch)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a1111_wrapper_is_the_literal_region_method(webui_modules, unets, text_model, family):
    model = _model(unets, text_model, family)
    p = _p(model, KDenoiser, batch=2)
    x, cond, uncond = _inputs(model, 2)
    level = torch.tensor([3.0, 3.0])
    _start(p, _data())
    out = _cfg_call(p, x, level, cond, uncond, step=0)
    runtime = job.active_job().hooks["multidiffusion"].runtime
    assert runtime.calls == 1 and runtime.space == "k"  # all region rows in one batched call
    _finish(p)
    torch.testing.assert_close(out, _reference(p, x, level, cond, uncond), rtol=1e-4, atol=1e-5)
    assert "forward" not in p.sampler.model_wrap_cfg.inner_model.__dict__
    assert not p.comments


def test_bootstrapping_and_per_region_negatives_in_k_space(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    p = _p(model, KDenoiser, steps=10)
    x, cond, uncond = _inputs(model)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    boxes = [dict(BOXES[0], negative="green"), BOXES[1]]
    _start(p, _data(instances=boxes, md_bootstrap=0.2), noise=noise)
    boot = job.active_job().hooks["multidiffusion"].runtime.bootstrap
    assert boot is not None and boot.steps == 2
    outs = {step: _cfg_call(p, x, torch.tensor([2.5]), cond, uncond, step) for step in (1, 2)}
    _finish(p)
    for step, out in outs.items():
        ref = _reference(p, x, torch.tensor([2.5]), cond, uncond, negatives=["green", "blurry"],
                         bootstrap=boot if step < 2 else None, step=step)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    plain_boxes = _reference(p, x, torch.tensor([2.5]), cond, uncond, negatives=["green", "blurry"])
    assert (outs[1] - plain_boxes).abs().amax() > 1e-4  # bootstrapping changed step 1


def test_timesteps_samplers_bootstrap_in_vp_space(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    p = _p(model, TimestepsDenoiser, steps=10)
    x, cond, uncond = _inputs(model)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    _start(p, _data(md_bootstrap=0.5), noise=noise)
    runtime = job.active_job().hooks["multidiffusion"].runtime
    out = _cfg_call(p, x, torch.tensor([601]), cond, uncond, step=0)
    _finish(p)
    assert runtime.space == "vp"
    ref = _reference(p, x, torch.tensor([601]), cond, uncond, bootstrap=runtime.bootstrap, step=0, vp=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_chunked_calls_give_the_one_call_result(webui_modules, unets, text_model, rows):
    model = _model(unets, text_model, "sd1")
    x, cond, uncond = _inputs(model, 2)
    results = []
    for chunk in (0, rows):
        sys_opts = __import__("sys").modules["modules.shared"].opts
        sys_opts.migc_md_max_rows = chunk
        p = _p(model, KDenoiser, batch=2)
        _start(p, _data())
        results.append(_cfg_call(p, x, torch.tensor([3.0, 3.0]), cond, uncond, step=0))
        calls = job.active_job().hooks["multidiffusion"].runtime.calls
        _finish(p)
    expanded = 2 * 3 + 2  # cond rows: 3 regions each; uncond rows share the negative: once each
    assert calls == -(-expanded // rows)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)  # batch-size float noise only


def forge_rows(unet, text_model, data, x, sigma, cond, uncond, width=W, height=H):
    """One Forge job with ``data``: the cond and uncond predictions of one CFG step (Forge's calc_cond_uncond_batch)."""
    with fake_forge.backend_modules():
        f_model = fake_forge.ForgeSDModel(unet, text_model)
        q = fake_webui.FakeProcessing(f_model, width, height, seeds=[40], prompts=["a room"])
        q.steps, q.negative_prompt = 10, "blurry"
        job.before_process(q)
        job.process(q, (data,), forge)
        job.before_sampling(q)
        params = fake_webui.CFGDenoiserParams(x, None, sigma, 0, 10, cond, uncond, denoiser=SimpleNamespace(p=q))
        job.on_cfg_denoiser(params)
        entry = lambda ctx: {"model_conds": {"c_crossattn": fake_forge.CONDCrossAttn(ctx)}}  # noqa: E731
        with torch.no_grad():
            preds = fake_forge.calc_cond_uncond_batch(q.sd_model.forge_objects.unet.model, [entry(cond)], [entry(uncond)],
                                                      x, sigma, q.sd_model.forge_objects.unet.model_options)
        job.after_batch(q)
        job.postprocess(q, SimpleNamespace(images=[], infotexts=[]))
    return preds


def test_forge_wrapper_gives_the_a1111_result(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    x, cond, uncond = _inputs(model)
    sigma = torch.tensor([3.0])
    p = _p(model, KDenoiser)
    _start(p, _data())
    a1111_out = _cfg_call(p, x, sigma, cond, uncond, step=0)
    _finish(p)
    c_pred, u_pred = forge_rows(unets["sd1"], text_model, _data(), x, sigma, cond, uncond)
    torch.testing.assert_close(c_pred, a1111_out[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u_pred, a1111_out[1:], rtol=1e-4, atol=1e-5)


def test_a_plain_generation_after_the_mode_is_bit_identical(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    x, cond, uncond = _inputs(model)
    p = _p(model, KDenoiser)
    _start(p, _data())
    _cfg_call(p, x, torch.tensor([3.0]), cond, uncond, step=0)
    _finish(p)
    q = _p(model, KDenoiser)
    _start(q, {"enabled": False})
    after = _cfg_call(q, x, torch.tensor([3.0]), cond, uncond, step=0)
    _finish(q)
    with torch.no_grad():
        plain = KDenoiser(model)(torch.cat([x, x]), torch.tensor([3.0, 3.0]), cond=_cond_dict(torch.cat([cond, uncond]), None))
    assert torch.equal(after, plain)


@pytest.mark.parametrize("bad,words", [
    ({"instances": [{"description": "", "box": [0, 0, 1, 1]}]}, ["instances[0]", "'description'"]),
    ({"instances": [{"description": "x", "box": [0.5, 0, 0.2, 1]}]}, ["instances[0]", "x1 = 0.2"]),
    ({"md_bootstrap": 1.5}, ["'md_bootstrap'", "0 to 1"]),
    ({"mode": "regions"}, ["'mode'", "multidiffusion"]),
])
def test_malformed_input_is_refused_in_every_mode(webui_modules, bad, words):
    from lib_migc.core.errors import MigcError

    for mode in ("multidiffusion", "naive", "migc"):
        with pytest.raises(MigcError) as info:
            MigcParams.from_api({**_data(mode=mode), **bad})
        for word in words:
            assert word in str(info.value), str(info.value)


def test_the_layouts_own_global_prompt_is_the_background_region(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    p = _p(model, KDenoiser)
    x, cond, uncond = _inputs(model)
    _start(p, _data(use_main_prompt=False, global_prompt="a beach"))
    out = _cfg_call(p, x, torch.tensor([3.0]), cond, uncond, step=0)
    _finish(p)
    ref = _reference(p, x, torch.tensor([3.0]), cond, uncond, background="a beach")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out - _reference(p, x, torch.tensor([3.0]), cond, uncond)).abs().amax() > 1e-4
