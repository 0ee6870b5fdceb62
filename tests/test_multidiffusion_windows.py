"""MultiDiffusion windows (docs/modes/multidiffusion.md §1.4): the plan, the pure loop against a literal
float64 reference written from the spec, the runtime the hooks call, and both host adapters on a real
ldm UNet against a literal per-window, per-region computation."""
from types import SimpleNamespace

import pytest
import torch

import fake_webui
from lib_migc import job
from lib_migc.modes.multidiffusion import method as md
from lib_migc.modes.multidiffusion.mode import native_size, window_plan
from lib_migc.modes.multidiffusion.runtime import Bootstrap, RegionPrompts, RegionRuntime, layout_region_masks
from lib_migc.modes.multidiffusion.windows import Window, coverage, crop, official_windows, plan_windows
from lib_migc.params import MigcParams
from test_multidiffusion_hosts import KDenoiser, _cfg_call, _cond_dict, _finish, _model, _start, forge_rows, unets  # noqa: F401

GUIDANCE = 5.0


# ---------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("h,w", [(64, 64), (96, 64), (64, 96), (64, 576), (80, 120)])
def test_on_the_official_grid_the_plan_is_the_official_windows_in_order(h, w):
    assert plan_windows(h, w, 64, 64, 8) == official_windows(h, w)


def test_768_by_512_is_five_official_windows():
    windows = official_windows(96, 64)
    assert [(v.h0, v.w0) for v in windows] == [(0, 0), (8, 0), (16, 0), (24, 0), (32, 0)]


@pytest.mark.parametrize("h,w", [(h, w) for h in (8, 40, 64, 72, 100, 130) for w in (8, 56, 64, 68, 123, 200)])
def test_every_cell_of_any_canvas_is_covered_by_windows_inside_it(h, w):
    windows = plan_windows(h, w, 64, 64, 8)
    assert all(0 <= v.h0 < v.h1 <= h and 0 <= v.w0 < v.w1 <= w for v in windows)
    assert all(v.height == min(64, h) and v.width == min(64, w) for v in windows), "native size, clipped to a short side"
    assert coverage(windows, h, w).min() >= 1
    official = official_windows(h, w)
    assert all(v in windows for v in official), "the official windows are kept; extra ones only close the gaps"


def test_off_grid_sides_get_windows_aligned_to_the_far_edge():
    windows = plan_windows(64, 100, 64, 64, 8)
    assert [v.w0 for v in windows] == [0, 8, 16, 24, 32, 36]
    assert official_windows(64, 100)[-1].w1 == 96  # the official grid leaves columns 96..99 uncovered


def test_wrapped_windows_cover_every_column_equally_and_run_past_the_right_edge():
    windows = plan_windows(64, 128, 64, 64, 8, wrap=True)
    assert len(windows) == 16 and windows[-1].w1 == 184
    count = coverage(windows, 64, 128)
    assert torch.equal(count, torch.full_like(count, 8.0))
    x = torch.arange(128.0).expand(2, 64, 128)
    assert crop(x, windows[-1])[0, 0].tolist() == [float(c % 128) for c in range(120, 184)]


@pytest.mark.parametrize("family,v,expected", [("sd1", False, 512), ("sd2", False, 512), ("sd2", True, 768), ("sdxl", False, 1024)])
def test_the_native_window_follows_the_family(family, v, expected):
    model = SimpleNamespace(**{f"is_{family}": True}, parameterization="v" if v else "eps")
    assert native_size(model) == expected
    predictor = SimpleNamespace(prediction_type="v_prediction" if v else "epsilon")  # Forge: on its KModel's predictor
    forge_model = SimpleNamespace(**{f"is_{family}": True}, forge_objects=SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(predictor=predictor))))
    assert native_size(forge_model) == expected


def test_window_settings_choose_the_plan():
    sd1 = SimpleNamespace(is_sd1=True)
    auto = MigcParams(mode="multidiffusion")
    assert len(window_plan(auto, sd1, 512, 512)) == 1
    assert len(window_plan(auto, sd1, 512, 768)) == 5
    assert len(window_plan(MigcParams(mode="multidiffusion", md_window=-1), sd1, 4608, 512)) == 1
    assert len(window_plan(MigcParams(mode="multidiffusion", md_stride=128), sd1, 1024, 512)) == 5
    assert len(window_plan(MigcParams(mode="multidiffusion", md_window=256), sd1, 512, 512)) == 25


# ---------------------------------------------------------------------------------------------- the pure loop
def _case(h, w, boxes, steps=12, boot=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    r = len(boxes) + 1
    masks = md.region_masks(boxes, 8 * h, 8 * w, dtype=dtype)
    cond, uncond = torch.randn((r, 6, 16), generator=g, dtype=dtype), torch.randn((r, 6, 16), generator=g, dtype=dtype)
    x_T = torch.randn((1, 4, h, w), generator=g, dtype=dtype)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=dtype) ** 2
    ac = torch.cumprod(1 - betas, 0)
    timesteps = list(range(999, 0, -1000 // steps))[:steps]
    colours = torch.randn((7, 4), generator=g, dtype=dtype)
    weight = torch.randn((4, 4), generator=g, dtype=dtype) * 0.3
    proj = torch.randn((16, 4), generator=g, dtype=dtype) * 0.2

    def eps_model(x, t, ctx):
        """A local, context- and time-dependent toy: a 3x3 blur (zero padding) mixed across channels."""
        blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
        mixed = torch.einsum("bchw,cd->bdhw", blur, weight)
        return mixed + torch.tanh(x) * 0.5 + (ctx.mean(1) @ proj)[:, :, None, None] * (t.view(-1, 1, 1, 1) / 1000)

    return SimpleNamespace(masks=masks, cond=cond, uncond=uncond, x_T=x_T, ac=ac, timesteps=timesteps, colours=colours,
                           eps=eps_model, boot=boot, r=r)


def _bg_index(case, windows, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(case.colours), (case.boot, windows, case.r - 1), generator=g)


def _literal_official_windows(case, views, bg_index):
    """§1.4 as written: per window the cropped latent, masks and x_T; bootstrapping with the window's own
    draw; per-region CFG and DDIM step from the region's own input; Σ m·y and Σ m over every window and
    region, divided once (cells nobody covers: 0)."""
    x = case.x_T.clone()
    r = case.r
    for s, t in enumerate(case.timesteps):
        a_t = case.ac[t]
        a_p = case.ac[case.timesteps[s + 1]] if s + 1 < len(case.timesteps) else case.ac[0]
        value, count = torch.zeros_like(x), torch.zeros_like(x[:, :1])
        for v, (h0, h1, w0, w1) in enumerate(views):
            xv, mv, nv = x[:, :, h0:h1, w0:w1], case.masks[:, :, h0:h1, w0:w1], case.x_T[:, :, h0:h1, w0:w1]
            inputs = []
            for i in range(r):
                xi = xv[0]
                if i > 0 and s < case.boot:
                    colour = case.colours[bg_index[s, v, i - 1]].view(4, 1, 1)
                    bg = a_t.sqrt() * colour + (1 - a_t).sqrt() * nv[0]
                    xi = mv[i] * xi + (1 - mv[i]) * bg
                inputs.append(xi)
            inputs = torch.stack(inputs)
            eps = case.eps(torch.cat([inputs, inputs]), torch.full((2 * r,), t), torch.cat([case.uncond, case.cond]))
            for i in range(r):
                e = eps[i] + GUIDANCE * (eps[r + i] - eps[i])
                x0 = (inputs[i] - (1 - a_t).sqrt() * e) / a_t.sqrt()
                y = a_p.sqrt() * x0 + (1 - a_p).sqrt() * e
                value[0, :, h0:h1, w0:w1] += mv[i] * y
                count[0, :, h0:h1, w0:w1] += mv[i]
        x = torch.where(count > 0, value / count.clamp(min=1e-300), value)
    return x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CANVASES = {
    "768x512, five official windows": (12, 8, [(8, 8, 40, 56), (24, 40, 64, 88)], official_windows(12, 8, 8, 1)),
    "edge-aligned extra windows": (10, 13, [(0, 8, 48, 64), (56, 16, 104, 80)], plan_windows(10, 13, 8, 8, 2)),
}


@pytest.mark.parametrize("name", sorted(CANVASES))
@pytest.mark.parametrize("fusion", ["official", "eps", "x0"])
def test_the_pure_loop_with_views_is_the_literal_reference(name, fusion):
    h, w, boxes, windows = CANVASES[name]
    case = _case(h, w, boxes)
    views = [(v.h0, v.h1, v.w0, v.w1) for v in windows]
    bg_index = _bg_index(case, len(views))
    expected = _literal_official_windows(case, views, bg_index)
    out = md.sample_regions_ddim(case.eps, case.x_T, case.cond, case.uncond, case.masks, case.timesteps, case.ac,
                                 GUIDANCE, case.boot, case.colours, bg_index, fusion=fusion, views=views)
    assert _rel(out, expected) <= 1e-12
    one = md.sample_regions_ddim(case.eps, case.x_T, case.cond, case.uncond, case.masks, case.timesteps, case.ac,
                                 GUIDANCE, case.boot, case.colours, bg_index[:, :1], fusion=fusion)
    assert _rel(one, expected) > 1e-3, "windows change the result (the toy is local, the windows see less)"


def test_one_view_over_the_canvas_is_the_loop_without_views():
    case = _case(8, 8, [(8, 8, 40, 56)])
    bg_index = _bg_index(case, 1)
    args = (case.eps, case.x_T, case.cond, case.uncond, case.masks, case.timesteps, case.ac, GUIDANCE, case.boot, case.colours)
    assert torch.equal(md.sample_regions_ddim(*args, bg_index, views=[(0, 8, 0, 8)]),
                       md.sample_regions_ddim(*args, bg_index[:, 0]))


# ---------------------------------------------------------------------------------------------- the runtime
def _euler_k(case, runtime, bg_index, monkeypatch):
    """The WebUI's trajectory: k-diffusion Euler on the DDIM sigma grid, the runtime fusing each call."""
    monkeypatch.setattr(Bootstrap, "backgrounds", lambda self, image, step, regions, windows=1: case.colours[bg_index[step]])
    sigma_of = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    step_of = {float(sigma_of(case.ac[t])): s for s, t in enumerate(case.timesteps)}

    def denoiser(xs, sigmas, contexts, vectors, source):
        t = torch.tensor([case.timesteps[step_of[float(s)]] for s in sigmas])
        c_in = 1 / (sigmas ** 2 + 1).sqrt()
        return xs - sigmas.view(-1, 1, 1, 1) * case.eps(xs * c_in.view(-1, 1, 1, 1), t, contexts)

    x = case.x_T / case.ac[case.timesteps[0]].sqrt()
    for s, t in enumerate(case.timesteps):
        prev = case.timesteps[s + 1] if s + 1 < len(case.timesteps) else 0
        sigma, sigma_next = sigma_of(case.ac[t]), sigma_of(case.ac[prev])
        rows = runtime.denoise(denoiser, torch.cat([x, x]), torch.stack([sigma, sigma]),
                               torch.stack([case.cond[0], case.uncond[0]]), None, [True, False], [0, 0], s)
        denoised = rows[1] + GUIDANCE * (rows[0] - rows[1])
        x = x + (sigma_next - sigma) * (x - denoised[None]) / sigma
    return x * case.ac[0].sqrt()


def _runtime(case, windows, chunk_rows=0, bootstrap=True):
    boot = Bootstrap(colours=case.colours, noise0=case.x_T, seeds=[0], steps=case.boot) if bootstrap else None
    return RegionRuntime(case.masks, RegionPrompts(cond=case.cond[1:], uncond=case.uncond[1:]), boot, space="k",
                         chunk_rows=chunk_rows, windows=windows)


@pytest.mark.parametrize("name", sorted(CANVASES))
def test_the_runtime_the_hooks_call_lands_where_the_literal_reference_lands(name, monkeypatch):
    h, w, boxes, windows = CANVASES[name]
    case = _case(h, w, boxes)
    bg_index = _bg_index(case, len(windows))
    expected = _literal_official_windows(case, [(v.h0, v.h1, v.w0, v.w1) for v in windows], bg_index)
    assert _rel(_euler_k(case, _runtime(case, windows), bg_index, monkeypatch), expected) <= 1e-9


@pytest.mark.parametrize("chunk_rows", [1, 5])
def test_chunking_and_window_order_change_nothing(chunk_rows, monkeypatch):
    h, w, boxes, windows = CANVASES["edge-aligned extra windows"]
    case = _case(h, w, boxes)
    bg_index = _bg_index(case, len(windows))
    base = _euler_k(case, _runtime(case, windows), bg_index, monkeypatch)
    chunked = _euler_k(case, _runtime(case, windows, chunk_rows), bg_index, monkeypatch)
    reversed_order = _euler_k(case, _runtime(case, windows[::-1]), bg_index.flip(1), monkeypatch)
    assert _rel(chunked, base) <= 1e-12 and _rel(reversed_order, base) <= 1e-12


def test_one_window_is_todays_fusion_bit_for_bit():
    """One window over the canvas (every canvas before windows, and any that fits) fuses exactly as the
    region mode did: Σ m·out / Σ m over the regions of a cond row, an uncond row all regions share as is."""
    case = _case(8, 8, [(8, 8, 40, 56), (24, 16, 64, 48)])
    calls = []

    def denoiser(xs, sigmas, contexts, vectors, source):
        out = torch.sin(xs * 3 + contexts.mean((1, 2)).view(-1, 1, 1, 1)).float()
        calls.append(out)
        return out

    runtime = RegionRuntime(case.masks.float(), RegionPrompts(cond=case.cond[1:].float()), None, space="k")
    x = case.x_T.float().expand(2, -1, -1, -1)
    out = runtime.denoise(denoiser, x, torch.tensor([2.0, 2.0]), torch.stack([case.cond[0], case.uncond[0]]).float(),
                          None, [True, False], [0, 0], 0)
    rows = calls[0]
    assert rows.shape[0] == case.r + 1
    assert torch.equal(out[0], md.fuse_rows(rows[None, :case.r], case.masks.float())[0])
    assert torch.equal(out[1], rows[case.r])


def test_one_window_draws_the_backgrounds_versions_before_windows_drew():
    colours = torch.randn((20, 4))
    boot = Bootstrap(colours=colours, noise0=torch.zeros((1, 4, 8, 8)), seeds=[77], steps=3)
    g = torch.Generator().manual_seed(77 * 1009 + 2)
    assert torch.equal(boot.backgrounds(0, 2, 3, 1)[0], colours[torch.randint(20, (3,), generator=g)])


def test_wrapped_windows_make_the_fused_prediction_periodic():
    """With wrap the left and right edge columns continue each other: the fused prediction of a rolled
    latent is the rolled prediction, and the last column acts on the first; without wrap they are far apart."""
    case = _case(8, 24, [])
    den = lambda xs, sigmas, contexts, vectors, source: case.eps(xs, torch.full((xs.shape[0],), 500), contexts)  # noqa: E731
    prompts = RegionPrompts(cond=case.cond[1:])

    def fused(x, wrap):
        runtime = RegionRuntime(case.masks, prompts, None, space="k", windows=plan_windows(8, 24, 8, 8, 2, wrap=wrap))
        return runtime.denoise(den, x, torch.tensor([2.0]), case.cond[:1], None, [True], [0], 0)

    x = case.x_T
    for shift in (2, 10):
        torch.testing.assert_close(fused(x.roll(shift, -1), True), fused(x, True).roll(shift, -1), rtol=0, atol=1e-12)
    poked = x.clone()
    poked[..., -1] += 1.0
    assert (fused(poked, True) - fused(x, True))[..., 0].abs().amax() > 1e-3, "the right edge acts on the left one"
    assert torch.equal((fused(poked, False) - fused(x, False))[..., 0], torch.zeros_like(x[..., 0])), "without wrap it does not"
    assert (fused(x.roll(2, -1), False) - fused(x, False).roll(2, -1)).abs().amax() > 1e-3


# ---------------------------------------------------------------------------------------------- the hosts
WIDTH, HEIGHT = 128, 64  # latent 8 x 16: with 64 px windows and a 16 px stride, 5 windows
BOXES = [{"description": "a red ball", "box": [0.0625, 0.125, 0.5, 0.875]},
         {"description": "a blue cube", "box": [0.5, 0.25, 0.9375, 0.75]}]


def _data(**overrides):
    data = {"enabled": True, "mode": "multidiffusion", "instances": BOXES, "md_bootstrap": 0.0, "weights": "absent.ckpt",
            "md_window": 64, "md_stride": 16}
    data.update(overrides)
    return data


def _p(model, steps=10):
    p = fake_webui.FakeProcessing(model, WIDTH, HEIGHT, seeds=[40], prompts=["a room"])
    p.steps, p.negative_prompt = steps, "blurry"
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=KDenoiser(model)))
    return p


def _reference(model, data, x, sigma, cond, uncond):
    """Every window of every region of every row through the plain denoiser alone, summed and divided by hand."""
    params = MigcParams.from_api(data)
    windows = window_plan(params, model, WIDTH, HEIGHT)
    masks = layout_region_masks(params.layout, WIDTH, HEIGHT)
    descriptions = model.get_learned_conditioning(params.layout.descriptions) if len(params.layout) else None
    denoiser = KDenoiser(model)
    rows = []
    for kind, ctx in ((0, cond), (1, uncond)):
        num, den = torch.zeros_like(x[0]), torch.zeros_like(x[0, :1])
        for v in windows:
            xv, mv = x[:, :, v.h0:v.h1, v.w0:v.w1], masks[:, :, v.h0:v.h1, v.w0:v.w1]
            regions = range(masks.shape[0]) if kind == 0 else [0]
            for i in regions:
                c = ctx if i == 0 else descriptions[i - 1:i]
                with torch.no_grad():
                    out = denoiser(xv, sigma, cond=_cond_dict(c, None))[0]
                m = mv[i] if kind == 0 else torch.ones_like(mv[0])
                num[:, v.h0:v.h1, v.w0:v.w1] += m * out
                den[:, v.h0:v.h1, v.w0:v.w1] += m
        rows.append(num / den)
    return torch.stack(rows), len(windows)


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=g)
    return x, model.get_learned_conditioning(["a room"]), model.get_learned_conditioning(["blurry"])


@pytest.mark.parametrize("instances", [BOXES, []], ids=["boxes", "panorama without boxes"])
def test_a1111_runs_windows_through_the_inner_model(webui_modules, unets, text_model, instances):
    model = _model(unets, text_model, "sd1")
    p = _p(model)
    x, cond, uncond = _inputs(model)
    sigma = torch.tensor([3.0])
    data = _data(instances=instances)
    _start(p, data)
    out = _cfg_call(p, x, sigma, cond, uncond, step=0)
    runtime = job.active_job().hooks["multidiffusion"].runtime
    _finish(p)
    expected, count = _reference(model, data, x, sigma, cond, uncond)
    assert count == len(runtime.windows) == 5
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert "md_window" in p.extra_generation_params["MIGC"]
    assert MigcParams.from_infotext(p.extra_generation_params["MIGC"]).md_stride == 16
    with torch.no_grad():
        plain = KDenoiser(model)(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_cond_dict(torch.cat([cond, uncond]), None))
    assert (out - plain).abs().amax() > 1e-3


def test_a_canvas_that_fits_one_window_without_boxes_is_left_alone(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    p = _p(model)
    _start(p, _data(instances=[], md_window=0))
    assert job.active_job() is None or "multidiffusion" not in job.active_job().hooks
    _finish(p)
    assert any("nothing to do" in comment for comment in p.comments)


def test_forge_runs_the_same_windows(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    x, cond, uncond = _inputs(model)
    sigma = torch.tensor([3.0])
    expected, _ = _reference(model, _data(), x, sigma, cond, uncond)
    c_pred, u_pred = forge_rows(unets["sd1"], text_model, _data(), x, sigma, cond, uncond, WIDTH, HEIGHT)
    torch.testing.assert_close(c_pred, expected[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u_pred, expected[1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,words", [
    ({"md_window": 100}, ["'md_window'", "multiple of 8"]),
    ({"md_window": 32}, ["'md_window'", "from 64"]),
    ({"md_stride": 0}, ["'md_stride'", "from 8"]),
    ({"md_stride": "64"}, ["'md_stride'", "whole number"]),
    ({"md_wrap": "yes"}, ["'md_wrap'", "true or false"]),
])
def test_bad_window_fields_are_named(bad, words):
    from lib_migc.core.errors import MigcError

    with pytest.raises(MigcError) as caught:
        MigcParams.from_api(_data(**bad))
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_an_infotext_from_before_windows_regenerates_with_one_window_and_new_ones_keep_theirs():
    old = '{"mode":"multidiffusion","md_bootstrap":0.4,"instances":[{"description":"a cat","box":[0,0,0.5,1]}]}'
    assert MigcParams.from_infotext(old).md_window == -1
    new = MigcParams.from_api(_data(md_wrap=True))
    assert MigcParams.from_infotext(new.to_infotext()) == new
    assert "md_window" not in MigcParams(mode="migc").to_infotext(), "the other modes' infotexts do not grow"
    assert MigcParams.from_ui(*new.ui_values()) == new


def test_windows_follow_the_hires_pass_size_and_apply_to_img2img(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    x, cond, uncond = _inputs(model)
    sigma = torch.tensor([3.0])
    expected, _ = _reference(model, _data(), x, sigma, cond, uncond)
    p = fake_webui.FakeProcessing(model, WIDTH // 2, HEIGHT // 2, seeds=[40], prompts=["a room"])
    p.steps, p.negative_prompt = 10, "blurry"
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=KDenoiser(model)))
    p.enable_hr, p.hr_upscale_to_x, p.hr_upscale_to_y = True, WIDTH, HEIGHT
    _start(p, _data(hires=True, md_bootstrap=0.5), noise=torch.randn((1, 4, HEIGHT // 16, WIDTH // 16)))
    first = job.active_job().hooks["multidiffusion"].runtime
    assert len(first.windows) == 1 and first.bootstrap is not None, "the first pass fits one window"
    p.is_hr_pass = True
    job.before_sampling(p, noise=torch.randn(x.shape))
    hires = job.active_job().hooks["multidiffusion"].runtime
    assert len(hires.windows) == 5 and hires.bootstrap is None
    torch.testing.assert_close(_cfg_call(p, x, sigma, cond, uncond, step=0), expected, rtol=1e-4, atol=1e-5)
    _finish(p)

    q = fake_webui.FakeProcessing(model, WIDTH, HEIGHT, seeds=[40], prompts=["a room"])
    q.steps, q.negative_prompt, q.init_images = 10, "blurry", [object()]
    q.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=KDenoiser(model)))
    _start(q, _data(md_bootstrap=0.5), noise=torch.randn(x.shape))
    runtime = job.active_job().hooks["multidiffusion"].runtime
    assert len(runtime.windows) == 5 and runtime.bootstrap is None, "img2img: windows, no bootstrapping"
    torch.testing.assert_close(_cfg_call(q, x, sigma, cond, uncond, step=0), expected, rtol=1e-4, atol=1e-5)
    _finish(q)


def test_sdxl_windows_carry_their_crop_coordinates_in_the_size_conditioning():
    """sgm's ConcatTimestepEmbedderND (A1111) and Forge's Timestep(256): per number cos(v·f_k), sin(v·f_k),
    f_k = 10000^(-k/128); y = [pooled 1280 | original size 512 | crop top-left 512 | target size 512]."""
    import math

    from lib_migc.modes.multidiffusion.windows import with_crop_coordinates

    y = torch.randn((2816,), dtype=torch.float64)
    out = with_crop_coordinates(y, Window(8, 72, 24, 88))
    k = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000) * k / 128)
    expected = torch.cat([torch.cos(64 * f), torch.sin(64 * f), torch.cos(192 * f), torch.sin(192 * f)])
    torch.testing.assert_close(out[1792:2304], expected, rtol=0, atol=5e-5)  # float32 arguments, as sgm computes them
    assert torch.equal(out[:1792], y[:1792]) and torch.equal(out[2304:], y[2304:])
    assert torch.equal(with_crop_coordinates(y[:1280], Window(8, 72, 24, 88)), y[:1280]), "only SDXL's y changes"


def test_windows_go_through_the_unet_a_few_rows_at_a_time_without_a_gpu(webui_modules, monkeypatch):
    """Memory is a window's, not the canvas's: on a CPU host a panorama's rows are not all sent at once."""
    import sys

    from lib_migc.modes.multidiffusion.mode import ROWS_WITHOUT_GPU, chunk_rows

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opts = sys.modules["modules.shared"].opts
    monkeypatch.setattr(opts, "migc_md_max_rows", 0, raising=False)
    p = SimpleNamespace(sd_model=SimpleNamespace())
    assert chunk_rows(p, (64, 64), torch.float32, windows=1) == 0, "one window: the rows of one canvas, as before"
    assert chunk_rows(p, (64, 64), torch.float32, windows=9) == ROWS_WITHOUT_GPU
    monkeypatch.setattr(opts, "migc_md_max_rows", 6)
    assert chunk_rows(p, (64, 64), torch.float32, windows=9) == 6, "the setting wins"


def test_a_panorama_whose_first_pass_fits_one_window_samples_it_plainly(webui_modules, unets, text_model):
    model = _model(unets, text_model, "sd1")
    p = fake_webui.FakeProcessing(model, WIDTH // 2, HEIGHT // 2, seeds=[40], prompts=["a room"])
    p.steps, p.enable_hr, p.hr_upscale_to_x, p.hr_upscale_to_y = 10, True, 0, 0  # hires size not known yet
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=KDenoiser(model)))
    _start(p, _data(instances=[], hires=True))
    assert "multidiffusion" not in job.active_job().hooks, "the first pass fits one window: nothing installed"
    p.hr_upscale_to_x, p.hr_upscale_to_y, p.is_hr_pass = WIDTH, HEIGHT, True
    job.before_sampling(p, noise=None)
    assert len(job.active_job().hooks["multidiffusion"].runtime.windows) == 5
    _finish(p)


def test_window_vectors_give_each_row_its_crop_coordinates_and_share_copies_of_shared_vectors():
    from lib_migc.modes.multidiffusion.windows import window_vectors, with_crop_coordinates

    own, box = torch.randn((2816,)), torch.randn((2816,))
    window = Window(8, 72, 24, 88)
    out = window_vectors([own, box, own], window)
    for got, vector in zip(out, [own, box, own]):
        assert torch.equal(got, with_crop_coordinates(vector, window))
    assert out[0] is out[2], "one copy per distinct vector"
    pooled = torch.randn((1280,))
    assert window_vectors([None, None], window) == [None, None]
    assert window_vectors([pooled], window)[0] is pooled, "only SDXL's y changes"
