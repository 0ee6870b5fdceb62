"""Thin adapters between the WebUI hosts and the shared MIGC core.

Each host module offers the same small surface: ``Hooks(session, on_error, is_current)`` with
``install(p)``, ``remove()``, ``on_cfg_step(step, steps, params)`` and ``installed``; ``unet_of(p)``;
and ``decline_reason(p)`` for host-specific reasons not to run.
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


def fusion_adapter(host: ModuleType) -> ModuleType | None:
    """MagicFusion's adapter for ``host`` (it holds a second UNet, which each host does its own way)."""
    name = host.__name__.rsplit(".", 1)[-1]
    if name == "a1111":
        from . import a1111_fusion

        return a1111_fusion
    if name == "forge":
        from . import forge_fusion

        return forge_fusion
    return None
