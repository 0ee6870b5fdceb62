"""The proof that the region mode is MultiDiffusion: reproduce the official code's stored outputs
(../shared/data/modes/multidiffusion/, toy eps model, float64) with lib_migc.modes.multidiffusion.method."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import load_shared_module
from lib_migc.modes.multidiffusion import method as md

CASE = "c1_sq_default"


@pytest.fixture(scope="module")
def case(shared_dir):
    inputs = load_shared_module("data/modes/multidiffusion/inputs.py", "multidiffusion_inputs")
    data = inputs.make_case_inputs(CASE)
    ref = load_file(str(shared_dir / "data" / "modes" / "multidiffusion" / f"{CASE}.safetensors"))
    return dict(inputs=inputs, data=data, ref=ref, model=inputs.ToyEps())


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _run(case, masks=None, fusion="eps", dtype=torch.float64, x_T=None, bootstrap=True, swap=False, euler=False):
    d = case["data"]
    masks = md.region_masks([tuple(b) for b in d["boxes"].tolist()], 512, 512) if masks is None else masks
    cond, uncond = (d["uncond"], d["cond"]) if swap else (d["cond"], d["uncond"])
    args = (case["model"], (d["x_T"] if x_T is None else x_T).to(dtype), cond.to(dtype), uncond.to(dtype), masks.to(dtype),
            d["timesteps"].tolist(), d["alphas_cumprod"].to(dtype), float(d["guidance"]), 20 if bootstrap else 0,
            d["bg_values"].to(dtype), d["bg_index"][:, 0])
    if euler:
        return md.sample_regions_euler_k(*args)
    return md.sample_regions_ddim(*args, fusion=fusion)


def test_regenerated_inputs_are_the_recorded_ones(case):
    inputs, d, ref = case["inputs"], case["data"], case["ref"]
    for name in ("masks", "cond", "uncond", "x_T", "bg_index", "bg_values", "alphas_cumprod", "timesteps", "boxes"):
        assert torch.equal(d[name], ref[f"in_{name}"]), name


def test_regenerated_inputs_match_the_recorded_sha256(case, shared_dir):
    """The header's checksums cover every input, including the colours, which are stored only as a hash."""
    from safetensors import safe_open

    with safe_open(str(shared_dir / "data" / "modes" / "multidiffusion" / f"{CASE}.safetensors"), "pt") as f:
        header = f.metadata()
    names = [k[len("sha256_"):] for k in header if k.startswith("sha256_")]
    assert "colours" in names
    for name in names:
        assert case["inputs"].tensor_sha256(case["data"][name]) == header[f"sha256_{name}"], name


def test_masks_are_exact(case):
    d = case["data"]
    masks = md.region_masks([tuple(b) for b in d["boxes"].tolist()], 512, 512)
    assert torch.equal(masks, case["ref"]["in_masks"])


@pytest.mark.parametrize("fusion", ["eps", "x0", "official"])
def test_one_step_matches_the_official_step(case, fusion):
    d, ref = case["data"], case["ref"]
    s = 20
    t, t_prev = int(d["timesteps"][s]), int(d["timesteps"][s + 1])
    assert int(ref["s20_t"]) == t
    ac = d["alphas_cumprod"]
    out = md.STEPS[fusion](ref["s20_x_t"].double(), ref["s20_eps_uncond"].double(), ref["s20_eps_cond"].double(),
                           ref["in_masks"].double(), float(d["guidance"]), ac[t], ac[t_prev])
    assert _rel(out, ref["s20_x_prev_official"]) <= 1e-5


@pytest.mark.parametrize("fusion", ["eps", "x0", "official", "euler_k"])
def test_full_trajectory_float64(case, fusion):
    out = _run(case, euler=True) if fusion == "euler_k" else _run(case, fusion=fusion)
    err = _rel(out, case["ref"]["out_final_latent"])
    print(f"MultiDiffusion trajectory ({fusion}): {err:.1e} (bar 1e-6)")
    assert err <= 1e-6


@pytest.mark.parametrize("fusion", ["eps", "x0", "official", "euler_k"])
def test_full_trajectory_float32(case, fusion):
    out = _run(case, dtype=torch.float32, euler=True) if fusion == "euler_k" else _run(case, dtype=torch.float32, fusion=fusion)
    assert _rel(out, case["ref"]["out_final_latent"]) <= 1e-4


def _fresh_noise(case):
    d = case["data"]
    g = torch.Generator().manual_seed(99)
    return torch.randn(d["x_T"].shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mistake", ["no bootstrapping", "fresh bootstrap noise", "background inside boxes", "cond/uncond swapped"])
def test_plausible_mistakes_fail_by_orders_of_magnitude(case, mistake, monkeypatch):
    d = case["data"]
    if mistake == "no bootstrapping":
        out = _run(case, bootstrap=False)
    elif mistake == "fresh bootstrap noise":
        fresh = _fresh_noise(case)
        real = md.bootstrap_inputs
        monkeypatch.setattr(md, "bootstrap_inputs", lambda x, m, bg, n0, a: real(x, m, bg, fresh, a))
        out = _run(case)
    elif mistake == "background inside boxes":
        masks = md.region_masks([tuple(b) for b in d["boxes"].tolist()], 512, 512)
        masks[0] = 1.0
        out = _run(case, masks=masks)
    else:
        out = _run(case, swap=True)
    assert _rel(out, case["ref"]["out_final_latent"]) > 100 * 1e-6


def test_region_masks_on_a_non_square_canvas_with_an_off_grid_edge():
    masks = md.region_masks([(37, 16, 100, 400)], height=768, width=512)
    assert masks.shape == (2, 1, 96, 64)
    cols = torch.nonzero(masks[1, 0].sum(0)).flatten()
    rows = torch.nonzero(masks[1, 0].sum(1)).flatten()
    assert (cols[0].item(), cols[-1].item()) == (5, 12)  # ceil(37/8) .. ceil(100/8) - 1
    assert (rows[0].item(), rows[-1].item()) == (2, 49)  # y, not x: the canvas is taller than wide
    assert torch.equal(masks[0] + masks[1], torch.ones_like(masks[0]))


def test_pixel_boxes_recover_the_editors_pixels():
    assert md.pixel_boxes([(37 / 512, 0.125, 0.5, 1.0)], 768, 512) == [(37, 96, 256, 768)]


def test_fuse_gives_zero_where_nothing_covers_and_keeps_half_precision():
    preds = torch.randn((2, 4, 3, 3), dtype=torch.float16)
    masks = torch.zeros((2, 1, 3, 3))
    masks[0, 0, 0] = 1
    masks[1, 0, :2] = 1
    out = md.fuse(preds, masks)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    torch.testing.assert_close(out[:, 0].float(), ((preds[0, :, 0].float() + preds[1, :, 0].float()) / 2), rtol=1e-3, atol=1e-3)
    rows = torch.randn((3, 2, 4, 3, 3))
    torch.testing.assert_close(md.fuse_rows(rows, masks + 0.5), torch.stack([md.fuse(r, masks + 0.5) for r in rows]))


@pytest.mark.parametrize("chunk_rows", [0, 2])
def test_the_runtime_the_hooks_call_reproduces_the_official_trajectory(case, chunk_rows, monkeypatch):
    """RegionRuntime.denoise (what the A1111 and Forge denoiser wrappers call) inside the WebUI's sampler
    loop: k-diffusion Euler on the DDIM sigma grid, CFG of the fused cond and uncond rows, the official
    background draws. It must land where the official code lands."""
    from lib_migc.modes.multidiffusion.runtime import Bootstrap, RegionPrompts, RegionRuntime

    d, model = case["data"], case["model"]
    dtype = torch.float64
    masks = case["ref"]["in_masks"].to(dtype)
    cond, uncond = d["cond"].to(dtype), d["uncond"].to(dtype)
    draws = d["bg_index"]  # (steps, windows, N)
    monkeypatch.setattr(Bootstrap, "backgrounds", lambda self, image, step, regions, windows=1: d["bg_values"].to(dtype)[draws[step]])
    x_T = d["x_T"].to(dtype)
    ac = d["alphas_cumprod"].to(dtype)
    timesteps = [int(t) for t in d["timesteps"]]
    sigma_of = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    runtime = RegionRuntime(masks, RegionPrompts(cond=cond[1:], uncond=uncond[1:]),
                            Bootstrap(colours=d["bg_values"].to(dtype), noise0=x_T, seeds=[0], steps=20), space="k",
                            chunk_rows=chunk_rows)

    def denoiser(xs, sigmas, contexts, vectors, source):  # A1111's CompVisDenoiser around the toy eps model
        t = torch.tensor([timesteps[step_of[float(s)]] for s in sigmas])
        c_in = 1 / (sigmas ** 2 + 1).sqrt()
        return xs - sigmas.view(-1, 1, 1, 1) * model(xs * c_in.view(-1, 1, 1, 1), t, contexts)

    step_of = {float(sigma_of(ac[t])): s for s, t in enumerate(timesteps)}
    x = x_T / ac[timesteps[0]].sqrt()
    for s, t in enumerate(timesteps):
        prev = timesteps[s + 1] if s + 1 < len(timesteps) else 0
        sigma, sigma_next = sigma_of(ac[t]), sigma_of(ac[prev])
        rows = runtime.denoise(denoiser, torch.cat([x, x]), torch.stack([sigma, sigma]), torch.stack([cond[0], uncond[0]]),
                               None, [True, False], [0, 0], s)
        denoised = rows[1] + float(d["guidance"]) * (rows[0] - rows[1])
        x = x + (sigma_next - sigma) * (x - denoised[None]) / sigma
    out = x * ac[0].sqrt()
    assert _rel(out, case["ref"]["out_final_latent"]) <= 1e-6
