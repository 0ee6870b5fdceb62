"""MagicFusion's model B in a WebUI job: found in the checkpoint list, loaded once, kept in A's placement.

Model B is only a UNet: an empty one of A's own architecture from the host (``empty_unet_like``), loaded
strictly from B's file (safetensors, or the allow-list unpickler: :mod:`.weights`); A's text encoder and
VAE serve both, as in the official fused run. The checkpoint list is the same ``modules.sd_models`` on
both hosts; where the UNet lives and how the host's memory manager lets go of it are the host's
(``placement_of``, ``forget_module``).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch.nn as nn

from ...core.errors import CheckpointError, MigcError
from .runtime import MODEL_B
from .weights import check_pair, load_unet_state, state_shapes


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


def _main_title(p: Any) -> str:
    info = getattr(p.sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or "the loaded model"


def load_model_b(p: Any, host: ModuleType, title: str) -> tuple[nn.Module, str, str | None]:
    """(B's UNet, its title, its short hash) for checkpoint ``title``; cached across jobs (:data:`MODEL_B`)."""
    if host.unet_streamed():
        raise MigcError("MagicFusion needs both UNets resident, and --medvram/--lowvram stream the main UNet block by block; "
                        "restart without them to use MagicFusion.")
    info = _checkpoint(title)
    unet_a = host.unet_of(p)
    device, dtype = host.placement_of(unet_a)
    key = (info.filename, os.path.getmtime(info.filename), id(unet_a), device, dtype)

    def build() -> nn.Module:
        state = load_unet_state(info.filename)
        check_pair(state_shapes(unet_a.state_dict()), state_shapes(state), _main_title(p), info.title)
        unet = host.empty_unet_like(p)
        unet.load_state_dict(state, strict=True)
        return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)

    MODEL_B.on_drop(host.forget_module)  # a host whose memory manager also holds B lets go of it with the cache
    return (MODEL_B.get(key, build), *model_b_info(title))
