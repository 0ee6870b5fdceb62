"""MagicFusion during sampling, for either host: model B's cache, the window gate and the row blend.

The hosts hand over what their CFG denoiser produced for model A (cond rows then uncond rows, as
denoised predictions ``D = x − σ·ε`` on k-diffusion samplers or as ε on timestep samplers) and
model B's raw UNet outputs for the same rows; :func:`blend_rows` selects per pixel, row by row, so
the host's own CFG combine then yields ``M·CFG_B + (1 − M)·CFG_A`` and every later step (inpaint mask
blending, previews, other extensions) keeps working.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ...core import host_memory
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

    def fused(self, timestep: float) -> bool:
        """Whether SNB runs at the DDPM timestep the UNet sees (outside the window B is not run at all)."""
        return fused_at_timestep(float(timestep), self.params.numbers.window)

    def context_b(self, context: torch.Tensor, cond_rows: int) -> torch.Tensor:
        """B's context for a UNet call whose first ``cond_rows`` rows are cond rows: prompt B there."""
        if self.prompt_b is None or cond_rows == 0:
            return context
        prompt = self.prompt_b.to(device=context.device, dtype=context.dtype)
        if prompt.shape[0] != context.shape[1]:
            from ...core.errors import MigcError

            raise MigcError(f"MagicFusion: prompt B takes {prompt.shape[0] // 77} chunk(s) of 75 tokens but the main prompt "
                            f"takes {context.shape[1] // 77}; make them the same length class (e.g. add BREAK or shorten one).")
        out = context.clone()
        out[:cond_rows] = prompt
        return out


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
