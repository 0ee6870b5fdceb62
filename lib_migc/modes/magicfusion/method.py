"""MagicFusion's Saliency-aware Noise Blending (SNB): the host-independent core.

SNB runs two ε-prediction UNets on the same noisy latent and timestep and, per latent pixel, keeps the
classifier-free-guided noise of whichever model "cares more" about that pixel. Model A (the anchor, the
loaded checkpoint) supplies the text encoder, the VAE and the only noise used outside the fusion window;
model B (a second SD1.x UNet) contributes only where its guidance response is locally more salient.

How "more salient" is decided (``docs/modes/magicfusion.md`` §1), and why each detail is kept:

* The response of a model is ``s·(ε_cond − ε_uncond_A)``: **A's** unconditional ε is the reference for
  *both* maps (the official code does so; using B's own uncond gives a different mask), and the CFG
  scale ``s`` sits *inside* the saliency, so the effective softmax temperature is ``k·s`` and changing
  the CFG scale changes the mask.
* Its absolute value is smoothed by a 4×4 box average (stride 1, zero padding 1 counted in the mean,
  so borders are darkened) that yields ``(H−1)×(W−1)``, then resized back bilinearly (half-pixel
  centres, no antialias) to the latent's **own** ``H×W``. That equals the official 64×64 result bit for
  bit and extends it to any latent size (the official code only works at 64×64). It is not a Gaussian.
* The four latent channels are averaged into one map per image; a softmax over all H·W pixels of that
  image, with a per-model temperature ``k_a`` / ``k_b``, turns each map into a distribution. No other
  normalisation happens.
* The mask is hard: a pixel takes B's guided ε where ``P_B > P_A`` strictly, so **ties go to A**, and
  the same mask applies to all channels. There is no interpolation and no smoothing across steps.

The saliency is computed in float32 (or wider) even for fp16 inputs, as the official autocast did for
its softmax; results are returned in the input dtype.

k-diffusion samplers hand over denoised predictions ``D = x − σ·ε`` instead of ε. CFG and the per-pixel
selection commute with that affine map, but the saliency does not (it would be scaled by σ), so
:func:`snb_blend_denoised` measures saliency on ``ε = (x − D)/σ`` and selects between the two CFG'd
denoised predictions.

The fusion window and the user parameters live in :mod:`lib_migc.modes.magicfusion.params` (torch-free, so
the panel can show the fused step count without the model code).

Loading model B's UNet lives in :mod:`lib_migc.modes.magicfusion.weights`. Nothing here imports the WebUI.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ------------------------------------------------------------------------------------ the blend
def cfg(uncond: Tensor, cond: Tensor, guidance: float) -> Tensor:
    """Plain classifier-free guidance ``u + s·(c − u)``."""
    return uncond + guidance * (cond - uncond)


def box_blur(x: Tensor) -> Tensor:
    """The saliency "blur": 4×4 zero-padded box mean to (H−1)×(W−1), bilinear back to H×W (N, C, H, W)."""
    height, width = x.shape[-2:]
    pooled = F.avg_pool2d(x, kernel_size=4, stride=1, padding=1, count_include_pad=True)
    return F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False, antialias=False)


def saliency(response: Tensor) -> Tensor:
    """One map per image, (N, H, W): |response| → box blur → channel mean (the official order)."""
    return box_blur(response.abs()).mean(dim=1)


def _spatial_softmax(saliency_map: Tensor, k: float) -> Tensor:
    """Per-image softmax over all H·W pixels of ``k · saliency``, shape kept (N, H, W)."""
    flat = (saliency_map * k).flatten(1)
    return torch.softmax(flat, dim=1).view_as(saliency_map)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: fp16/bf16 saliency would flip near-tied pixels (and fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _check_shapes(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors) or len(shape) != 4:
        raise ValueError(f"SNB needs four (N, C, H, W) tensors of one shape, got {[tuple(t.shape) for t in tensors]}")
    if shape[-2] < 2 or shape[-1] < 2:
        raise ValueError(f"SNB needs a latent of at least 2×2 pixels, got {tuple(shape[-2:])}")


def snb_mask(eps_a_cond: Tensor, eps_a_uncond: Tensor, eps_b_cond: Tensor, guidance: float,
             k_a: float, k_b: float) -> Tensor:
    """Where B's guided ε is taken: bool (N, H, W), ``True`` iff ``P_B > P_A`` (ties → A).

    B's own uncond plays no part: both responses are measured against A's uncond.
    """
    _check_shapes(eps_a_cond, eps_a_uncond, eps_b_cond)
    work = _work_dtype(eps_a_cond.dtype)
    a_c, a_u, b_c = (t.to(work) for t in (eps_a_cond, eps_a_uncond, eps_b_cond))
    p_a = _spatial_softmax(saliency(guidance * (a_c - a_u)), k_a)
    p_b = _spatial_softmax(saliency(guidance * (b_c - a_u)), k_b)
    return p_b > p_a


def select_by_mask(mask: Tensor, from_a: Tensor, from_b: Tensor) -> Tensor:
    """Per-pixel selection, the (N, H, W) mask shared by all channels: B where ``mask``, else A."""
    return torch.where(mask.unsqueeze(1), from_b, from_a)


def snb_blend(eps_a_cond: Tensor, eps_a_uncond: Tensor, eps_b_cond: Tensor, eps_b_uncond: Tensor,
              guidance: float, k_a: float, k_b: float) -> tuple[Tensor, Tensor]:
    """SNB of one step in ε space (spec §1): ``(guided ε, mask_b)`` for a batch of N images of any H×W.

    Each model is CFG-guided with its own uncond; the mask decides per pixel which one is kept.
    Computed in float32 (or wider); the ε comes back in the input dtype, the mask as bool (N, H, W).
    """
    _check_shapes(eps_a_cond, eps_a_uncond, eps_b_cond, eps_b_uncond)
    dtype, work = eps_a_cond.dtype, _work_dtype(eps_a_cond.dtype)
    a_c, a_u, b_c, b_u = (t.to(work) for t in (eps_a_cond, eps_a_uncond, eps_b_cond, eps_b_uncond))
    mask = snb_mask(a_c, a_u, b_c, guidance, k_a, k_b)
    blended = select_by_mask(mask, cfg(a_u, a_c, guidance), cfg(b_u, b_c, guidance))
    return blended.to(dtype), mask


def _sigma_column(sigma: float | Tensor, batch: int, work: torch.dtype, device: torch.device) -> Tensor:
    """σ as an (N, 1, 1, 1) tensor from a float, a 0-d tensor or an (N,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=work, device=device)
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a float or an ({batch},) tensor, got shape {tuple(sigma.shape)}")
    if not bool((sigma > 0).all()):
        raise ValueError("sigma must be > 0: SNB's saliency is measured on ε = (x − D)/σ")
    return sigma.view(batch, 1, 1, 1)


def snb_blend_denoised(x: Tensor, sigma: float | Tensor, d_a_cond: Tensor, d_a_uncond: Tensor,
                       d_b_cond: Tensor, d_b_uncond: Tensor, guidance: float, k_a: float,
                       k_b: float) -> tuple[Tensor, Tensor]:
    """SNB for k-diffusion denoised predictions ``D = x − σ·ε`` (spec §2.2): ``(guided D, mask_b)``.

    ``x`` is the un-scaled latent the sampler holds and ``sigma`` its noise level (a float or one per
    image). The saliency must see ε = (x − D)/σ (on raw D differences it would be scaled by σ and the
    mask would change). The output needs no round trip: CFG and the selection commute with the affine
    map D = x − σ·ε, so selecting between the two CFG'd D's equals ``x − σ·ε_blend`` exactly and avoids
    the (x − D)/σ rounding at small σ. Computed in float32 (or wider), returned in the input dtype.
    """
    _check_shapes(x, d_a_cond, d_a_uncond, d_b_cond, d_b_uncond)
    dtype, work = d_a_cond.dtype, _work_dtype(d_a_cond.dtype)
    x_w, a_c, a_u, b_c, b_u = (t.to(work) for t in (x, d_a_cond, d_a_uncond, d_b_cond, d_b_uncond))
    sig = _sigma_column(sigma, x.shape[0], work, x.device)
    eps_a_c, eps_a_u, eps_b_c = ((x_w - d) / sig for d in (a_c, a_u, b_c))
    mask = snb_mask(eps_a_c, eps_a_u, eps_b_c, guidance, k_a, k_b)
    blended = select_by_mask(mask, cfg(a_u, a_c, guidance), cfg(b_u, b_c, guidance))
    return blended.to(dtype), mask
