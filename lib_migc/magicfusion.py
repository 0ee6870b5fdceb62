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

The fusion window is a DDPM-timestep threshold ``switch_t`` compared *strictly greater* with the step's
timestep; its meaning flips between the two window modes (see :class:`FusionWindow`).

Checkpoint helpers read only B's UNet weights from a standard SD1 checkpoint, never unpickling code, and
check that the two UNets form an SD1 pair. Nothing here imports the WebUI.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CheckpointError, MigcError

# ------------------------------------------------------------------------------------ parameters
#: Window modes, by the official ``merge_mode`` number they correspond to.
A_THEN_SNB = "A-then-SNB"  # official mode 1: t > switch_t -> A only; t <= switch_t -> SNB
SNB_THEN_A = "SNB-then-A"  # official mode 2: t > switch_t -> SNB;    t <= switch_t -> A only
WINDOW_MODES = (A_THEN_SNB, SNB_THEN_A)
OFFICIAL_MERGE_MODES = {1: A_THEN_SNB, 2: SNB_THEN_A}

NUM_TRAIN_TIMESTEPS = 1000
K_UI_RANGE = (0.1, 10.0)
SD1_CONTEXT_DIM = 768
UNET_PREFIX = "model.diffusion_model."
INPUT_CONV_KEY = "input_blocks.0.0.weight"
#: The first cross-attention key projection of the SD1 UNet: its shape is (320, context width).
ATTN2_TO_K_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _fail(field: str, allowed: str, value: Any) -> MigcError:
    return MigcError(f"MagicFusion: '{field}' must be {allowed}, got {value!r}.")


def _positive_float(field: str, value: Any) -> float:
    """A finite float > 0; bools and strings are refused rather than coerced."""
    lo, hi = K_UI_RANGE
    allowed = f"a finite number > 0 (the UI offers {lo:g}–{hi:g})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, allowed, value)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise _fail(field, allowed, value)
    return value


def _timestep_threshold(field: str, value: Any) -> int:
    """An integer DDPM timestep 0..1000 (an integral float such as 600.0 is accepted)."""
    allowed = f"an integer DDPM timestep in 0..{NUM_TRAIN_TIMESTEPS}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, allowed, value)
    if isinstance(value, float) and not value.is_integer():
        raise _fail(field, allowed, value)
    value = int(value)
    if not 0 <= value <= NUM_TRAIN_TIMESTEPS:
        raise _fail(field, allowed, value)
    return value


def _window_mode(field: str, value: Any) -> str:
    """A canonical window-mode name; the official ``merge_mode`` numbers 1 and 2 are accepted too."""
    allowed = f"one of {', '.join(repr(m) for m in WINDOW_MODES)} (official merge_mode 1 or 2)"
    if isinstance(value, int) and not isinstance(value, bool) and value in OFFICIAL_MERGE_MODES:
        return OFFICIAL_MERGE_MODES[value]
    if isinstance(value, str):
        for mode in WINDOW_MODES:
            if value.strip().lower() == mode.lower():
                return mode
    raise _fail(field, allowed, value)


@dataclass(frozen=True)
class FusionWindow:
    """When SNB is active, as a DDPM-timestep threshold (the official ``v1``), compared strictly greater.

    ``A-then-SNB`` (official mode 1): A alone while ``t > switch_t`` (A lays out the composition),
    SNB once ``t <= switch_t``. ``SNB-then-A`` (mode 2): SNB while ``t > switch_t``, then A alone refines.
    """

    window_mode: str = SNB_THEN_A
    switch_t: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_mode", _window_mode("window_mode", self.window_mode))
        object.__setattr__(self, "switch_t", _timestep_threshold("switch_t", self.switch_t))


@dataclass(frozen=True)
class MagicFusionParams:
    """The numeric user parameters of the mode (spec parameter table); validated on construction.

    ``k_a``/``k_b`` are the per-model softmax temperatures (the paper's k_g, k_e); the effective
    temperature is ``k·CFG scale``. Model choice, prompt B and the hires switch are host concerns.
    """

    k_a: float = 1.0
    k_b: float = 1.0
    window_mode: str = SNB_THEN_A
    switch_t: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_a", _positive_float("k_a", self.k_a))
        object.__setattr__(self, "k_b", _positive_float("k_b", self.k_b))
        window = FusionWindow(self.window_mode, self.switch_t)
        object.__setattr__(self, "window_mode", window.window_mode)
        object.__setattr__(self, "switch_t", window.switch_t)

    @property
    def window(self) -> FusionWindow:
        return FusionWindow(self.window_mode, self.switch_t)

    @classmethod
    def from_official(cls, fusion_selection: str, merge_mode: int) -> MagicFusionParams:
        """Parameters from the official CLI pair, e.g. ``("600,1,1", 2)`` (``v1,k_a,k_b`` and mode)."""
        parts = [p.strip() for p in str(fusion_selection).split(",")]
        if len(parts) != 3:
            raise _fail("fusion_selection", "three comma-separated numbers 'switch_t,k_a,k_b'", fusion_selection)
        try:
            switch_t, k_a, k_b = (float(p) for p in parts)
        except ValueError:
            raise _fail("fusion_selection", "three comma-separated numbers 'switch_t,k_a,k_b'", fusion_selection) from None
        return cls(k_a=k_a, k_b=k_b, window_mode=merge_mode, switch_t=switch_t)


# ------------------------------------------------------------------------------------ fusion window
def fused_at_timestep(t: float, window: FusionWindow) -> bool:
    """Whether SNB applies at DDPM timestep ``t`` (fractional with k-diffusion/Karras schedules).

    Hosts that know the timestep the UNet actually sees (``sigma_to_t(σ)``) should gate with this.
    """
    if window.window_mode == A_THEN_SNB:
        return t <= window.switch_t
    return t > window.switch_t


def ddim_timestep(step: int, total_steps: int) -> int:
    """The integer DDPM timestep of sampler step ``step`` (0 = first, noisiest) on the official grid.

    The official DDIM (and A1111's timestep samplers with the default 'uniform' discretisation) use
    ``range(0, 1000, 1000 // steps) + 1`` walked backwards: step i sees
    ``t = (steps − 1 − i)·(1000 // steps) + 1`` (991, 981, …, 1 for 100 steps; 981 … 1 for 50).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or not 1 <= total_steps <= NUM_TRAIN_TIMESTEPS:
        raise _fail("steps", f"an integer in 1..{NUM_TRAIN_TIMESTEPS}", total_steps)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total_steps:
        raise _fail("step", f"an integer in 0..{total_steps - 1}", step)
    return (total_steps - 1 - step) * (NUM_TRAIN_TIMESTEPS // total_steps) + 1


def in_fusion_window(step: int, total_steps: int, window: FusionWindow) -> bool:
    """Whether SNB applies at sampler step ``step`` of ``total_steps`` (official DDIM timestep grid).

    Exact for the official run and A1111's uniform timestep samplers. k-diffusion samplers visit other
    timesteps (Karras σ, fractional t), so there a host should gate on the t the UNet actually sees with
    :func:`fused_at_timestep`; this step form is what the UI uses to show "fused steps" for a step count.
    """
    return fused_at_timestep(ddim_timestep(step, total_steps), window)


def fused_step_count(total_steps: int, window: FusionWindow) -> int:
    """How many of ``total_steps`` steps are fused (what the UI shows next to ``switch_t``)."""
    return sum(in_fusion_window(i, total_steps, window) for i in range(total_steps))


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


# ------------------------------------------------------------------------------------ model B's weights
def _torch_load():
    """torch's own loader: A1111 swaps ``torch.load`` for a checker that refuses files written by current
    torch (see ``lib_migc.checkpoint``); ``weights_only=True`` already refuses anything but tensors."""
    safe = sys.modules.get("modules.safe")
    return getattr(safe, "unsafe_torch_load", None) or torch.load


def _unet_only(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The ``model.diffusion_model.*`` tensors with the prefix stripped (EMA, CLIP and VAE keys dropped)."""
    return {k[len(UNET_PREFIX):]: v for k, v in state.items()
            if isinstance(k, str) and k.startswith(UNET_PREFIX) and isinstance(v, Tensor)}


def _read_safetensors_unet(path: str, name: str) -> dict[str, Tensor]:
    """Only the UNet tensors of a .safetensors file (the text encoder and VAE are never materialised)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"MagicFusion model B '{name}' could not be read as safetensors "
                              f"(truncated or corrupt?): {str(exc)[:300]}") from None


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only refusal ("Unsupported global: ..."), without colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    detail = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line), "")
    return (detail or next((line for line in lines if line), "unpickling refused"))[:200]


def _read_pickle_unet(path: str, name: str) -> dict[str, Tensor]:
    """The UNet tensors of a torch pickle, loaded with ``weights_only=True`` (no code is ever run)."""
    try:
        data = _torch_load()(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"MagicFusion model B '{name}' contains Python objects other than tensors, which are not loaded "
            f"for safety ({_unpickling_reason(exc)}). Use a .safetensors version of this model.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"MagicFusion model B '{name}' could not be read (truncated or corrupt?): "
                              f"{str(exc)[:300]}") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"MagicFusion model B '{name}' holds a {type(data).__name__}, not a checkpoint dict.")
    return _unet_only(data)


def load_unet_state(path: str) -> dict[str, Tensor]:
    """The UNet weights of a standard SD1 checkpoint, keys without ``model.diffusion_model.``.

    SNB uses only B's UNet (A's text encoder and VAE serve both), so nothing else is kept.
    ``.safetensors`` is read with safetensors; anything else as a torch pickle with ``weights_only``.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"MagicFusion model B file not found: {path}", status_code=404)
    if path.lower().endswith(".safetensors"):
        state = _read_safetensors_unet(path, name)
    else:
        state = _read_pickle_unet(path, name)
    if not state:
        raise CheckpointError(
            f"MagicFusion model B '{name}' has no UNet weights: expected a full Stable Diffusion 1.x checkpoint "
            f"with '{UNET_PREFIX}*' keys (a LoRA, VAE, embedding or diffusers folder cannot be model B).")
    return state


def state_shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Key → shape of a state dict, the form :func:`check_pair` compares."""
    return {k: tuple(v.shape) for k, v in state.items()}


def _key_shape(shapes: Mapping[str, Sequence[int]], key: str, name: str) -> tuple[int, ...]:
    if key not in shapes:
        raise MigcError(f"MagicFusion: '{name}' is not a Stable Diffusion 1.x UNet (it has no '{key}').")
    return tuple(shapes[key])


def check_pair(state_a_shapes: Mapping[str, Sequence[int]], state_b_shapes: Mapping[str, Sequence[int]],
               name_a: str, name_b: str) -> None:
    """Refuse a pair that is not two SD1.x UNets of one kind (UNet keys without prefix).

    SNB mixes the two models' noise in one latent space and feeds A's 768-wide CLIP embeddings to B,
    so the latent channels (input conv) and the context width (attn2 ``to_k``) must match and the
    context must be SD1's. B is built from A's UNet config, so every weight both have must have one
    shape (keys present in one only, e.g. modules another extension added to A, are left to the strict
    ``load_state_dict`` of B).
    """
    pair = f"main model '{name_a}' and model B '{name_b}'"
    conv_a, conv_b = (_key_shape(s, INPUT_CONV_KEY, n) for s, n in ((state_a_shapes, name_a), (state_b_shapes, name_b)))
    if conv_a != conv_b:
        raise MigcError(f"MagicFusion: {pair} have different UNet input layers ({conv_a[1]} vs {conv_b[1]} latent "
                        f"channels, shapes {conv_a} vs {conv_b}); an inpainting/instruct model pairs only with its own kind.")
    ctx_a, ctx_b = (_key_shape(s, ATTN2_TO_K_KEY, n) for s, n in ((state_a_shapes, name_a), (state_b_shapes, name_b)))
    if ctx_a != ctx_b or ctx_a[1] != SD1_CONTEXT_DIM:
        raise MigcError(f"MagicFusion: {pair} must both be Stable Diffusion 1.x (text context width {SD1_CONTEXT_DIM}); "
                        f"got {ctx_a[1]} and {ctx_b[1]} (attn2.to_k shapes {ctx_a} vs {ctx_b}).")
    common = set(state_a_shapes) & set(state_b_shapes)
    differing = sorted(k for k in common if tuple(state_a_shapes[k]) != tuple(state_b_shapes[k]))
    if differing:
        shown = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise MigcError(f"MagicFusion: {pair} have different UNet layouts ({len(differing)} keys differ: {shown}).")
