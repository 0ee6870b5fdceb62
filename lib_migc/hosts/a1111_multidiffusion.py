"""AUTOMATIC1111 adapter of the MultiDiffusion region mode: a wrapper of the CFG denoiser's inner model.

Why there (docs/modes/multidiffusion.md §4): ``CFGDenoiser.forward`` calls
``inner_model(x_in, sigma_in, cond=...)`` with all CFG rows and combines the result itself, so a
wrapper that turns each row into region rows, runs them, and fuses them back into one row is
invisible to CFG, to the sampler and to every sampler family — k-diffusion (the ``CompVisDenoiser``,
k-space x, sigmas, x0 out) and the timesteps samplers (``CompVisTimestepsDenoiser``, VP latent,
integer t, eps out). The wrapper is an instance attribute of the sampler's own inner-model object,
so it goes away with the sampler, and :meth:`RegionHooks.remove` takes it off earlier.

Which rows are cond comes from the CFG-denoiser callback (the rows of ``x_in``: cond rows per image
first, one uncond row per image last), tracked per call with the same cursor as the attn2 hooks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.patching import ForwardPatches
from ..modes.multidiffusion.runtime import RegionRuntime
from .a1111 import RowCursor


def _split_cond(cond: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(contexts, vectors) of A1111's condition dict: ``c_crossattn`` list (SD1/SD2) or SDXL's
    ``crossattn`` / ``vector`` keys (``c_adm`` on crossattn-adm models)."""
    if "crossattn" in cond:
        return cond["crossattn"], cond.get("vector")
    context = cond["c_crossattn"][0]
    return context, cond.get("c_adm")


def _join_cond(cond: dict, contexts: torch.Tensor, vectors: torch.Tensor | None, source: torch.Tensor) -> dict:
    """The condition dict for expanded rows: new contexts/vectors, every other per-row tensor gathered."""
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if key in ("crossattn", "c_crossattn"):
            out[key] = contexts if key == "crossattn" else [contexts]
        elif key in ("vector", "c_adm") and vectors is not None:
            out[key] = vectors
        elif isinstance(value, list):
            out[key] = [v[source] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in value]
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[source]
        else:
            out[key] = value
    return out


class RegionHooks:
    """The inner-model wrapper of one sampling pass."""

    def __init__(self, runtime: RegionRuntime, is_current: Callable[[], bool] = lambda: True,
                 raise_pending: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.is_current = is_current
        self.raise_pending = raise_pending
        self.rows = RowCursor()
        self.step = 0
        self._target: Any = None
        self._patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self._target is not None

    def install(self, p: Any) -> None:
        target = p.sampler.model_wrap_cfg.inner_model  # a property that builds the object once: read it once
        original = target.forward
        self.runtime.space = "k" if hasattr(target, "sigma_to_t") else "vp"
        hooks = self

        def forward(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            cond = kwargs.get("cond")
            if not hooks.installed or not hooks.is_current() or not isinstance(cond, dict):
                return original(x, sigma, **kwargs)
            hooks.raise_pending()
            kinds = hooks.rows.kinds(x.shape[0])
            if kinds is None or not hooks.runtime.fits(x):
                return original(x, sigma, **kwargs)
            contexts, vectors = _split_cond(cond)

            def call(xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor, vec: torch.Tensor | None,
                     source: torch.Tensor) -> torch.Tensor:
                return original(xs, levels, **{**kwargs, "cond": _join_cond(cond, ctx, vec, source)})

            return hooks.runtime.denoise(call, x, sigma, contexts, vectors, [k[0] for k in kinds], [k[1] for k in kinds],
                                         hooks.step)

        self._patches.install(target, forward)
        self._target = target

    def remove(self) -> None:
        """Put back exactly what was there (another extension's wrapper included)."""
        self._target = None
        self._patches.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        self.step = step
        self.rows.from_params(params)
