"""AUTOMATIC1111 adapter for MagicFusion: model B rides along with every UNet call of model A.

Why a ride-along on A's ``UNetModel.forward`` (an instance override, removed after each batch): B then
sees exactly the scaled input, timestep and context A sees, through chunked or padded CFG calls and
both sampler families, and the window is gated on the timestep the UNet actually gets (fractional on
k-diffusion schedules). B's outputs are stashed per call; the ``on_cfg_denoised`` callback then blends
them into the denoiser's output rows in place, before A1111's own CFG combine.

Model B is only a UNet: built from the loaded model's own ldm config, loaded strictly from B's file
(safetensors, or the allow-list unpickler), in A's dtype and device; A's text encoder and VAE serve both, as in the official
fused run. ``--medvram``/``--lowvram`` stream A's UNet block by block; MagicFusion refuses them rather
than stream a second UNet per step.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.errors import CheckpointError, MigcError
from ..modes.magicfusion.runtime import MODEL_B, FusionRuntime, blend_rows
from ..modes.magicfusion.weights import check_pair, load_unet_state, state_shapes
from .a1111 import RowCursor, unet_of


def _build_like(sd_model: Any) -> nn.Module:
    """A fresh, empty ldm UNet from the loaded model's own config (not a copy of A: no hooks, no weights)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    config = OmegaConf.load(sd_model.used_config)
    return instantiate_from_config(config.model.params.unet_config)


def _checkpoint(title: str) -> Any:
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise CheckpointError(f"MagicFusion: model B '{title}' is not in the checkpoint list; pick one from the dropdown "
                              "(refresh it after adding files).", status_code=404)
    return info


def model_b_info(title: str) -> tuple[str, str | None]:
    """(title, short hash) of checkpoint ``title``, or a 404-style error naming it."""
    info = _checkpoint(title)
    shorthash = info.calculate_shorthash() if hasattr(info, "calculate_shorthash") else getattr(info, "shorthash", None)
    return info.title, shorthash


def load_model_b(p: Any, title: str) -> tuple[nn.Module, str, str | None]:
    """(B's UNet, its title, its short hash) for checkpoint ``title``; cached across jobs."""
    from modules import shared

    opts = getattr(shared, "cmd_opts", None)
    if getattr(opts, "lowvram", False) or getattr(opts, "medvram", False):
        raise MigcError("MagicFusion needs both UNets resident, and --medvram/--lowvram stream the main UNet block by block; "
                        "restart without them to use MagicFusion.")
    info = _checkpoint(title)
    unet_a = unet_of(p)
    reference = next(unet_a.parameters())
    key = (info.filename, os.path.getmtime(info.filename), id(p.sd_model), reference.device, reference.dtype)

    def build() -> nn.Module:
        state = load_unet_state(info.filename)
        check_pair(state_shapes(unet_a.state_dict()), state_shapes(state), getattr(p.sd_model, "sd_checkpoint_info", None)
                   and p.sd_model.sd_checkpoint_info.title or "the loaded model", info.title)
        unet = _build_like(p.sd_model)
        unet.load_state_dict(state, strict=True)
        return unet.to(device=reference.device, dtype=reference.dtype).eval().requires_grad_(False)

    unet_b = MODEL_B.get(key, build)
    return (unet_b, *model_b_info(title))


def guidance_of(params: Any, cfg_scale: float) -> float:
    """The CFG scale the denoiser uses this step (A1111: the sampler's cond_scale times its multiplier)."""
    denoiser = getattr(params, "denoiser", None)
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None)
    if isinstance(extra, dict) and "cond_scale" in extra:
        return float(extra["cond_scale"]) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
    return cfg_scale


class FusionHooks:
    """The ride-along of one sampling pass; :meth:`remove` restores A's UNet exactly."""

    def __init__(self, runtime: FusionRuntime, is_current: Callable[[], bool] = lambda: True) -> None:
        self.runtime = runtime
        self.cfg_scale = 7.0
        self.is_current = is_current
        self.rows = RowCursor()
        self.unet: nn.Module | None = None
        self.previous: Any = None
        self.stash: list[torch.Tensor] = []
        self.step: dict[str, Any] | None = None

    @property
    def installed(self) -> bool:
        return self.unet is not None

    def install(self, p: Any) -> None:
        self.remove()
        self.cfg_scale = float(getattr(p, "cfg_scale", 7.0))
        unet = unet_of(p)
        self.previous = unet.__dict__.get("forward")
        unet.forward = self._forward_for(unet)
        self.unet = unet

    def remove(self) -> None:
        if self.unet is None:
            return
        if self.previous is not None:
            self.unet.forward = self.previous
        else:
            self.unet.__dict__.pop("forward", None)
        self.unet, self.previous, self.stash, self.step = None, None, [], None

    def _forward_for(self, unet: nn.Module) -> Callable:
        previous, runtime = self.previous, self.runtime

        def forward(x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
            call = previous if previous is not None else (lambda *a, **k: type(unet).forward(unet, *a, **k))
            out = call(x, timesteps, context, *args, **kwargs)
            if not self.is_current():
                self.remove()
                return out
            if self.step is None or timesteps is None or context is None:
                return out
            self.rows.new_call(x.shape[0])
            if not runtime.fused(timesteps.flatten()[0].item()):
                return out
            cond_rows, _ = self.rows.cond_part(x.shape[0])
            context_b = runtime.context_b(context, cond_rows)
            with torch.no_grad():
                if runtime.unet_b is None:
                    out_b = type(unet).forward(unet, x, timesteps, context_b, *args, **kwargs)
                else:
                    out_b = runtime.unet_b(x, timesteps, context_b, *args, **kwargs)
            self.stash.append(out_b)
            return out

        return forward

    # ------------------------------------------------------------------ CFG callbacks
    def on_cfg_step(self, step: int, steps: int, params: Any) -> None:
        """``on_cfg_denoiser``: remember this step's rows, σ and guidance; start a new stash."""
        guidance = guidance_of(params, self.cfg_scale)
        text_cond, uncond = params.text_cond, params.text_uncond
        self.stash = []
        if not isinstance(text_cond, torch.Tensor) or not isinstance(uncond, torch.Tensor):
            self.step = None
            return
        images = uncond.shape[0]
        self.rows.new_step(text_cond.shape[0], params.x.shape[0], images)
        timesteps = type(getattr(params, "denoiser", None)).__name__ == "CFGDenoiserTimesteps"
        self.step = {"x": params.x, "sigma": None if timesteps else params.sigma, "images": images,
                     "cond_rows": text_cond.shape[0], "guidance": guidance}

    def on_cfg_denoised(self, params: Any) -> None:
        """``on_cfg_denoised``: blend B's stashed outputs into ``params.x`` (A's rows), in place."""
        step, stash = self.step, self.stash
        self.stash = []
        if step is None or not stash or step["cond_rows"] != step["images"]:
            return
        out_b = torch.cat(stash)
        x_out = params.x
        rows = x_out.shape[0]
        x_in = step["x"][:rows]
        sigma = step["sigma"][:rows] if step["sigma"] is not None else None
        blend_rows(x_out, out_b, x_in, sigma, step["images"], step["guidance"], self.runtime.params)
