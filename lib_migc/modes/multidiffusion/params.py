"""The multidiffusion mode's part of the parameters: defaults and checks, torch-free.

Its fields are top-level in the API, the panel's positional list and the infotext (``md_bootstrap``,
``md_window``, ``md_stride``, ``md_wrap``: formats that only grow), so :class:`lib_migc.params.MigcParams`
carries them; what they mean, their defaults and what is allowed are decided here.
"""
from __future__ import annotations

from typing import Any

from ...core.checks import step_fraction, switch
from ...core.errors import MigcError

MODE_MULTIDIFFUSION = "multidiffusion"
#: Official MultiDiffusion bootstraps 20 of its 50 steps.
DEFAULT_BOOTSTRAP = 0.4
#: ``md_window``: 0 = the model's native size (SD1.x 512 px, SD2.x-768 768 px, SDXL 1024 px);
#: -1 = one window over the whole canvas, what the region mode did before windows (an infotext written
#: before windows existed reads as this, so its image regenerates).
WINDOW_NATIVE, WINDOW_WHOLE_CANVAS = 0, -1
#: The official stride: 8 latent cells.
DEFAULT_STRIDE = 64
MAX_SIDE = 16384
#: Fields that only mean something in this mode: the API and the infotext carry them only there.
WINDOW_FIELDS = ("md_window", "md_stride", "md_wrap")
DEFAULTS: dict[str, Any] = {"md_bootstrap": DEFAULT_BOOTSTRAP, "md_window": WINDOW_NATIVE, "md_stride": DEFAULT_STRIDE,
                            "md_wrap": False}


def _pixels(name: str, value: Any, allowed: str, minimum: int, specials: tuple[int, ...] = ()) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MigcError(f"MIGC: field '{name}' = {value!r} must be a whole number of pixels: {allowed}.")
    if value in specials or (value % 8 == 0 and minimum <= value <= MAX_SIDE):
        return value
    raise MigcError(f"MIGC: field '{name}' = {value!r} is not allowed: {allowed}.")


def check(values: dict[str, Any]) -> None:
    """Validate (and normalise) this mode's fields in ``values`` in place; absent or None fields keep defaults."""
    if values.get("md_bootstrap") is not None:
        values["md_bootstrap"] = step_fraction("md_bootstrap", values["md_bootstrap"])
    if values.get("md_window") is not None:
        values["md_window"] = _pixels("md_window", values["md_window"],
                                      f"a multiple of 8 from 64 to {MAX_SIDE}, 0 (the model's native size) or -1 "
                                      "(one window over the whole canvas)", 64, (WINDOW_NATIVE, WINDOW_WHOLE_CANVAS))
    if values.get("md_stride") is not None:
        values["md_stride"] = _pixels("md_stride", values["md_stride"], f"a multiple of 8 from 8 to {MAX_SIDE}", 8)
    if values.get("md_wrap") is not None:
        switch("md_wrap", values["md_wrap"])


def legacy_infotext(data: dict[str, Any]) -> dict[str, Any]:
    """An infotext entry written before windows existed ran one window over the whole canvas: say so, so
    the image regenerates (today's default would cut a canvas over the native size into windows)."""
    if data.get("mode") == MODE_MULTIDIFFUSION and "md_window" not in data:
        return {**data, "md_window": WINDOW_WHOLE_CANVAS}
    return data
