"""The migc mode's part of the parameters (MIGC, MIGC++ and the naive shader): defaults and checks, torch-free.

Its fields are top-level in the API, the panel's positional list and the infotext (``weights``,
``migc_steps``, ``naive_steps``: formats that only grow), so :class:`lib_migc.params.MigcParams` carries
them; what they mean, their defaults and what is allowed are decided here.
"""
from __future__ import annotations

from typing import Any

from ...core.checks import step_fraction
from ...core.errors import MigcError

#: The trained MIGC / MIGC++ layers, and MIGC's weight-free fuser on every cross-attention.
MODE_MIGC, MODE_NAIVE = "migc", "naive"
DEFAULT_WEIGHTS = "MIGC_SD14.ckpt"
#: Field defaults: MIGC runs the first half of the steps (the official 25 of 50), the naive fuser none.
DEFAULTS: dict[str, Any] = {"weights": DEFAULT_WEIGHTS, "migc_steps": 0.5, "naive_steps": 0.0}


def check(values: dict[str, Any]) -> None:
    """Validate (and normalise) this mode's fields in ``values`` in place; absent or None fields keep defaults."""
    for name in ("migc_steps", "naive_steps"):
        if values.get(name) is not None:
            values[name] = step_fraction(name, values[name])
    weights = values.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights.strip()):
        raise MigcError("MIGC: field 'weights' must be the file name of MIGC weights in the MIGC models folder, "
                        "e.g. \"MIGC_SD14.ckpt\".")
