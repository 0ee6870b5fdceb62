"""AUTOMATIC1111 adapter: the hook points (attn2 slot, denoiser model call, CFG blend step, attn1 of
chosen layers; the sampler's latent is ``base.SamplerInputHooks``) and their row bookkeeping, once for
every mode.

No mode's math here: the attn2 hooks find which rows of each UNet call are cond rows and hand those to
the pass's attention processor (:meth:`MigcSession.shade` or a chain); the step hooks hand each model
call and each step's output rows to a mode's functions (:mod:`lib_migc.core.hook_points`).

Why instance-level ``forward`` overrides: A1111 applies its attention optimisations by replacing
``CrossAttention.forward`` on the class; an instance attribute wins over it, so the hooks work under
every optimisation, and the vanilla path calls the class method *at call time*, so an optimisation
re-applied between (or during) generations is honoured.

Which rows are cond: ``CFGDenoiser.forward`` stacks every image's cond rows (one per AND sub-prompt)
first and the uncond rows (one per image) last, then may drop the uncond rows (NGMS / skip early
CFG) or split the rows into several UNet calls (``batch_cond_uncond`` off, or cond and uncond of
different token lengths) — always in row order. The CFG-denoiser callback gives the row counts of
each step; the first hooked layer of every UNet call advances a row cursor, so each layer knows which
rows of ``x_in`` its call holds.

Why the model call is hooked on the CFG denoiser's inner model (docs/modes/multidiffusion.md §4):
``CFGDenoiser.forward`` calls ``inner_model(x_in, sigma_in, cond=...)`` with all CFG rows and combines
the result itself, so a wrapper there is invisible to CFG, to the sampler and to both sampler families:
k-diffusion (``CompVisDenoiser``: k-space x, sigmas, x0 out) and the timestep samplers
(``CompVisTimestepsDenoiser``: VP latent, integer t, ε out). It is an instance attribute of the
sampler's own inner-model object, so it goes away with the sampler and :meth:`StepHooks.remove` takes it
off earlier. Another UNet (MagicFusion's model B) runs through the very same call with the loaded
model's ``diffusion_model`` swapped for the duration, so it gets A1111's own scaling and casts. The blend
step is the ``on_cfg_denoised`` callback: the rows are changed in place before A1111's CFG combine.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..core.hook_points import CfgRows, ModelRows, SelfAttentionFn
from ..core.patching import ForwardPatches
from ..core.unet_layers import attn1_layers, attn2_layers
from .base import HooksBase, SamplerInputHooks, StepHooksBase  # noqa: F401 - SamplerInputHooks: the host's, for modes

# ---------------------------------------------------------------------------------------- rows
@dataclass
class RowCursor:
    """Where the rows of the current UNet call sit in this step's CFG batch (``x_in``)."""

    cond_rows: int | None = None  # rows of x_in that are cond rows (they come first)
    total_rows: int = 0
    rows_per_image: int = 1
    done: int = 0
    start: int = 0

    def new_step(self, cond_rows: int, total_rows: int, images: int) -> None:
        self.cond_rows, self.total_rows, self.done, self.start = cond_rows, total_rows, 0, 0
        self.rows_per_image = max(cond_rows // max(images, 1), 1) if cond_rows % max(images, 1) == 0 else 0

    def new_call(self, rows: int) -> None:
        self.start = self.done
        self.done += rows

    def from_params(self, params: Any) -> None:
        """This step's rows from the CFG-denoiser callback's ``CFGDenoiserParams`` (SDXL: dict conds)."""
        text_cond, uncond = params.text_cond, params.text_uncond
        if isinstance(text_cond, dict):  # SDXL: {"crossattn", "vector"}
            text_cond, uncond = text_cond.get("crossattn"), uncond.get("crossattn") if isinstance(uncond, dict) else uncond
        if not isinstance(text_cond, torch.Tensor):
            self.cond_rows = None
            return
        images = uncond.shape[0] if isinstance(uncond, torch.Tensor) else text_cond.shape[0]
        self.new_step(text_cond.shape[0], params.x.shape[0], images)

    def kinds(self, rows: int) -> list[tuple[bool, int]] | None:
        """Advance to the next model call of ``rows`` rows; (is cond, image index) of each, or None
        when the call is not one of this step's CFG calls."""
        self.new_call(rows)
        count, images = self.cond_part(rows)
        if self.cond_rows is None or self.start + rows > self.total_rows:
            return None
        uncond = [(False, self.start + j - self.cond_rows) for j in range(count, rows)]
        return [(True, image) for image in images] + uncond

    def cond_part(self, rows: int) -> tuple[int, list[int]]:
        """(number of leading cond rows in this call, image index of each). 0 when the call is not one
        of this step's CFG calls (e.g. another extension running the UNet itself)."""
        if self.cond_rows is None or self.start + rows > self.total_rows:
            return 0, []
        count = max(0, min(self.cond_rows - self.start, rows))
        per = self.rows_per_image
        images = [(self.start + j) // per if per else 0 for j in range(count)]
        return count, images


# ---------------------------------------------------------------------------------------- hooks
def unet_of(p: Any) -> nn.Module:
    """The ldm UNetModel of A1111's loaded SD model."""
    return p.sd_model.model.diffusion_model


def vae_of(p: Any) -> nn.Module:
    """The first-stage autoencoder (its ``encoder`` and ``decoder``) of A1111's loaded SD model."""
    return p.sd_model.first_stage_model


def decline_reason(p: Any, feature: str = "MIGC") -> str | None:
    """What A1111 adds to the host-neutral checks: hypernetworks and edit models change attn2."""
    if getattr(p.sd_model, "cond_stage_key", None) == "edit":
        return f"{feature} was skipped: instruct-pix2pix (edit) checkpoints are not supported."
    from modules import shared

    if getattr(shared, "loaded_hypernetworks", None):
        return f"{feature} was skipped: a hypernetwork is active, and hypernetworks change cross-attention in a way {feature} does not support."
    return None


def unet_streamed() -> bool:
    """Whether ``--medvram``/``--lowvram`` stream the UNet block by block (a second resident UNet would defeat them)."""
    from modules import shared

    opts = getattr(shared, "cmd_opts", None)
    return bool(getattr(opts, "lowvram", False) or getattr(opts, "medvram", False))


def empty_unet_like(p: Any) -> nn.Module:
    """A fresh ldm UNet from the loaded model's own config (not a copy of A: no hooks, no weights)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    config = OmegaConf.load(p.sd_model.used_config)
    return instantiate_from_config(config.model.params.unet_config)


def placement_of(unet: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """(device, dtype) a second UNet beside ``unet`` lives in: A's own (A1111 moves nothing by itself)."""
    reference = next(unet.parameters())
    return reference.device, reference.dtype


def forget_module(module: nn.Module) -> None:
    """A1111's memory management keeps no reference to modules we add: nothing to drop."""


def override_layers(patches: ForwardPatches, layers: dict[str, nn.Module], names: list[str],
                    forward_for: Callable[[str, int], Callable]) -> list[str]:
    """Replace whatever ``patches`` held by a ``forward_for(name, index)`` override on each named layer."""
    patches.remove()
    for index, name in enumerate(names):
        patches.install(layers[name], forward_for(name, index))
    return names


class Hooks(HooksBase):
    """The attn2 overrides of one sampling pass; :meth:`remove` restores the UNet exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = RowCursor()
        self.patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self.patches.active

    def install(self, p: Any) -> list[str]:
        """Hook the layers of ``p``'s UNet that this session can change; returns their names."""
        layers = attn2_layers(unet_of(p))
        return override_layers(self.patches, layers, self.layers_to_hook(layers),
                               lambda name, index: self._forward_for(name, layers[name], first=index == 0))

    def remove(self) -> None:
        self.patches.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """From the CFG-denoiser callback: this step's index and row layout (``CFGDenoiserParams``)."""
        self.session.set_step(step, total_steps)
        self.rows.from_params(params)

    def _forward_for(self, name: str, attn: nn.Module, first: bool) -> Callable:
        previous = attn.__dict__.get("forward")  # another extension's override, if any
        session, rows = self.session, self.rows

        def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
            def plain(xx: torch.Tensor, cc: torch.Tensor | None) -> torch.Tensor:
                if previous is not None:
                    return previous(xx, context=cc, mask=mask, **kwargs)
                return type(attn).forward(attn, xx, context=cc, mask=mask, **kwargs)

            if not self.is_current():
                self.remove()
                return plain(x, context)
            self.raise_pending_error()
            if first:
                rows.new_call(x.shape[0])
            mode = session.mode_for(name)
            if not session.is_shaded(mode) or context is None or context.shape[0] != x.shape[0]:
                return plain(x, context)
            count, images = rows.cond_part(x.shape[0])
            if count == 0:
                return plain(x, context)
            cond_out = session.shade(name, attn, plain, x[:count], context[:count], images, mode)
            if count == x.shape[0]:
                return cond_out
            rest = plain(x[count:], context[count:])
            return torch.cat([cond_out.to(rest.dtype), rest])

        return self.guarded(forward)


# ---------------------------------------------------------------------------------------- step hooks
def _split_cond(cond: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(contexts, vectors) of A1111's condition dict: ``c_crossattn`` list (SD1/SD2) or SDXL's
    ``crossattn`` / ``vector`` keys (``c_adm`` on crossattn-adm models)."""
    if "crossattn" in cond:
        return cond["crossattn"], cond.get("vector")
    context = cond["c_crossattn"][0]
    return context, cond.get("c_adm")


def _join_cond(cond: dict, contexts: torch.Tensor, vectors: torch.Tensor | None, source: torch.Tensor) -> dict:
    """The condition dict for new rows: new contexts/vectors, every other per-row tensor gathered."""
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


@contextlib.contextmanager
def _unet_swapped(sd_model: Any, unet: nn.Module | None) -> Iterator[None]:
    """The loaded model runs ``unet`` instead of its own UNet inside this block (``None``: its own)."""
    if unet is None:
        yield
        return
    wrapper = sd_model.model
    main = wrapper.diffusion_model
    wrapper.diffusion_model = unet
    try:
        yield
    finally:
        wrapper.diffusion_model = main


def guidance_of(params: Any, cfg_scale: float) -> float:
    """The CFG scale the denoiser uses this step (A1111: the sampler's cond_scale times its multiplier)."""
    denoiser = getattr(params, "denoiser", None)
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None)
    if isinstance(extra, dict) and "cond_scale" in extra:
        return float(extra["cond_scale"]) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
    return cfg_scale


@dataclass
class _StepRows:
    """What the CFG-denoiser callback says of this step, for the blend after the model calls."""

    x: torch.Tensor
    sigma: torch.Tensor | None
    images: int
    cond_rows: int
    guidance: float


class StepHooks(StepHooksBase):
    """A mode's model-call wrapper (on the sampler's inner model) and CFG blend (``on_cfg_denoised``) of
    one pass; :meth:`remove` puts back exactly what was there (another extension's wrapper included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = RowCursor()
        self.cfg_scale = 7.0
        self._active = False
        self._step_rows: _StepRows | None = None
        self._patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self._active

    def install(self, p: Any) -> None:
        self.remove()
        self.cfg_scale = float(getattr(p, "cfg_scale", 7.0))
        if self.denoise is not None:
            target = p.sampler.model_wrap_cfg.inner_model  # a property that builds the object once: read it once
            self._patches.install(target, self._wrapper_of(p, target, target.forward))
        self._active = True

    def remove(self) -> None:
        self._active, self._step_rows = False, None
        self._patches.remove()

    def _wrapper_of(self, p: Any, target: Any, original: Callable) -> Callable:
        space = "k" if hasattr(target, "sigma_to_t") else "vp"
        hooks = self

        def forward(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            cond = kwargs.get("cond")
            if not hooks._active or not hooks.is_current() or not isinstance(cond, dict):
                return original(x, sigma, **kwargs)
            hooks.raise_pending()
            kinds = hooks.rows.kinds(x.shape[0])
            if kinds is None:
                return original(x, sigma, **kwargs)
            contexts, vectors = _split_cond(cond)

            def call(xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor, vec: torch.Tensor | None,
                     source: torch.Tensor) -> torch.Tensor:
                return original(xs, levels, **{**kwargs, "cond": _join_cond(cond, ctx, vec, source)})

            def call_unet(unet: nn.Module | None, xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor,
                          vec: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
                with _unet_swapped(p.sd_model, unet):
                    return call(xs, levels, ctx, vec, source)

            timestep = target.sigma_to_t(sigma.flatten()[:1]) if space == "k" else sigma.flatten()[:1]
            rows = ModelRows(x, sigma, contexts, vectors, [k[0] for k in kinds], [k[1] for k in kinds], hooks.step,
                             space, float(timestep.flatten()[0]), lambda: original(x, sigma, **kwargs), call, call_unet)
            try:
                return hooks.denoise(rows)
            except BaseException:
                hooks.remove()
                raise

        return forward

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """``on_cfg_denoiser``: this step's rows (for the model calls) and its input, σ and guidance (for the blend)."""
        super().on_cfg_step(step, total_steps, params)
        self.rows.from_params(params)
        self._step_rows = None
        text_cond, uncond = params.text_cond, params.text_uncond
        if self.blend is None or not isinstance(text_cond, torch.Tensor) or not isinstance(uncond, torch.Tensor):
            return
        timesteps = type(getattr(params, "denoiser", None)).__name__ == "CFGDenoiserTimesteps"
        self._step_rows = _StepRows(params.x, None if timesteps else params.sigma, uncond.shape[0], text_cond.shape[0],
                                    guidance_of(params, self.cfg_scale))

    def on_cfg_denoised(self, params: Any) -> None:
        """``on_cfg_denoised``: the mode blends the denoiser's output rows in place, before A1111's CFG combine."""
        step, self._step_rows = self._step_rows, None
        if step is None or not self._active or not self.is_current() or step.cond_rows != step.images:
            return
        out = params.x
        rows = out.shape[0]
        sigma = step.sigma[:rows] if step.sigma is not None else None
        try:
            self.blend(CfgRows(out, step.x[:rows], sigma, step.images, step.guidance, self.step))
        except BaseException:
            self.remove()
            raise


# ---------------------------------------------------------------------------------------- self-attention
class SelfAttentionHooks:
    """attn1 overrides on the layers ``wants`` picks: the keys and values of each call come from what
    ``source(layer, x)`` returns (None: plain). The override passes it as the ``context`` argument, which
    every A1111 attention optimisation (and ldm's own forward) projects to keys and values, so the
    active optimisation still computes the attention; another extension's override is chained."""

    def __init__(self, source: SelfAttentionFn, wants: Callable[[str], bool], is_current: Callable[[], bool] = lambda: True) -> None:
        self.source, self.wants, self.is_current = source, wants, is_current
        self.patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self.patches.active

    def install(self, p: Any) -> list[str]:
        layers = attn1_layers(unet_of(p))
        return override_layers(self.patches, layers, [name for name in layers if self.wants(name)],
                               lambda name, index: self._forward_for(name, layers[name]))

    def remove(self) -> None:
        self.patches.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """Nothing: the source counts each layer's calls itself."""

    def _forward_for(self, name: str, attn: nn.Module) -> Callable:
        previous = attn.__dict__.get("forward")

        def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
            def plain(cc: torch.Tensor | None) -> torch.Tensor:
                if previous is not None:
                    return previous(x, context=cc, mask=mask, **kwargs)
                return type(attn).forward(attn, x, context=cc, mask=mask, **kwargs)

            if not self.installed or not self.is_current() or context is not None:
                return plain(context)
            try:
                return plain(self.source(name, x))
            except BaseException:
                self.remove()
                raise

        return forward

