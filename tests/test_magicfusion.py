"""MagicFusion (SNB) core: the official reference case, per-pixel selection at any latent size, the fusion
window, and reading model B's UNet weights."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_migc.core.errors import MigcError
from lib_migc.modes.magicfusion.method import snb_blend, snb_blend_denoised
from lib_migc.modes.magicfusion.params import (
    A_THEN_SNB, SNB_THEN_A, FusionWindow, MagicFusionParams, ddim_timestep, fused_at_timestep,
    fused_step_count, in_fusion_window,
)
from lib_migc.modes.magicfusion.weights import ATTN2_TO_K_KEY, INPUT_CONV_KEY, check_pair, load_unet_state, state_shapes

CASE = "c1_64x64_b1_s7.5_k1"
EPS_NAMES = ("eps_a_cond", "eps_a_uncond", "eps_b_cond", "eps_b_uncond")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ reference case
@pytest.fixture(scope="module")
def reference(shared_dir):
    """(inputs, stored official outputs, metadata) of the shipped reference case."""
    folder = Path(os.path.join(shared_dir, "data", "modes", "magicfusion"))
    spec = importlib.util.spec_from_file_location("magicfusion_inputs", folder / "inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = module.make_inputs(CASE)
    stored = load_file(str(folder / f"{CASE}.safetensors"))
    from safetensors import safe_open

    with safe_open(str(folder / f"{CASE}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    expected = json.loads(meta["input_sha256"])
    assert {k: module.sha256_of(v) for k, v in inputs.items()} == expected, "regenerated inputs differ"
    return inputs, stored, meta, module.CASES[CASE]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_reference_case_eps(reference):
    inputs, stored, _, case = reference
    eps, mask = snb_blend(*(inputs[n] for n in EPS_NAMES), case["guidance"], case["k_a"], case["k_b"])
    assert mask.dtype == torch.bool and mask.shape == (1, 64, 64)
    assert torch.equal(mask, stored["mask_b"].bool())
    assert rel_err(eps, stored["eps_blend"]) <= 1e-5
    assert eps.dtype == torch.float32


def test_reference_case_kdiffusion(reference):
    inputs, stored, meta, case = reference
    sigma = float(meta["kdiff_sigma"])
    x = inputs["x_t"] / math.sqrt(float(meta["ddim_alpha_t"]))
    denoised = [x - sigma * inputs[n] for n in EPS_NAMES]
    out, mask = snb_blend_denoised(x, sigma, *denoised, case["guidance"], case["k_a"], case["k_b"])
    assert torch.equal(mask, stored["mask_b"].bool())
    assert rel_err(out, stored["kdiff_denoised"]) <= 1e-5
    out_t, _ = snb_blend_denoised(x, torch.tensor([sigma]), *denoised, case["guidance"], case["k_a"], case["k_b"])
    assert torch.equal(out_t, out)


def test_reference_case_window(reference):
    _, _, meta, case = reference
    params = MagicFusionParams.from_official(meta["official_fusion_selection"], case["mode"])
    assert (params.window_mode, params.switch_t, params.k_a, params.k_b) == (SNB_THEN_A, 600, 1.0, 1.0)
    step = case["ddim_steps"] - 1 - int(meta["ddim_index"])
    assert ddim_timestep(step, case["ddim_steps"]) == case["t"]
    assert in_fusion_window(step, case["ddim_steps"], params.window) == (meta["fused"] == "True")


def _hook_params(case):
    from lib_migc.modes.magicfusion.params import FusionParams

    return FusionParams(enabled=True, model_b="b", k_a=case["k_a"], k_b=case["k_b"])


def test_reference_case_through_the_hooks_row_blend_eps(reference):
    """``blend_rows`` (what A1111's on_cfg_denoised and Forge's post-CFG function call) on a timestep
    sampler's ε rows, then the WebUI's own CFG combine: the official blended ε."""
    from lib_migc.modes.magicfusion.runtime import blend_rows

    inputs, stored, _, case = reference
    rows = torch.cat([inputs["eps_a_cond"], inputs["eps_a_uncond"]]).clone()
    out_b = torch.cat([inputs["eps_b_cond"], inputs["eps_b_uncond"]])
    mask = blend_rows(rows, out_b, torch.cat([inputs["x_t"]] * 2), None, 1, case["guidance"], _hook_params(case))
    assert torch.equal(mask, stored["mask_b"].bool())
    guided = rows[1:] + case["guidance"] * (rows[:1] - rows[1:])
    assert rel_err(guided, stored["eps_blend"]) <= 1e-5


def test_reference_case_through_the_hooks_row_blend_kdiffusion(reference):
    """The same on k-diffusion rows (denoised predictions, per-row σ), A1111's and Forge's case."""
    from lib_migc.modes.magicfusion.runtime import blend_rows

    inputs, stored, meta, case = reference
    sigma = float(meta["kdiff_sigma"])
    x = inputs["x_t"] / math.sqrt(float(meta["ddim_alpha_t"]))
    denoised = {n: x - sigma * inputs[n] for n in EPS_NAMES}
    rows = torch.cat([denoised["eps_a_cond"], denoised["eps_a_uncond"]]).clone()
    for b_denoised in (False, True):  # A1111 hands B's raw ε, Forge B's denoised rows
        out_b = (torch.cat([denoised["eps_b_cond"], denoised["eps_b_uncond"]]) if b_denoised
                 else torch.cat([inputs["eps_b_cond"], inputs["eps_b_uncond"]]))
        work = rows.clone()
        mask = blend_rows(work, out_b, torch.cat([x, x]), torch.full((2,), sigma), 1, case["guidance"], _hook_params(case),
                          b_denoised=b_denoised)
        assert torch.equal(mask, stored["mask_b"].bool())
        guided = work[1:] + case["guidance"] * (work[:1] - work[1:])
        assert rel_err(guided, stored["kdiff_denoised"]) <= 1e-5


# ------------------------------------------------------------------------------------ slow reference
def slow_mask(a_c, a_u, b_c, s, k_a, k_b):
    """SNB's mask from the spec's words with explicit loops, in float64 Python floats: the 4×4 box mean
    with zero padding 1 (divide by 16), bilinear with half-pixel centres clamped, channel mean, softmax
    per image, B iff P_B > P_A. Returns (mask as nested lists, log-probability margins LB − LA)."""
    n_img, n_ch, h, w = a_c.shape
    ac, au, bc = a_c.tolist(), a_u.tolist(), b_c.tolist()

    def pooled(img, i, j):  # output (i, j) covers rows i-1..i+2, cols j-1..j+2 of the padded input
        total = 0.0
        for r in range(i - 1, i + 3):
            for c in range(j - 1, j + 3):
                if 0 <= r < h and 0 <= c < w:
                    total += img[r][c]
        return total / 16.0

    def source(dst, n_in, n_out):
        pos = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(pos), n_in - 1)
        return lo, min(lo + 1, n_in - 1), pos - lo

    def saliency_map(cond, n):
        out = [[0.0] * w for _ in range(h)]
        for ch in range(n_ch):
            absd = [[abs(s * (cond[n][ch][r][c] - au[n][ch][r][c])) for c in range(w)] for r in range(h)]
            pool = [[pooled(absd, i, j) for j in range(w - 1)] for i in range(h - 1)]
            for i in range(h):
                r0, r1, fr = source(i, h - 1, h)
                for j in range(w):
                    c0, c1, fc = source(j, w - 1, w)
                    top = pool[r0][c0] * (1 - fc) + pool[r0][c1] * fc
                    bottom = pool[r1][c0] * (1 - fc) + pool[r1][c1] * fc
                    out[i][j] += (top * (1 - fr) + bottom * fr) / n_ch
        return out

    def log_softmax(m, k):
        flat = [k * v for row in m for v in row]
        top = max(flat)
        lse = top + math.log(sum(math.exp(v - top) for v in flat))
        return [[k * v - lse for v in row] for row in m]

    masks, margins = [], []
    for n in range(n_img):
        la, lb = log_softmax(saliency_map(ac, n), k_a), log_softmax(saliency_map(bc, n), k_b)
        masks.append([[lb[i][j] > la[i][j] for j in range(w)] for i in range(h)])
        margins.append([[lb[i][j] - la[i][j] for j in range(w)] for i in range(h)])
    return torch.tensor(masks), torch.tensor(margins, dtype=torch.float64)


def structured_eps(shape, seed):
    """Four ε with smooth, model-specific responses so both models win somewhere."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    a_u = torch.randn(shape, generator=g)
    b_u = a_u + 0.3 * torch.randn(shape, generator=g)
    bump_a = torch.exp(-((yy - h * 0.3) ** 2 + (xx - w * 0.7) ** 2) / (2 * 6.0 ** 2))
    bump_b = torch.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.25) ** 2) / (2 * 8.0 ** 2))
    a_c = a_u + 0.05 * torch.randn(shape, generator=g) + 0.4 * bump_a
    b_c = b_u + 0.05 * torch.randn(shape, generator=g) + 0.4 * bump_b
    return a_c, a_u, b_c, b_u


@pytest.mark.parametrize("shape,k_a,k_b,s", [((1, 4, 48, 80), 1.0, 1.0, 7.5), ((2, 4, 24, 17), 3.0, 2.0, 5.0)])
def test_non_square_selects_per_pixel(shape, k_a, k_b, s):
    a_c, a_u, b_c, b_u = structured_eps(shape, seed=3)
    eps, mask = snb_blend(a_c, a_u, b_c, b_u, s, k_a, k_b)
    assert mask.shape == (shape[0], shape[2], shape[3])
    ref_mask, margin = slow_mask(a_c, a_u, b_c, s, k_a, k_b)
    clear = margin.abs() > 1e-5  # float32 vs float64 may differ only at exact near-ties
    assert clear.float().mean() > 0.99
    assert torch.equal(mask[clear], ref_mask[clear])
    assert 0 < mask.float().mean() < 1, "both models should win somewhere"
    guided_a, guided_b = a_u + s * (a_c - a_u), b_u + s * (b_c - b_u)
    for n in range(shape[0]):
        for i in range(shape[2]):
            for j in range(shape[3]):
                want = guided_b[n, :, i, j] if mask[n, i, j] else guided_a[n, :, i, j]
                assert torch.allclose(eps[n, :, i, j], want, rtol=0, atol=1e-6)


def test_batch_rows_are_independent():
    a_c, a_u, b_c, b_u = structured_eps((3, 4, 32, 40), seed=5)
    full, full_mask = snb_blend(a_c, a_u, b_c, b_u, 7.5, 1.0, 1.0)
    for n in range(3):
        row, row_mask = snb_blend(a_c[n:n + 1], a_u[n:n + 1], b_c[n:n + 1], b_u[n:n + 1], 7.5, 1.0, 1.0)
        assert torch.equal(row_mask[0], full_mask[n]) and torch.equal(row[0], full[n])


def test_ties_go_to_a():
    a_c, a_u, _, b_u = structured_eps((2, 4, 16, 24), seed=7)
    # B's cond equal to A's: both saliencies use A's uncond, so P_A == P_B everywhere -> A everywhere,
    # even though B's own uncond (and so B's guided ε) differs.
    eps, mask = snb_blend(a_c, a_u, a_c.clone(), b_u, 7.5, 2.0, 2.0)
    assert not mask.any()
    assert torch.equal(eps, a_u + 7.5 * (a_c - a_u))
    # Zero guidance: every saliency is 0, both softmaxes are uniform: a tie at every pixel.
    _, mask0 = snb_blend(a_c, a_u, a_c + 1.0, b_u, 0.0, 1.0, 1.0)
    assert not mask0.any()


def test_guidance_changes_the_mask():
    a_c, a_u, b_c, b_u = structured_eps((1, 4, 32, 32), seed=11)
    _, m5 = snb_blend(a_c, a_u, b_c, b_u, 5.0, 1.0, 2.0)
    _, m10 = snb_blend(a_c, a_u, b_c, b_u, 10.0, 1.0, 2.0)
    assert not torch.equal(m5, m10)


def test_fp16_inputs_no_nan():
    a_c, a_u, b_c, b_u = (t.half() * 20 for t in structured_eps((2, 4, 40, 56), seed=13))
    eps, mask = snb_blend(a_c, a_u, b_c, b_u, 12.0, 10.0, 10.0)
    assert eps.dtype == torch.float16 and torch.isfinite(eps).all()
    assert 0 < mask.float().mean() < 1
    x = torch.randn(a_c.shape).half()
    out, _ = snb_blend_denoised(x, torch.tensor([0.03, 14.6]), x - a_c, x - a_u, x - b_c, x - b_u, 12.0, 10.0, 10.0)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_denoised_matches_eps_blend_per_row_sigma():
    a_c, a_u, b_c, b_u = structured_eps((2, 4, 24, 32), seed=17)
    x, sigma = torch.randn(a_c.shape), torch.tensor([0.5, 8.0])
    col = sigma.view(2, 1, 1, 1)
    eps, mask = snb_blend(a_c, a_u, b_c, b_u, 7.0, 1.0, 1.5)
    out, mask_d = snb_blend_denoised(x, sigma, *(x - col * e for e in (a_c, a_u, b_c, b_u)), 7.0, 1.0, 1.5)
    assert torch.equal(mask, mask_d)
    assert rel_err(out, x - col * eps) <= 1e-5


def test_shape_mismatch_raises():
    a = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError):
        snb_blend(a, a, a, torch.zeros(1, 4, 8, 9), 7.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        snb_blend_denoised(a, torch.ones(2), a, a, a, a, 7.5, 1.0, 1.0)


# ------------------------------------------------------------------------------------ window
def test_ddim_grid():
    assert [ddim_timestep(i, 100) for i in (0, 1, 99)] == [991, 981, 1]
    assert [ddim_timestep(i, 50) for i in (0, 49)] == [981, 1]
    assert ddim_timestep(0, 30) == 958  # 1000 // 30 = 33: 29·33 + 1
    with pytest.raises(MigcError, match="step"):
        ddim_timestep(50, 50)
    with pytest.raises(MigcError, match="steps"):
        ddim_timestep(0, 0)


def test_window_is_strictly_greater_at_the_boundary():
    # 50 steps: step 19 sees t = 601, step 20 sees t = 581.
    snb_then_a, a_then_snb = FusionWindow(SNB_THEN_A, 601), FusionWindow(A_THEN_SNB, 601)
    assert not in_fusion_window(19, 50, snb_then_a) and in_fusion_window(18, 50, snb_then_a)
    assert in_fusion_window(19, 50, a_then_snb) and not in_fusion_window(18, 50, a_then_snb)
    window = FusionWindow(SNB_THEN_A, 600)
    assert in_fusion_window(19, 50, window) and not in_fusion_window(20, 50, window)
    assert fused_at_timestep(600.0001, window) and not fused_at_timestep(600, window)
    assert fused_at_timestep(600, FusionWindow(A_THEN_SNB, 600))
    assert not fused_at_timestep(600.0001, FusionWindow(A_THEN_SNB, 600))


def test_window_extremes_and_official_examples():
    assert fused_step_count(100, FusionWindow(SNB_THEN_A, 600)) == 40  # lion: t = 991 … 601
    assert fused_step_count(100, FusionWindow(A_THEN_SNB, 850)) == 85  # bee: t = 841 … 1
    assert fused_step_count(20, FusionWindow(SNB_THEN_A, 1000)) == 0
    assert fused_step_count(20, FusionWindow(SNB_THEN_A, 0)) == 20
    assert fused_step_count(20, FusionWindow(A_THEN_SNB, 1000)) == 20
    assert fused_step_count(20, FusionWindow(A_THEN_SNB, 0)) == 0


# ------------------------------------------------------------------------------------ parameters
def test_params_defaults_and_aliases():
    p = MagicFusionParams()
    assert (p.k_a, p.k_b, p.window_mode, p.switch_t) == (1.0, 1.0, SNB_THEN_A, 600)
    assert MagicFusionParams(window_mode=1).window_mode == A_THEN_SNB
    assert MagicFusionParams(window_mode="snb-then-a", switch_t=850.0).switch_t == 850


@pytest.mark.parametrize("field,value", [("k_a", 0), ("k_b", -1.0), ("k_a", float("nan")), ("k_b", "2"),
                                         ("k_a", True), ("switch_t", 1001), ("switch_t", -1),
                                         ("switch_t", 600.5), ("window_mode", "both"), ("window_mode", 0)])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(MigcError) as info:
        MagicFusionParams(**{field: value})
    assert f"'{field}'" in str(info.value)
    assert info.value.status_code == 422


# ------------------------------------------------------------------------------------ model B weights
def fake_sd1_state(context=768, in_channels=4, prefix="model.diffusion_model.") -> dict[str, torch.Tensor]:
    unet = {INPUT_CONV_KEY: torch.randn(8, in_channels, 3, 3), "input_blocks.0.0.bias": torch.randn(8),
            ATTN2_TO_K_KEY: torch.randn(8, context), "out.2.weight": torch.randn(4, 8, 3, 3).half()}
    state = {prefix + k: v for k, v in unet.items()}
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, context)
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(8, in_channels, 3, 3)
    return state


def expected_unet(state):
    return {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}


def assert_same_state(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])


def test_load_unet_state_safetensors(tmp_path):
    state = fake_sd1_state()
    path = tmp_path / "modelB.safetensors"
    save_file(state, str(path))
    assert_same_state(load_unet_state(str(path)), expected_unet(state))


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_unet_state_ckpt(tmp_path, wrapped):
    state = fake_sd1_state()
    path = tmp_path / "modelB.ckpt"
    torch.save({"state_dict": state, "global_step": 470000} if wrapped else state, str(path))
    assert_same_state(load_unet_state(str(path)), expected_unet(state))


def test_load_unet_state_without_unet_keys(tmp_path):
    state = {k: v for k, v in fake_sd1_state().items() if not k.startswith("model.diffusion_model.")}
    for name in ("vae_only.safetensors", "vae_only.ckpt"):
        path = tmp_path / name
        save_file(state, str(path)) if name.endswith(".safetensors") else torch.save({"state_dict": state}, str(path))
        with pytest.raises(MigcError) as info:
            load_unet_state(str(path))
        assert name in str(info.value) and "model.diffusion_model." in str(info.value)


def test_load_unet_state_refuses_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x.weight": torch.ones(1)}, "callback": Path("x")}, str(path))
    with pytest.raises(MigcError, match="evil.ckpt"):
        load_unet_state(str(path))


def test_load_unet_state_missing_file(tmp_path):
    with pytest.raises(MigcError, match="not found") as info:
        load_unet_state(str(tmp_path / "nope.safetensors"))
    assert info.value.status_code == 404


# ------------------------------------------------------------------------------------ pair check
def shapes_of(**kwargs):
    return state_shapes(expected_unet(fake_sd1_state(**kwargs)))


def test_check_pair_accepts_sd1_pair():
    check_pair(shapes_of(), shapes_of(), "sd-v1-4", "anything-v3")
    check_pair(shapes_of(in_channels=9), shapes_of(in_channels=9), "inpaint-a", "inpaint-b")


@pytest.mark.parametrize("b_kwargs,word", [({"context": 1024}, "1024"), ({"in_channels": 9}, "latent channels")])
def test_check_pair_error_names_both_models(b_kwargs, word):
    with pytest.raises(MigcError) as info:
        check_pair(shapes_of(), shapes_of(**b_kwargs), "sd-v1-4", "other-model")
    assert "sd-v1-4" in str(info.value) and "other-model" in str(info.value) and word in str(info.value)


def test_check_pair_refuses_sd2_pair_and_other_layouts():
    with pytest.raises(MigcError, match="1.x"):
        check_pair(shapes_of(context=1024), shapes_of(context=1024), "sd2-a", "sd2-b")
    b = shapes_of()
    b["out.2.weight"] = (4, 16, 3, 3)
    with pytest.raises(MigcError, match="out.2.weight"):
        check_pair(shapes_of(), b, "a", "b")
    with pytest.raises(MigcError, match="sdxl-like"):
        check_pair(shapes_of(), {"x.weight": (1,)}, "a", "sdxl-like")
