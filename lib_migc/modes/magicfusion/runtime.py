"""MagicFusion during sampling, for either host: model B's cache, the window gate and the row blend.

At the hosts' model-call hook point (:meth:`FusionRuntime.denoise_rows`) model B runs beside A on the
same rows, with the host's own scaling (prompt B on the cond rows), and its outputs are kept per (cond,
image) for the step. At the CFG blend step (:meth:`FusionRuntime.blend`) the hosts hand over what their
denoiser produced for A (cond rows then uncond rows, as denoised predictions ``D = x − σ·ε`` on
k-diffusion samplers and Forge, as ε on A1111's timestep samplers); :func:`blend_rows` selects per pixel,
row by row, so the host's own CFG combine then yields ``M·CFG_B + (1 − M)·CFG_A`` and every later step
(inpaint mask blending, previews, other extensions) keeps working.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ...core import host_memory
from ...core.errors import MigcError
from ...core.hook_points import CfgRows, ModelRows
from ...core.instance_maps import InstanceMaps
from ...core.rng import global_rng_kept
from .method import select_by_mask, snb_mask
from .params import FusionParams, fused_at_timestep


class ModelBCache:
    """The one model B kept between jobs (its UNet is ~1.7 GB in fp16), keyed by file, main model,
    device and dtype, so consecutive MagicFusion jobs load it once. :meth:`clear` frees it: the job
    lifecycle calls it for every job that does not run MagicFusion (the MIGC panel off, MagicFusion off
    or declined for the model, an unreadable request) and when the main model changes
    (``on_model_loaded``), so B never stays on the GPU behind a plain job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._value: Any = None
        self._on_drop: list[Callable[[Any], None]] = []

    def on_drop(self, forget: Callable[[Any], None]) -> None:
        """``forget(model)`` runs before the cache lets go of a model: a host whose memory manager also
        holds it (Forge) drops its own reference there, or the model would outlive the cache."""
        if forget not in self._on_drop:
            self._on_drop.append(forget)

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if self._key != key:
                self._drop()
                with global_rng_kept():  # building B's UNet draws initial values its file then replaces
                    self._value = build()
                self._key = key
            return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def clear(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        value, self._key, self._value = self._value, None, None
        if value is not None:
            for forget in self._on_drop:
                forget(value)
            del value
            host_memory.release()


MODEL_B = ModelBCache()


@dataclass
class FusionRuntime:
    """One pass: the parameters, model B's UNet (``None``: the loaded model itself, with prompt B) and
    prompt B's encoding (``None``: B sees the same prompt as A)."""

    params: FusionParams
    unet_b: nn.Module | None
    prompt_b: torch.Tensor | None = None  # (L, D)
    maps: InstanceMaps | None = None  # *Show instance maps*, when MagicFusion is the mode that fills them
    #: B's output row per (is cond, image) of the step ``_stash_step``, kept from the model calls to the blend.
    _stash: dict[tuple[bool, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _stash_step: int | None = field(default=None, repr=False)

    def fused(self, timestep: float) -> bool:
        """Whether SNB runs at the DDPM timestep the UNet sees (outside the window B is not run at all)."""
        return fused_at_timestep(float(timestep), self.params.numbers.window)

    def context_b(self, contexts: torch.Tensor, is_cond: list[bool]) -> torch.Tensor:
        """B's contexts for a model call's rows: prompt B on the cond rows, when given."""
        if self.prompt_b is None or not any(is_cond):
            return contexts
        prompt = self.prompt_b.to(device=contexts.device, dtype=contexts.dtype)
        if prompt.shape[0] != contexts.shape[1]:
            raise MigcError(f"MagicFusion: prompt B takes {prompt.shape[0] // 77} chunk(s) of 75 tokens but the main prompt "
                            f"takes {contexts.shape[1] // 77}; make them the same length class (e.g. add BREAK or shorten one).")
        out = contexts.clone()
        out[[row for row, cond in enumerate(is_cond) if cond]] = prompt
        return out

    def denoise_rows(self, rows: ModelRows) -> torch.Tensor:
        """The model-call hook point: A's output unchanged; inside the window, B on the same rows, kept for the blend."""
        out = rows.plain()
        if not self.fused(rows.timestep):
            return out
        if self._stash_step != rows.step:
            self._stash, self._stash_step = {}, rows.step
        source = torch.arange(rows.x.shape[0], device=rows.x.device)
        with torch.no_grad():
            out_b = rows.call_unet(self.unet_b, rows.x, rows.levels, self.context_b(rows.contexts, rows.is_cond),
                                   rows.vectors, source)
        for row, key in enumerate(zip(rows.is_cond, rows.images)):
            self._stash[key] = out_b[row]
        return out

    def blend(self, step: CfgRows) -> bool:
        """The CFG blend step: B's rows of this step blended into A's in place; False when B did not run
        (outside the window) or a row is missing (uncond skipped, AND sub-prompts)."""
        stash = self._stash if self._stash_step == step.step else {}
        self._stash, self._stash_step = {}, None
        keys = [(True, image) for image in range(step.images)] + [(False, image) for image in range(step.images)]
        if not stash or any(key not in stash for key in keys):
            return False
        out_b = torch.stack([stash[key] for key in keys])
        mask = blend_rows(step.out, out_b, step.x, step.sigma, step.images, step.guidance, self.params, b_denoised=True)
        if mask is not None and self.maps is not None:
            self.maps.add(range(step.images), mask[:, None])
        return mask is not None


def blend_rows(
    x_out: torch.Tensor,
    out_b: torch.Tensor,
    x_in: torch.Tensor,
    sigma_in: torch.Tensor | None,
    images: int,
    guidance: float,
    params: FusionParams,
    b_denoised: bool = False,
) -> torch.Tensor | None:
    """Blend one CFG step in place; returns B's mask (images, H, W), or None when it cannot apply.

    ``x_out``/``x_in``: the denoiser's rows, ``images`` cond rows then ``images`` uncond rows.
    ``out_b``: model B's UNet outputs (ε) for the same rows, or with ``b_denoised`` its denoised
    predictions (Forge). ``sigma_in`` given: ``x_out`` holds denoised predictions ``D = x − σ·ε``
    (k-diffusion, Forge); None: ``x_out`` holds ε (timestep samplers).
    A cond row and its uncond row take B's values at the same pixels.
    """
    if x_out.shape[0] != 2 * images or out_b.shape != x_out.shape:
        return None  # uncond skipped (no saliency without it) or AND sub-prompts: A only
    work = torch.promote_types(x_out.dtype, torch.float32)
    if sigma_in is not None:
        sigma, x = sigma_in.to(work).view(-1, 1, 1, 1), x_in.to(work)
        eps_a = (x - x_out.to(work)) / sigma
        if b_denoised:
            eps_b, values_b = (x - out_b.to(work)) / sigma, out_b.to(x_out.dtype)
        else:
            eps_b, values_b = out_b.to(work), (x - sigma * out_b.to(work)).to(x_out.dtype)
    else:
        eps_a, eps_b, values_b = x_out.to(work), out_b.to(work), out_b.to(x_out.dtype)
    n = images
    numbers = params.numbers
    mask = snb_mask(eps_a[:n], eps_a[n:], eps_b[:n], guidance, numbers.k_a, numbers.k_b)
    x_out[:n] = select_by_mask(mask, x_out[:n], values_b[:n])
    x_out[n:] = select_by_mask(mask, x_out[n:], values_b[n:])
    return mask
