"""MultiDiffusion's region method (Bar-Tal et al., ICML 2023) as pure, host-agnostic torch functions.

Written from docs/modes/multidiffusion.md (§1 the official method, §3 its k-diffusion equivalence,
§7 the interface the reference data checks). Region 0 is the background prompt, regions 1..N the
boxes. Masks are binary at latent resolution; the background mask is what no box covers, so the
background prompt never acts inside a box. These functions work on any device and dtype, float64
included, which is how the official trajectory is reproduced to 1e-6.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...core.masks import LATENT_FACTOR
from .windows import Window, add_into, crop, whole_canvas

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ masks
def pixel_boxes(boxes_frac: Sequence[Sequence[float]], height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Fractional [x0, y0, x1, y1] boxes -> integer pixel boxes. Layout fractions keep 6 decimals, so
    rounding recovers the editor's pixels exactly."""
    return [(round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)) for x0, y0, x1, y1 in boxes_frac]


def _latent_span(start: int, end: int) -> slice:
    """Pixel span [start, end) -> latent cells whose top-left pixel 8k lies inside: ceil(start/8) .. ceil(end/8)-1."""
    return slice(-(-start // LATENT_FACTOR), -(-end // LATENT_FACTOR))


def region_masks(boxes_px: Sequence[Sequence[int]], height: int, width: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, 1, height/8, width/8) masks, background first (official rule, spec §1.2).

    The official code thresholds each box image at 0.5 and resizes it with nearest interpolation, which
    for a factor of 8 samples the pixel at (8i, 8j); for a pixel box that is the span rule above.
    """
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    masks = torch.zeros((len(boxes_px) + 1, 1, h, w), device=device, dtype=dtype)
    for i, (x0, y0, x1, y1) in enumerate(boxes_px, start=1):
        masks[i, 0, _latent_span(int(y0), int(y1)), _latent_span(int(x0), int(x1))] = 1
    masks[0] = (1 - masks[1:].sum(0)).clamp(min=0)
    return masks


# ------------------------------------------------------------------------------------ bootstrapping
def _background_maps(bg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C) per-channel constants or (N, C, h, w) latents -> (N, C, h, w)."""
    if bg.dim() == 2:
        bg = bg[:, :, None, None]
    return bg.to(like).expand(bg.shape[0], like.shape[-3], *like.shape[-2:])


def bootstrap_inputs(x: torch.Tensor, fg_masks: torch.Tensor, bg: torch.Tensor, noise0: torch.Tensor,
                     alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """(N, C, h, w) box-region inputs in VP space: the latent inside each box, outside it a constant
    colour noised to the current level with the *initial* noise: sqrt(a)·B + sqrt(1-a)·x_T."""
    alpha = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
    background = alpha.sqrt() * _background_maps(bg, x) + (1 - alpha).sqrt() * noise0
    return fg_masks * x + (1 - fg_masks) * background


def bootstrap_inputs_sigma(x_k: torch.Tensor, fg_masks: torch.Tensor, bg: torch.Tensor, noise0: torch.Tensor,
                           sigma: torch.Tensor | float) -> torch.Tensor:
    """The same in k-diffusion variables (x_k = x / sqrt(a), sigma = sqrt((1-a)/a)): B + sigma·n0
    outside each box, with n0 the unit initial noise."""
    sigma = torch.as_tensor(sigma, dtype=x_k.dtype, device=x_k.device)
    background = _background_maps(bg, x_k) + sigma * noise0
    return fg_masks * x_k + (1 - fg_masks) * background


# ------------------------------------------------------------------------------------ fusion
def divide_covered(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``total / weight`` where some region (or window) covers a cell, 0 where none does: the one division
    of the method, after every ``Σ m·value`` has been summed."""
    fused = total / weight.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(weight > 0, fused, torch.zeros_like(fused))


def fuse(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Σ m_i p_i / Σ m_i over the region axis (0), 0 where no region covers a pixel; at least float32."""
    work = torch.promote_types(preds.dtype, torch.float32)
    p, m = preds.to(work), masks.to(device=preds.device, dtype=work)
    return divide_covered((m * p).sum(0), m.sum(0)).to(preds.dtype)


def fuse_rows(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, R, C, h, w) region outputs of B rows -> (B, C, h, w)."""
    return fuse(preds.transpose(0, 1), masks[:, None])


# ------------------------------------------------------------------------------------ DDIM steps
def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float | torch.Tensor,
              alpha_bar_prev: float | torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0)."""
    a_t = torch.as_tensor(alpha_bar_t, dtype=x.dtype, device=x.device)
    a_p = torch.as_tensor(alpha_bar_prev, dtype=x.dtype, device=x.device)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps


def ddim_step_from_x0(x: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, a_p: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step given the predicted x0 (the eps it implies for ``x``, then the step)."""
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps


def _cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def fused_ddim_step_eps(x_t, eps_uncond, eps_cond, masks, guidance, alpha_bar_t, alpha_bar_prev, region_inputs=None):
    """Fuse the uncond and the cond rows separately, CFG, one DDIM step (the WebUI's eps path).

    ``region_inputs`` is unused: on the pixels a region's weight covers its input equals x_t (§3.1)."""
    eps = _cfg(fuse(eps_uncond, masks), fuse(eps_cond, masks), guidance)
    return ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev).reshape(x_t.shape)


def fused_ddim_step_x0(x_t, eps_uncond, eps_cond, masks, guidance, alpha_bar_t, alpha_bar_prev, region_inputs=None):
    """Each region's x0 from its own (bootstrapped) input, fused, then DDIM from the fused x0 (the
    k-diffusion path, whose denoiser returns x0)."""
    a_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    a_p = torch.as_tensor(alpha_bar_prev, dtype=x_t.dtype, device=x_t.device)
    inputs = x_t.expand_as(eps_cond) if region_inputs is None else region_inputs
    x0 = lambda eps: (inputs - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # noqa: E731
    x0_fused = _cfg(fuse(x0(eps_uncond), masks), fuse(x0(eps_cond), masks), guidance)
    return ddim_step_from_x0(x_t, x0_fused, a_t, a_p).reshape(x_t.shape)


def official_ddim_step(x_t, eps_uncond, eps_cond, masks, guidance, alpha_bar_t, alpha_bar_prev, region_inputs=None):
    """The official order: each region's CFG and DDIM step from its own input, then the latents fused."""
    inputs = x_t.expand_as(eps_cond) if region_inputs is None else region_inputs
    stepped = ddim_step(inputs, _cfg(eps_uncond, eps_cond, guidance), alpha_bar_t, alpha_bar_prev)
    return fuse(stepped, masks).reshape(x_t.shape)


STEPS = {"eps": fused_ddim_step_eps, "x0": fused_ddim_step_x0, "official": official_ddim_step}


# ------------------------------------------------------------------------------------ whole loops
def _window_backgrounds(bg_latents: torch.Tensor, index: torch.Tensor, window: Window) -> torch.Tensor:
    """The drawn backgrounds for one window: (N, C) constants, or (N, C, h, w) latents cropped to it."""
    chosen = bg_latents[index]
    return chosen if chosen.dim() == 2 else chosen[..., :window.height, :window.width]


def sample_regions_ddim(eps_model: EpsModel, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                        masks: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, guidance: float,
                        bootstrap_steps: int = 0, bg_latents: torch.Tensor | None = None,
                        bg_index: torch.Tensor | None = None, fusion: str = "eps",
                        views: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The official loop with any eps model ``f(x, t, ctx)``, over one window or the official windows.

    x_T (1, C, h, w); cond/uncond (R, L, D) per region; bg_latents (K, C) or (K, C, h, w) candidate
    backgrounds (a window takes their top-left window-sized part); bg_index (steps, N) or
    (steps, windows, N): the background each box uses at each bootstrapping step (in each window);
    views: latent windows ``(h0, h1, w0, w1)`` (default: the whole canvas). Per window the method runs on
    the cropped latent, masks and x_T; the sums over every window and region are divided once (§1.4).
    ``fusion``: "official" fuses each region's stepped latent, "eps" the eps predictions and "x0" the x0
    predictions (cond and uncond separately, then CFG and one DDIM step: the WebUI's paths), all equal.
    The last step goes to alphas_cumprod[0] (diffusers' DDIM with set_alpha_to_one=False).
    """
    windows = [Window(*view) for view in views] if views is not None else whole_canvas(*x_T.shape[-2:])
    x = x_T
    r = masks.shape[0]
    for s, t in enumerate(timesteps):
        t = int(t)
        prev = int(timesteps[s + 1]) if s + 1 < len(timesteps) else -1
        a_t = alphas_cumprod[t]
        a_p = alphas_cumprod[prev] if prev >= 0 else alphas_cumprod[0]
        sums: list[torch.Tensor] = []  # per kind of value: Σ m·value over windows and regions
        weight = torch.zeros_like(x[:, :1])
        for v, window in enumerate(windows):
            xw, mw = crop(x, window), crop(masks, window)
            inputs = xw.expand(r, *xw.shape[1:]).clone()
            if s < bootstrap_steps:
                index = bg_index[s] if bg_index.dim() == 2 else bg_index[s, v]
                inputs[1:] = bootstrap_inputs(xw, mw[1:], _window_backgrounds(bg_latents, index, window), crop(x_T, window), a_t)
            eps = eps_model(torch.cat([inputs, inputs]), torch.full((2 * r,), t, device=x.device), torch.cat([uncond, cond]))
            eps_u, eps_c = eps[:r], eps[r:]
            if fusion == "official":
                values = [ddim_step(inputs, _cfg(eps_u, eps_c, guidance), a_t, a_p)]
            elif fusion == "x0":
                values = [(inputs - (1 - a_t).sqrt() * e) / a_t.sqrt() for e in (eps_u, eps_c)]
            else:
                values = [eps_u, eps_c]
            if not sums:
                sums = [torch.zeros_like(x) for _ in values]
            for total, value in zip(sums, values):
                add_into(total, window, (mw * value).sum(0, keepdim=True))
            add_into(weight, window, mw.sum(0, keepdim=True))
        fused = [divide_covered(total, weight) for total in sums]
        if fusion == "official":
            x = fused[0]
        elif fusion == "x0":
            x = ddim_step_from_x0(x, _cfg(fused[0], fused[1], guidance), a_t, a_p)
        else:
            x = ddim_step(x, _cfg(fused[0], fused[1], guidance), a_t, a_p)
    return x


def sample_regions_euler_k(eps_model: EpsModel, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                           masks: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, guidance: float,
                           bootstrap_steps: int = 0, bg_latents: torch.Tensor | None = None,
                           bg_index: torch.Tensor | None = None) -> torch.Tensor:
    """The same trajectory as the WebUI runs it: Euler in k-diffusion variables on the DDIM sigma grid,
    a CFG denoiser that fuses each region's x0 (cond and uncond rows separately), k-space bootstrapping
    with n0 = x_T. Returns the VP latent."""
    r = masks.shape[0]
    sigma_of = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    a_first = alphas_cumprod[int(timesteps[0])]
    x = x_T / a_first.sqrt()  # k-space: x_k = x / sqrt(a)
    for s, t in enumerate(timesteps):
        t = int(t)
        prev = int(timesteps[s + 1]) if s + 1 < len(timesteps) else 0
        a_t, a_p = alphas_cumprod[t], alphas_cumprod[prev]
        sigma, sigma_next = sigma_of(a_t), sigma_of(a_p)
        inputs = x.expand(r, *x.shape[1:]).clone()
        if s < bootstrap_steps:
            inputs[1:] = bootstrap_inputs_sigma(x, masks[1:], bg_latents[bg_index[s]], x_T, sigma)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        t_batch = torch.full((2 * r,), t, device=x.device)
        eps = eps_model(torch.cat([inputs, inputs]) * c_in, t_batch, torch.cat([uncond, cond]))
        x0 = torch.cat([inputs, inputs]) - sigma * eps
        denoised = _cfg(fuse(x0[:r], masks), fuse(x0[r:], masks), guidance)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x * alphas_cumprod[0].sqrt()  # the last step ends at alphas_cumprod[0], back to VP
