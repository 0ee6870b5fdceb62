"""Field checks every section of the parameters uses, with the message format users see (field, value, what is allowed)."""
from __future__ import annotations

import math
from typing import Any

from .errors import MigcError


def step_fraction(name: str, value: Any) -> float:
    """A phase length as a fraction of the sampler's steps, 0 to 1 (0 = off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise MigcError(f"MIGC: field '{name}' = {value!r} must be a fraction of the sampling steps from 0 to 1 (0 = off).")
    return float(value)


def switch(name: str, value: Any) -> bool:
    """A true/false field (None is left for the caller's default)."""
    if not isinstance(value, bool):
        raise MigcError(f"MIGC: field '{name}' must be true or false, got {value!r}.")
    return value
