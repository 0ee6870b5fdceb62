"""Thin adapters between the WebUI hosts and the shared MIGC core.

Each host module offers the same small surface: ``Hooks(session, on_error, is_current)`` with
``install(p)``, ``remove()``, ``on_cfg_step(step, steps, params)`` and ``installed``; ``unet_of(p)``;
``decline_reason(p)`` for host-specific reasons not to run; ``fusion_adapter()`` and ``region_adapter()``,
the modules of MagicFusion's and MultiDiffusion's hooks on that host.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType


def is_forge() -> bool:
    """WebUI Forge ships the ``modules_forge`` package; AUTOMATIC1111 does not."""
    return importlib.util.find_spec("modules_forge") is not None


def current() -> ModuleType:
    """The adapter module for the WebUI this process runs in."""
    if is_forge():
        from . import forge

        return forge
    from . import a1111

    return a1111

