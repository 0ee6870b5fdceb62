"""WebUI Forge adapter for MagicFusion: model B runs inside Forge's own sampling function.

Forge computes A's cond and uncond denoised predictions with ``calc_cond_uncond_batch`` and then
calls the post-CFG functions with them. Ours runs the *same* compiled conditions (A's text encoder,
prompt B pasted in when given, no ControlNet) through B's UNet with that very function, blends per
pixel and returns ``denoised + (CFG(blend) − CFG(A))``: what the earlier post-CFG functions and
another extension's ``sampler_cfg_function`` made of A's step is kept, and only the change of the blend is
added (with nothing else installed that is exactly the guided blend); a conditioning modifier records the CFG scale of the step
(Forge's hires CFG, NGMS and skip-early-CFG already applied). Both are registered on a clone of the
job's UnetPatcher, like the attention patches, so nothing global changes; B's UNet is handed to Forge's
memory manager with ``add_extra_torch_module_during_sampling`` and moves with A.

B is Forge's own UNet class built from A's config and loaded strictly from B's file (safetensors, or the allow-list unpickler).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.errors import CheckpointError
from ..modes.magicfusion.runtime import MODEL_B, FusionRuntime, blend_rows
from ..modes.magicfusion.weights import check_pair, load_unet_state, state_shapes
from .base import ClonePatches, weak_patch
from .a1111_fusion import _checkpoint, model_b_info  # noqa: F401  (the checkpoint list is the same module in Forge)


def _patcher(p: Any) -> Any:
    return p.sd_model.forge_objects.unet


def forget_in_forge_memory(module: nn.Module) -> None:
    """Drop Forge's own references to ``module``. ``add_extra_torch_module_during_sampling`` wraps it in a
    ModelPatcher listed by the UnetPatcher clone (and by every later clone of it, e.g. our attention
    hooks'), and Forge's memory manager keeps both the sampled clone and that patcher in
    ``current_loaded_models`` until it needs the memory (on a CPU host: never). Without this every model B
    ever loaded would stay resident."""
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


MODEL_B.on_drop(forget_in_forge_memory)


def load_model_b(p: Any, title: str) -> tuple[nn.Module, str, str | None]:
    """(B's UNet, title, short hash): Forge's UNet class from A's config, weights loaded strictly; cached."""
    info = _checkpoint(title)
    unet_a = _patcher(p).model.diffusion_model
    reference = next(unet_a.parameters())
    key = (info.filename, os.path.getmtime(info.filename), id(unet_a), reference.dtype)

    def build() -> nn.Module:
        state = load_unet_state(info.filename)
        check_pair(state_shapes(unet_a.state_dict()), state_shapes(state), "the loaded model", info.title)
        config = dict(getattr(unet_a, "config", None) or {})
        if not config:
            raise CheckpointError("MagicFusion: the loaded UNet has no config to build model B from.")
        from_config = getattr(type(unet_a), "from_config", None)  # Forge's diffusers-style config (extra keys filtered)
        unet = from_config(config) if from_config is not None else type(unet_a)(**config)
        unet.load_state_dict(state, strict=True)
        return unet.to(dtype=reference.dtype).eval().requires_grad_(False)

    return (MODEL_B.get(key, build), *model_b_info(title))


class _ModelB(nn.Module):
    """What ``calc_cond_uncond_batch`` needs of a model (``apply_model``, ``memory_required``) for B's
    UNet, with A's noise schedule and compute dtype (the same scaling Forge's KModel applies to A)."""

    def __init__(self, model_a: Any, unet_b: nn.Module) -> None:
        super().__init__()
        self.unet_b = unet_b
        self.predictor = model_a.predictor
        self.computation_dtype = getattr(model_a, "computation_dtype", next(unet_b.parameters()).dtype)
        self._memory_required = model_a.memory_required

    def memory_required(self, input_shape: Any) -> float:
        return self._memory_required(input_shape)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None, control: Any = None,
                    transformer_options: Any = None, **kwargs: Any) -> torch.Tensor:
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        device = next(self.unet_b.parameters()).device
        out = self.unet_b(xc.to(device=device, dtype=self.computation_dtype), self.predictor.timestep(t).float().to(device),
                          context=c_crossattn.to(device=device, dtype=self.computation_dtype)).float()
        return self.predictor.calculate_denoised(sigma, out.to(x.device), x)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain CFG of denoised predictions."""
    return uncond + scale * (cond - uncond)


def _for_b(conds: list[dict] | None, prompt_b: torch.Tensor | None) -> list[dict] | None:
    """A's compiled conditions for B: no ControlNet, and prompt B as the cross-attention context if given."""
    if conds is None:
        return None
    out = []
    for entry in conds:
        entry = {k: v for k, v in entry.items() if k != "control"}
        if prompt_b is not None and "model_conds" in entry and "c_crossattn" in entry["model_conds"]:
            model_conds = dict(entry["model_conds"])
            old = model_conds["c_crossattn"]
            new = copy.copy(old)
            new.cond = prompt_b.to(device=old.cond.device, dtype=old.cond.dtype).expand(old.cond.shape[0], -1, -1)
            model_conds["c_crossattn"] = new
            entry["model_conds"] = model_conds
        out.append(entry)
    return out


def _calc_cond_uncond_batch() -> Callable:
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    return calc_cond_uncond_batch


def _keep_model_options(model, x, timestep, uncond, cond, cond_scale, model_options, seed):  # noqa: ANN001, ANN202
    return model, x, timestep, uncond, cond, cond_scale, model_options, seed


def _keep_denoised(args: dict) -> torch.Tensor:
    return args["denoised"]


class FusionHooks(ClonePatches):
    """The conditioning modifier and post-CFG function of one pass, on a clone of the job's UnetPatcher.

    Both reach these hooks through a weak reference: Forge keeps sampled clones after the job, and they
    must not keep the runtime alive (B leaves them with :func:`forget_in_forge_memory`)."""

    def __init__(self, runtime: FusionRuntime, is_current: Callable[[], bool] = lambda: True) -> None:
        super().__init__(is_current)
        self.runtime = runtime
        self._scale: float | None = None

    def install(self, p: Any) -> None:
        if self.runtime.unet_b is None:
            from ..core.errors import MigcError

            raise MigcError("MagicFusion: model B \"same\" is not available on Forge yet; pick a second checkpoint.")
        clone = _patcher(p).clone()
        clone.add_conditioning_modifier(weak_patch(self, FusionHooks._record_scale, _keep_model_options))
        clone.set_model_sampler_post_cfg_function(weak_patch(self, FusionHooks._post_cfg, _keep_denoised))
        clone.add_extra_torch_module_during_sampling(self.runtime.unet_b, cast_to_unet_dtype=False)  # B is in A's dtype already
        p.sd_model.forge_objects.unet = clone
        self._active = True

    def _record_scale(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):  # noqa: ANN001, ANN202
        """Conditioning modifier: the CFG scale of this step, after Forge's own changes to it."""
        self._scale = float(cond_scale)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _post_cfg(self, args: dict) -> torch.Tensor:
        """Post-CFG function: B's rows through Forge's own batch function, blended per pixel with A's."""
        denoised, uncond_pred = args["denoised"], args.get("uncond_denoised")
        model, sigma, x, scale, runtime = args["model"], args["sigma"], args["input"], self._scale, self.runtime
        if uncond_pred is None or args.get("uncond") is None or scale is None:
            return denoised  # uncond skipped (CFG 1): no saliency, A alone
        if not runtime.fused(model.predictor.timestep(sigma).flatten()[0].item()):
            return denoised
        model_b = _ModelB(model, runtime.unet_b)
        b_cond, b_uncond = _calc_cond_uncond_batch()(model_b, _for_b(args["cond"], runtime.prompt_b),
                                                     _for_b(args["uncond"], None), x, sigma, {"transformer_options": {}})
        rows = torch.cat([args["cond_denoised"], uncond_pred])
        images = x.shape[0]
        sig = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(images)
        blend_rows(rows, torch.cat([b_cond, b_uncond]), torch.cat([x, x]), torch.cat([sig, sig]),
                   images, scale, runtime.params, b_denoised=True)
        return denoised + (guided(rows[:images], rows[images:], scale) - guided(args["cond_denoised"], uncond_pred, scale))

    def on_cfg_step(self, step: int, steps: int, params: Any) -> None:
        pass

    def on_cfg_denoised(self, params: Any) -> None:
        pass
