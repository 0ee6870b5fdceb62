"""WebUI Forge adapter: the hook points (attn2 slot, denoiser model call, CFG blend step, attn1 of chosen
layers; the sampler's latent is ``base.SamplerInputHooks``) through the UnetPatcher's own patches, the
Forge way, once for every mode.

Each ``install`` clones ``p.sd_model.forge_objects.unet``, registers its patches and sets the clone back:
nothing global is patched, and Forge restores its objects for the next job, so there is nothing to undo.

Why three patches: Forge's attn2 *replacement* gets q/k/v already projected and must return the
result before ``to_out``, while MIGC mixes outputs after ``to_out`` and needs the attn2 input itself
(the Layout Attention and the Enhancement Attention read it). So

* ``attn2_patch`` (before attn2) keeps the normed input and context of a layer that is not vanilla
  at this step;
* ``attn2_replace`` on the hooked layers computes the attention of the uncond rows only, with Forge's
  own attention function (cond rows are left empty instead of computed and thrown away); at vanilla
  steps it is exactly Forge's attention for every row. When another extension (IP-Adapter, another
  regional extension) already replaced that layer's attention, its replacement is called instead, for
  all rows with the options it expects; only the cond rows MIGC shades are then overwritten;
* ``attn2_output_patch`` (after ``to_out``) puts the cond rows computed by the shared
  :meth:`MigcSession.shade` in place.

Which rows are cond comes from Forge itself (``cond_indices`` in the transformer options; Forge puts
uncond rows first); the step comes from the CFG-denoiser callback like on A1111. Patches are plain
functions holding the hooks weakly, not bound methods: a later ``clone()`` deep-copies the model options,
and Forge keeps sampled clones after the job.

The model call is the UnetPatcher's model-function wrapper: it sees each batched call of
``calc_cond_uncond_batch`` with its ``cond_or_uncond`` marks, so a mode's rows are invisible to Forge's
CFG (docs/modes/multidiffusion.md §5: why not Forge's masked conditioning entries). ``apply_model``
works in k-space: x in, sigma as the timestep, x0 out; another UNet runs with the same predictor's
scaling. The blend step is a post-CFG function (the CFG scale of the step comes from a conditioning
modifier, after Forge's own hires-CFG/NGMS changes): it returns ``denoised + (CFG(blend) − CFG(rows))``,
so what earlier post-CFG functions and another extension's ``sampler_cfg_function`` made of the step is
kept. Modules a mode adds (model B) are handed to Forge's memory manager and leave it with
:func:`forget_module`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import MigcError
from ..core.hook_points import CfgRows, ModelRows, SelfAttentionFn
from ..core.unet_layers import attn2_layers, layer_name, split_layer_name
from .base import ClonePatches, HooksBase, SamplerInputHooks, StepHooksBase, weak_patch  # noqa: F401 - SamplerInputHooks: the host's, for modes

COND = 0  # Forge's cond_or_uncond mark of a cond chunk


def unet_of(p: Any) -> nn.Module:
    """Forge's UNet module (IntegratedUNet2DConditionModel) behind the job's UnetPatcher."""
    return p.sd_model.forge_objects.unet.model.diffusion_model


def vae_of(p: Any) -> nn.Module:
    """The autoencoder module (its ``encoder`` and ``decoder``) behind Forge's VAE patcher."""
    return p.sd_model.forge_objects.vae.first_stage_model


def decline_reason(p: Any, feature: str = "MIGC") -> str | None:
    return None


def unet_streamed() -> bool:
    """Forge's memory manager moves whole models, and a mode's extra modules with them: never streamed."""
    return False


def empty_unet_like(p: Any) -> nn.Module:
    """Forge's own UNet class built from the loaded UNet's config (not a copy of A: no patches, no weights)."""
    unet_a = unet_of(p)
    config = dict(getattr(unet_a, "config", None) or {})
    if not config:
        raise MigcError("the loaded UNet has no config to build a second UNet from.")
    from_config = getattr(type(unet_a), "from_config", None)  # Forge's diffusers-style config (extra keys filtered)
    return from_config(config) if from_config is not None else type(unet_a)(**config)


def placement_of(unet: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """(device, dtype) of a second UNet: A's dtype; the device is left to Forge's memory manager, which moves
    it with A during sampling (``add_extra_torch_module_during_sampling``)."""
    return None, next(unet.parameters()).dtype


def forget_module(module: nn.Module) -> None:
    """Drop Forge's own references to ``module``. ``add_extra_torch_module_during_sampling`` wraps it in a
    ModelPatcher listed by the UnetPatcher clone (and by every later clone of it, e.g. our attention
    hooks'), and Forge's memory manager keeps both the sampled clone and that patcher in
    ``current_loaded_models`` until it needs the memory (on a CPU host: never). Without this every
    module a mode ever added (each model B) would stay resident."""
    try:
        from backend import memory_management
    except ImportError:
        return
    loaded = memory_management.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        patcher = getattr(loaded[index], "model", None)
        if getattr(patcher, "model", None) is module:
            loaded.pop(index)
            continue
        extras = getattr(patcher, "extra_model_patchers_during_sampling", None)
        if extras:
            extras[:] = [extra for extra in extras if getattr(extra, "model", None) is not module]


def block_key(layer: str) -> tuple[str, int, int]:
    """Our layer name -> Forge's transformer block key: ``output_blocks.3.1.4`` -> ("output", 3, 4)."""
    base, transformer_index = split_layer_name(layer)
    kind, index = base.split(".")[:2]
    names = {"input_blocks": ("input", int(index)), "middle_block": ("middle", 0), "output_blocks": ("output", int(index))}
    return (*names[kind], transformer_index)


def layer_of(extra_options: dict) -> str | None:
    """Forge's ``extra_options`` (``block`` and ``block_index``) -> our layer name."""
    block = extra_options.get("block")
    if not block:
        return None
    kind, index = block[0], int(block[1])
    base = {"input": f"input_blocks.{index}.1", "middle": "middle_block.1", "output": f"output_blocks.{index}.1"}.get(kind)
    return None if base is None else layer_name(base, int(extra_options.get("block_index", 0) or 0))


def _forge_attention() -> Callable:
    """Forge's own attention function (bit-identical vanilla rows); plain SDPA outside Forge."""
    try:
        from backend.attention import attention_function

        return attention_function
    except ImportError:
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any = None) -> torch.Tensor:
            split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(-2)

        return sdpa


def existing_attn2_replace(model_options: dict, key: tuple[str, int, int]) -> Callable | None:
    """The attn2 replacement another extension registered for this transformer block, found the way
    Forge's transformer block looks it up (``(block, number, index)`` first, then ``(block, number)``)."""
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(key) or replaces.get(key[:2])


class Hooks(HooksBase, ClonePatches):
    """The attn2 patches of one sampling pass; ``remove`` makes them inert (Forge drops the clone itself).

    The patches reach these hooks through a weak reference (:func:`~.base.weak_patch`): Forge keeps
    sampled clones, and with them their patches, long after the job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        HooksBase.__init__(self, *args, **kwargs)
        ClonePatches.__init__(self, self.is_current)
        self.layers: dict[str, nn.Module] = {}
        self.images = 1
        self._attention = _forge_attention()
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def live(self) -> bool:
        if not ClonePatches.live(self):
            self._stash.clear()
            return False
        return True

    def install(self, p: Any) -> list[str]:
        patcher = p.sd_model.forge_objects.unet
        self.images = max(len(getattr(p, "seeds", [])), 1)
        all_layers = attn2_layers(patcher.model.diffusion_model)
        names = self.layers_to_hook(all_layers)
        self.layers = {name: all_layers[name] for name in names}
        clone = patcher.clone()
        clone.set_model_attn2_patch(weak_patch(self, Hooks._before, lambda n, context, value, extra_options: (n, context, value)))
        for name in names:
            key = block_key(name)
            clone.set_model_attn2_replace(self._replace_for(existing_attn2_replace(clone.model_options, key)), *key)
        clone.set_model_attn2_output_patch(weak_patch(self, Hooks._after, lambda n, extra_options: n))
        p.sd_model.forge_objects.unet = clone
        self._active = True
        return names

    def remove(self) -> None:
        ClonePatches.remove(self)
        self._stash.clear()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        self.session.set_step(step, total_steps)

    def _before(self, n: torch.Tensor, context: torch.Tensor, value: Any, extra_options: dict) -> tuple:
        """attn2_patch: keep the normed input and context of a layer MIGC shades at this step."""
        self.raise_pending_error()
        layer = layer_of(extra_options)
        if layer in self.layers:
            mode = self.session.mode_for(layer)
            if self.session.is_shaded(mode) and extra_options.get("cond_indices"):
                self._stash[layer] = (n, context, mode)
        return n, context, value

    def _replace_for(self, previous: Callable | None) -> Callable:
        """Our attn2 replacement of one layer, chaining ``previous`` (another extension's replacement of
        that layer) for every row and step MIGC does not shade; it sees the rows and options it expects,
        and the cond rows MIGC shades are overwritten after ``to_out``."""
        attention = self._attention

        def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            if previous is not None:
                return previous(q, k, v, extra_options)
            return attention(q, k, v, extra_options["n_heads"])

        def replace(hooks: Hooks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            if previous is not None or layer_of(extra_options) not in hooks._stash:
                return plain(q, k, v, extra_options)
            uncond = extra_options.get("uncond_indices") or []
            out = q.new_zeros(q.shape)  # cond rows are shaded after to_out: not computed here to be thrown away
            if uncond:
                out[uncond] = attention(q[uncond], k[uncond], v[uncond], extra_options["n_heads"])
            return out

        return weak_patch(self, replace, plain)

    def _after(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """attn2_output_patch: put the cond rows shaded by :meth:`MigcSession.shade` in place."""
        layer = layer_of(extra_options)
        kept = self._stash.pop(layer, None) if layer is not None else None
        if kept is None:
            return n
        x, context, mode = kept
        cond = list(extra_options["cond_indices"])
        attn = self.layers[layer]
        images = [j % self.images for j in range(len(cond))]
        plain = lambda xx, cc: attn(xx, context=cc)  # noqa: E731
        shaded = self.session.shade(layer, attn, plain, x[cond], context[cond], images, mode)
        n = n.clone()
        n[cond] = shaded.to(n.dtype)
        return n


# ---------------------------------------------------------------------------------------- step hooks
def _plain_call(apply_model: Callable, args: dict) -> torch.Tensor:
    return apply_model(args["input"], args["timestep"], **args["c"])


def _keep_model_options(model, x, timestep, uncond, cond, cond_scale, model_options, seed):  # noqa: ANN001, ANN202
    return model, x, timestep, uncond, cond, cond_scale, model_options, seed


def _keep_denoised(args: dict) -> torch.Tensor:
    return args["denoised"]


def _row_options(options: dict, is_cond: list[bool]) -> dict:
    """Row marks for a batch a mode built (one mark per row), so attention patches that read them agree."""
    out = dict(options)
    marks = [COND if c else 1 for c in is_cond]
    out["cond_or_uncond"] = marks
    out["cond_indices"] = [i for i, m in enumerate(marks) if m == COND]
    out["uncond_indices"] = [i for i, m in enumerate(marks) if m != COND]
    return out


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain CFG of denoised predictions."""
    return uncond + scale * (cond - uncond)


class _OtherUnet(nn.Module):
    """What Forge's model call needs of a model (``apply_model``) for a second UNet, with the main
    model's noise schedule and compute dtype (the same scaling Forge's KModel applies to A)."""

    def __init__(self, model_a: Any, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.predictor = model_a.predictor
        self.computation_dtype = getattr(model_a, "computation_dtype", next(unet.parameters()).dtype)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None) -> torch.Tensor:
        xc = self.predictor.calculate_input(t, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        device = next(self.unet.parameters()).device
        out = self.unet(xc.to(device=device, dtype=self.computation_dtype), self.predictor.timestep(t).float().to(device),
                        context=c_crossattn.to(device=device, dtype=self.computation_dtype)).float()
        return self.predictor.calculate_denoised(t, out.to(x.device), x)


class StepHooks(StepHooksBase, ClonePatches):
    """A mode's model-function wrapper, conditioning modifier and post-CFG function of one pass, on a
    clone of the job's UnetPatcher; all reach these hooks through a weak reference (Forge keeps sampled
    clones after the job, and they must not keep a mode's runtime or modules alive)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        StepHooksBase.__init__(self, *args, **kwargs)
        ClonePatches.__init__(self, self.is_current)
        self._scale: float | None = None
        self._previous: Callable | None = None  # another extension's model-function wrapper, chained

    def install(self, p: Any) -> None:
        patcher = p.sd_model.forge_objects.unet
        clone = patcher.clone()
        if self.denoise is not None:
            self._previous = patcher.model_options.get("model_function_wrapper")
            clone.set_model_unet_function_wrapper(weak_patch(self, StepHooks._wrapper, self._previous or _plain_call))
        if self.blend is not None:
            clone.add_conditioning_modifier(weak_patch(self, StepHooks._record_scale, _keep_model_options))
            clone.set_model_sampler_post_cfg_function(weak_patch(self, StepHooks._post_cfg, _keep_denoised))
        for module in self.modules:
            clone.add_extra_torch_module_during_sampling(module, cast_to_unet_dtype=False)  # in A's dtype already
        p.sd_model.forge_objects.unet = clone
        self._active = True

    def _wrapper(self, apply_model: Callable, args: dict) -> torch.Tensor:
        """The model-function wrapper: the batch's rows, with Forge's marks, to the mode. Another
        extension's wrapper (e.g. Forge Couple) is chained for the call as Forge made it; rows a mode builds
        itself cannot go through it, so such a mode then stops with a message."""
        x, timestep, c, marks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        self.raise_pending()
        previous = self._previous
        per = x.shape[0] // max(len(marks), 1)
        is_cond = [marks[r // per] == COND for r in range(x.shape[0])]
        images = [r % per for r in range(x.shape[0])]
        model = getattr(apply_model, "__self__", None)

        def call(xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor, vec: torch.Tensor | None,
                 source: torch.Tensor) -> torch.Tensor:
            if previous is not None:
                raise MigcError(f"{self.title} could not run: another extension already wraps Forge's UNet function "
                                "(e.g. Regional Prompter or Forge Couple); disable it for this image.")
            rows = dict(c)
            rows["c_crossattn"] = ctx
            if vec is not None:
                rows["y"] = vec
            if isinstance(c.get("c_concat"), torch.Tensor):
                rows["c_concat"] = c["c_concat"][source]
            rows["transformer_options"] = _row_options(c.get("transformer_options", {}), [is_cond[int(s)] for s in source])
            return apply_model(xs, levels, **rows)

        def call_unet(unet: nn.Module | None, xs: torch.Tensor, levels: torch.Tensor, ctx: torch.Tensor,
                      vec: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
            if unet is None:
                return call(xs, levels, ctx, vec, source)
            concat = c["c_concat"][source] if isinstance(c.get("c_concat"), torch.Tensor) else None
            return _OtherUnet(model, unet).apply_model(xs, levels, c_concat=concat, c_crossattn=ctx)

        step_t = model.predictor.timestep(timestep) if model is not None else timestep
        rows = ModelRows(x, timestep, c["c_crossattn"], c.get("y"), is_cond, images, self.step, "k",
                         float(torch.as_tensor(step_t).flatten()[0]),
                         lambda: previous(apply_model, args) if previous is not None else apply_model(x, timestep, **c), call, call_unet,
                         has_control=c.get("control") is not None)
        return self.denoise(rows)

    def _record_scale(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):  # noqa: ANN001, ANN202
        """Conditioning modifier: the CFG scale of this step, after Forge's own changes to it."""
        self._scale = float(cond_scale)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _post_cfg(self, args: dict) -> torch.Tensor:
        """Post-CFG function: the mode blends the step's rows; only the change of the guided result is added."""
        denoised, cond_pred, uncond_pred = args["denoised"], args["cond_denoised"], args.get("uncond_denoised")
        scale, x = self._scale, args["input"]
        if uncond_pred is None or args.get("uncond") is None or scale is None:
            return denoised  # uncond skipped (CFG 1): nothing to blend against
        images = x.shape[0]
        rows = torch.cat([cond_pred, uncond_pred])
        sigma = torch.as_tensor(args["sigma"], device=x.device).reshape(-1).expand(images)
        if not self.blend(CfgRows(rows, torch.cat([x, x]), torch.cat([sigma, sigma]), images, scale, self.step)):
            return denoised
        return denoised + (guided(rows[:images], rows[images:], scale) - guided(cond_pred, uncond_pred, scale))


# ---------------------------------------------------------------------------------------- self-attention
def _keep_attn1(n: torch.Tensor, context: Any, value: Any, extra_options: dict) -> tuple:
    return n, context, value


class SelfAttentionHooks(ClonePatches):
    """An ``attn1_patch`` on a clone of the job's UnetPatcher: for the layers ``wants`` picks, the keys and
    values come from what ``source(layer, n)`` returns (None: plain), handed on as Forge's
    ``context_attn1``/``value_attn1``, so Forge's attention (or another extension's attn1 replacement)
    still computes it. A call whose context an earlier patch already changed (e.g. ControlNet's
    reference mode), or that another patch will see after us, keeps theirs: ours only acts while the
    context is still the block's own normed input."""

    def __init__(self, source: SelfAttentionFn, wants: Callable[[str], bool], is_current: Callable[[], bool] = lambda: True) -> None:
        ClonePatches.__init__(self, is_current)
        self.source, self.wants = source, wants

    def install(self, p: Any) -> None:
        clone = p.sd_model.forge_objects.unet.clone()
        clone.set_model_attn1_patch(weak_patch(self, SelfAttentionHooks._patch, _keep_attn1))
        p.sd_model.forge_objects.unet = clone
        self._active = True

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """Nothing: the source counts each layer's calls itself."""

    def _patch(self, n: torch.Tensor, context: Any, value: Any, extra_options: dict) -> tuple:
        layer = layer_of(extra_options)
        if layer is None or not self.wants(layer) or context is not n or value is not n:
            return n, context, value
        shared = self.source(layer, n)
        return (n, context, value) if shared is None else (n, shared, shared)
