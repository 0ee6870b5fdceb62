"""WebUI Forge adapter of the MultiDiffusion region mode: the UnetPatcher's model-function wrapper.

Why the wrapper rather than Forge's masked conditioning entries (docs/modes/multidiffusion.md §5):
bootstrapping needs a different *input* per box region, which entries cannot carry (they share x),
so the wrapper would be needed anyway and would have to recognise regions by comparing contexts
(ambiguous when two boxes share a description). The wrapper sees each batched model call with its
``cond_or_uncond`` marks, expands its rows into region rows through the same
:class:`~lib_migc.modes.multidiffusion.runtime.RegionRuntime` as on A1111, and returns the fused rows, so
Forge's ``calc_cond_uncond_batch`` and CFG never notice. ``apply_model`` works in k-space: the input
is x, the timestep is sigma and the output is x0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.errors import MigcError
from ..modes.multidiffusion.runtime import RegionRuntime
from .base import ClonePatches, weak_patch

COND = 0


def _plain_call(apply_model: Callable, args: dict) -> torch.Tensor:
    return apply_model(args["input"], args["timestep"], **args["c"])


def _transformer_options(options: dict, is_cond: list[bool]) -> dict:
    """Row marks for the expanded batch (one row per chunk), so attention patches that read them agree."""
    out = dict(options)
    marks = [COND if c else 1 for c in is_cond]
    out["cond_or_uncond"] = marks
    out["cond_indices"] = [i for i, m in enumerate(marks) if m == COND]
    out["uncond_indices"] = [i for i, m in enumerate(marks) if m != COND]
    return out


class RegionHooks(ClonePatches):
    """The model-function wrapper of one sampling pass, on a clone of the job's UnetPatcher."""

    def __init__(self, runtime: RegionRuntime, is_current: Callable[[], bool] = lambda: True,
                 raise_pending: Callable[[], None] = lambda: None) -> None:
        super().__init__(is_current)
        self.runtime = runtime
        self.runtime.space = "k"
        self.raise_pending = raise_pending
        self.step = 0

    def install(self, p: Any) -> None:
        patcher = p.sd_model.forge_objects.unet
        if "model_function_wrapper" in patcher.model_options:
            raise MigcError("MultiDiffusion could not start: another extension already wraps Forge's UNet function "
                            "(e.g. Regional Prompter or Forge Couple); disable it for this image.")
        clone = patcher.clone()
        clone.set_model_unet_function_wrapper(weak_patch(self, RegionHooks._wrapper, _plain_call))
        p.sd_model.forge_objects.unet = clone
        self._active = True

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        self.step = step

    def _wrapper(self, apply_model: Callable, args: dict) -> torch.Tensor:
        """Forge's model-function wrapper: the batch's rows expanded into region rows, fused back."""
        x, timestep, c, marks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        if not self.runtime.fits(x):
            return apply_model(x, timestep, **c)
        self.raise_pending()
        if c.get("control") is not None:
            raise MigcError("MultiDiffusion does not support ControlNet on Forge yet: disable ControlNet or use "
                            "the naive mode.")
        per = x.shape[0] // max(len(marks), 1)
        is_cond = [marks[r // per] == COND for r in range(x.shape[0])]
        images = [r % per for r in range(x.shape[0])]

        def call(xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor, vec: torch.Tensor | None,
                 source: torch.Tensor) -> torch.Tensor:
            rows = dict(c)
            rows["c_crossattn"] = ctx
            if vec is not None:
                rows["y"] = vec
            if isinstance(c.get("c_concat"), torch.Tensor):
                rows["c_concat"] = c["c_concat"][source]
            rows["transformer_options"] = _transformer_options(c.get("transformer_options", {}),
                                                               [is_cond[int(s)] for s in source])
            return apply_model(xs, levels, **rows)

        return self.runtime.denoise(call, x, timestep, c["c_crossattn"], c.get("y"), is_cond, images, self.step)
