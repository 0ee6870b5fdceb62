"""The multidiffusion mode's part of the parameters: defaults and checks, torch-free.

Its fields are top-level in the API, the panel's positional list and the infotext (``md_bootstrap``:
formats that only grow), so :class:`lib_migc.params.MigcParams` carries them; what they mean, their
defaults and what is allowed are decided here.
"""
from __future__ import annotations

from typing import Any

from ...core.checks import step_fraction

MODE_MULTIDIFFUSION = "multidiffusion"
#: Official MultiDiffusion bootstraps 20 of its 50 steps.
DEFAULT_BOOTSTRAP = 0.4
DEFAULTS: dict[str, Any] = {"md_bootstrap": DEFAULT_BOOTSTRAP}


def check(values: dict[str, Any]) -> None:
    """Validate (and normalise) this mode's fields in ``values`` in place; absent or None fields keep defaults."""
    if values.get("md_bootstrap") is not None:
        values["md_bootstrap"] = step_fraction("md_bootstrap", values["md_bootstrap"])
