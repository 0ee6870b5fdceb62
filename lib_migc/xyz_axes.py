"""MIGC's axes in the WebUI's built-in *X/Y/Z plot* script (A1111 and Forge ship the same one).

Registered the way the WebUI's own extensions do it: the loaded ``xyz_grid`` module is found among the
loaded scripts (no import by file path) and :class:`AxisOption` entries are appended to its
``axis_options`` before the UI is built. An axis value does not touch the panel: ``apply`` adds it to
the cell's own ``p`` (a fresh dict, since the plot copies ``p`` shallowly per cell) and the job applies
it to the panel's parameters, so each cell's infotext carries its own ``MIGC`` entry and pastes back
to that cell. Values are checked with the same rules as the panel and the API before the grid starts;
a bad one stops the plot with the WebUI's usual ``RuntimeError`` message.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .core import settings
from .core.errors import MigcError
from .modes.multidiffusion.params import WINDOW_FIELDS
from .params import MODES, MigcParams

log = logging.getLogger("migc")

#: The attribute of a job's ``p`` that holds values replacing the panel's: {field: value} (an X/Y/Z cell's
#: axis values; a layouts-file entry's instances and switch).
OVERRIDES = "migc_overrides"
#: Fields applied to every instance, and fields of a section (which the axis also turns on).
INSTANCE_FIELDS = ("ea", "sac")
SECTIONS = ("structure", "magicfusion")


@dataclass(frozen=True)
class Axis:
    label: str
    type: Callable[[str], Any]
    field: str  # a top-level API field, an instance field, or "<section>.<field>"
    choices: Callable[[], list[str]] | None = None


def _weight_files() -> list[str]:
    from .modes.migc import weight_files

    return weight_files.list_weight_files(settings.models_dir())


def _checkpoints() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def _structure_modes() -> list[str]:
    from .modes.structure.params import MODES as STRUCTURE_MODES

    return list(STRUCTURE_MODES)


AXES: tuple[Axis, ...] = (
    Axis("MIGC mode", str, "mode", lambda: list(MODES)),
    Axis("MIGC weights file", str, "weights", _weight_files),
    Axis("MIGC steps", float, "migc_steps"),
    Axis("MIGC NaiveFuser steps", float, "naive_steps"),
    Axis("MIGC EA scale (every instance)", float, "ea"),
    Axis("MIGC SAC scale (every instance)", float, "sac"),
    Axis("MIGC MultiDiffusion bootstrapping", float, "md_bootstrap"),
    Axis("MIGC StructureDiffusion mode", str, "structure.mode", _structure_modes),
    Axis("MIGC MagicFusion model B", str, "magicfusion.model_b", _checkpoints),
    Axis("MIGC MagicFusion k_a", float, "magicfusion.k_a"),
    Axis("MIGC MagicFusion k_b", float, "magicfusion.k_b"),
    Axis("MIGC MagicFusion switch_t", int, "magicfusion.switch_t"),
)


def with_overrides(params: MigcParams, overrides: Mapping[str, Any] | None) -> MigcParams:
    """``params`` with the cell's axis values applied, checked like the API's fields (MigcError when not)."""
    if not overrides:
        return params
    data = params.to_api()
    data.update({name: getattr(params, name) for name in WINDOW_FIELDS})  # kept when an axis switches the mode
    data["instances"] = [dict(instance) for instance in data.get("instances", [])]
    for section in SECTIONS:
        data[section] = getattr(params, section).to_api()
    for name, value in overrides.items():
        if name in INSTANCE_FIELDS:
            for instance in data["instances"]:
                instance[name] = value
        elif "." in name:
            section, field = name.split(".", 1)
            data[section] = {**data[section], field: value, "enabled": True}
        else:
            data[name] = value
    for section in SECTIONS:
        if not data[section].get("enabled"):
            del data[section]
    return MigcParams.from_api(data)


def _apply(field: str) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, value: Any, values: list) -> None:
        setattr(p, OVERRIDES, {**(getattr(p, OVERRIDES, None) or {}), field: value})

    return apply


def _confirm(axis: Axis) -> Callable[[Any, list], None]:
    """Each value checked on a one-instance layout, as the job would check it."""
    def confirm(p: Any, values: list) -> None:
        probe = MigcParams.from_api({"instances": [{"description": "x", "box": [0, 0, 1, 1]}]})
        for value in values:
            try:
                with_overrides(probe, {axis.field: value})
            except MigcError as exc:
                raise RuntimeError(f"{axis.label}: {value!r} is not allowed. {exc}") from None

    return confirm


def xyz_module() -> Any:
    """The WebUI's loaded ``xyz_grid`` script module, or None (the script disabled or missing)."""
    from modules import scripts

    for data in getattr(scripts, "scripts_data", []):
        if getattr(data.script_class, "__module__", "") == "xyz_grid.py":
            return data.module
    return None


def register() -> int:
    """Append MIGC's axes to the X/Y/Z plot (once); how many were added."""
    module = xyz_module()
    if module is None:
        log.info("MIGC: the X/Y/Z plot script is not loaded; its MIGC axes are not added.")
        return 0
    known = {option.label for option in module.axis_options}
    added = 0
    for axis in AXES:
        if axis.label in known:
            continue
        module.axis_options.append(module.AxisOption(axis.label, axis.type, _apply(axis.field), confirm=_confirm(axis),
                                                     choices=axis.choices))
        added += 1
    return added
