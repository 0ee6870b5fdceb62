"""Thin adapters between the WebUI hosts and the shared MIGC core.

Each host module (``a1111.py``, ``forge.py``; what they share in ``base.py``) implements the three hook
points once, for every mode:

* ``Hooks(processor, on_error, is_current)``: the attn2 processor slot of every hooked layer;
* ``StepHooks(title, denoise=, blend=, modules=, is_current=, raise_pending=)``: the denoiser's model call
  and the CFG blend step (:mod:`lib_migc.core.hook_points` says what a mode's functions see);

both with ``install(p)``, ``remove()``, ``installed`` and ``on_cfg_step(step, steps, params)``. Beside
them: ``unet_of(p)``; ``decline_reason(p)`` for host-specific reasons not to run; for a mode that runs a
second UNet, ``empty_unet_like(p)``, ``placement_of(unet)``, ``unet_streamed()`` and ``forget_module(m)``.
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

