"""The layout a user gives: a global prompt and boxed instance descriptions.

Everything that reads a layout (the panel's hidden JSON, the API's dict, the infotext) goes through
:func:`parse_layout`, so one place decides what is valid and every error names the instance
(``instances[i]``, 0-based as in the JSON, plus ``#i+1`` as the box editor numbers it), the field
and what is allowed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import LayoutError

#: MIGC's Shading Aggregation Controller has 28 instance slots (30 channels minus background and
#: template), MIGC++'s 29 (no background channel); the job checks the 28 for MIGC weights.
MAX_INSTANCES = 29
MAX_MIGC_INSTANCES = 28
#: Per-instance scales multiply the instance's CA/EA outputs and its SAC logit; 1 is the trained behaviour.
SCALE_RANGE = (0.0, 10.0)
SCALE_FIELDS = ("ca", "ea", "sac")
INSTANCE_KEYS = ("description", "box", "mask", "negative") + SCALE_FIELDS
LAYOUT_KEYS = ("global_prompt", "instances")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Instance:
    """One instance: a description and a box ``(x0, y0, x1, y1)`` in image fractions, origin top-left.

    mask: optional PNG data URL (MIGC++'s any-shape instance). When given it drives every attention
    mask and weight; ``box`` then only feeds the position token, and when the user gave no box
    (``box_given`` false) it is the one MIGC++ derives from the mask (recomputed at the image size by
    :func:`fit_masks`).
    """

    description: str
    box: Box
    ca: float = 1.0
    ea: float = 1.0
    sac: float = 1.0
    mask: str | None = None
    box_given: bool = True
    negative: str | None = None  # MultiDiffusion's per-region negative prompt (None: the main negative)

    def to_dict(self) -> dict[str, Any]:
        """Compact dict: scales are written only when they differ from the default, a derived box never."""
        out: dict[str, Any] = {"description": self.description}
        if self.box_given:
            out["box"] = [_compact(v) for v in self.box]
        if self.mask is not None:
            out["mask"] = self.mask
        if self.negative is not None:
            out["negative"] = self.negative
        for name in SCALE_FIELDS:
            value = getattr(self, name)
            if value != 1.0:
                out[name] = _compact(value)
        return out


@dataclass(frozen=True)
class Layout:
    """A global prompt (``None``: use the WebUI's main prompt) and up to 28 instances."""

    instances: tuple[Instance, ...] = ()
    global_prompt: str | None = None

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def boxes(self) -> list[Box]:
        return [inst.box for inst in self.instances]

    @property
    def negatives(self) -> list[str | None]:
        return [inst.negative for inst in self.instances]

    @property
    def has_masks(self) -> bool:
        return any(inst.mask is not None for inst in self.instances)

    @property
    def descriptions(self) -> list[str]:
        return [inst.description for inst in self.instances]

    def scales(self, name: str) -> list[float]:
        return [float(getattr(inst, name)) for inst in self.instances]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"instances": [inst.to_dict() for inst in self.instances]}
        if self.global_prompt is not None:
            out["global_prompt"] = self.global_prompt
        return out

    def to_json(self) -> str:
        """Compact, stable JSON (the infotext and the panel's hidden state use it)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)


def _compact(value: float) -> float | int:
    """Write 1.0 as 1 and keep 6 significant decimals: short infotext, exact round-trip of UI values."""
    rounded = round(float(value), 6)
    return int(rounded) if rounded.is_integer() else rounded


def parse_layout(source: str | Mapping[str, Any] | Sequence[Any] | Layout | None) -> Layout:
    """Build a validated :class:`Layout` from a JSON string, a dict, a bare list of instances or ``None``.

    Raises :class:`LayoutError` with a message that names the instance, the field and the allowed values.
    """
    if source is None:
        return Layout()
    if isinstance(source, Layout):
        return source
    if isinstance(source, (bytes, bytearray)):
        source = source.decode("utf-8")
    if isinstance(source, str):
        text = source.strip()
        if not text:
            return Layout()
        try:
            source = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(
                f"MIGC layout: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                'Expected {"instances": [{"description": "...", "box": [x0, y0, x1, y1]}, ...]}.'
            ) from None
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - set(LAYOUT_KEYS))
        if unknown:
            raise LayoutError(
                f"MIGC layout: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(LAYOUT_KEYS)}."
            )
        global_prompt = source.get("global_prompt")
        if global_prompt is not None and not isinstance(global_prompt, str):
            raise LayoutError("MIGC layout: 'global_prompt' must be a string or null (null = use the main prompt).")
        raw_instances = source.get("instances", [])
    elif isinstance(source, Sequence):
        global_prompt, raw_instances = None, source
    else:
        raise LayoutError(f"MIGC layout: expected a JSON object or list, got {type(source).__name__}.")
    if not isinstance(raw_instances, Sequence) or isinstance(raw_instances, str):
        raise LayoutError("MIGC layout: 'instances' must be a list of {\"description\", \"box\"} objects.")
    if len(raw_instances) > MAX_INSTANCES:
        raise LayoutError(
            f"MIGC layout: {len(raw_instances)} instances given; at most {MAX_INSTANCES} are supported "
            "(MIGC++'s aggregation controller has 29 instance slots, MIGC's 28). Remove or merge some boxes."
        )
    instances = tuple(_parse_instance(i, raw) for i, raw in enumerate(raw_instances))
    return Layout(instances=instances, global_prompt=global_prompt)


def _where(index: int, raw: Any) -> str:
    desc = raw.get("description") if isinstance(raw, Mapping) else None
    label = f" ({desc[:40]!r})" if isinstance(desc, str) and desc.strip() else ""
    return f"MIGC layout: instances[{index}] (box #{index + 1}{label})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _parse_instance(index: int, raw: Any) -> Instance:
    where = _where(index, raw)
    if not isinstance(raw, Mapping):
        raise LayoutError(f"{where}: expected an object with 'description' and 'box' (or 'mask'), got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(INSTANCE_KEYS))
    if unknown:
        raise LayoutError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(INSTANCE_KEYS)}.")

    description = raw.get("description")
    if not isinstance(description, str) or not description.strip():
        raise LayoutError(f"{where}: field 'description' must be a non-empty text describing the instance, e.g. \"a red teddy bear\".")

    mask = raw.get("mask")
    derived = None
    if mask is not None:
        mask, derived = _parse_mask(where, mask)
    box = raw.get("box")
    if box is None and derived is not None:
        box = derived
    if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
        raise LayoutError(f"{where}: field 'box' must be a list of 4 numbers [x0, y0, x1, y1] (fractions of the image, origin top-left), "
                          "or give a 'mask' instead.")
    values = []
    for name, value in zip(("x0", "y0", "x1", "y1"), box):
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise LayoutError(f"{where}: field 'box' {name} = {value!r} is not a finite number; allowed: 0 to 1.")
        if not 0.0 <= number <= 1.0:
            raise LayoutError(f"{where}: field 'box' {name} = {number:g} is outside the image; allowed: 0 to 1 (fractions of width/height).")
        values.append(number)
    x0, y0, x1, y1 = values
    if derived is not None and raw.get("box") is None and (x1 <= x0 or y1 <= y0):
        raise LayoutError(f"{where}: field 'mask' covers a single row or column of pixels ({x0:g}..{x1:g} x {y0:g}..{y1:g}), "
                          "so no box can be derived from it; paint a larger area.")
    if x1 <= x0:
        raise LayoutError(f"{where}: field 'box' has x1 = {x1:g} <= x0 = {x0:g}; the right edge must be greater than the left edge.")
    if y1 <= y0:
        raise LayoutError(f"{where}: field 'box' has y1 = {y1:g} <= y0 = {y0:g}; the bottom edge must be greater than the top edge (y grows downwards).")

    scales = {}
    for name in SCALE_FIELDS:
        if name not in raw or raw[name] is None:
            continue
        number = _number(raw[name])
        lo, hi = SCALE_RANGE
        if number is None or not math.isfinite(number) or not lo <= number <= hi:
            raise LayoutError(f"{where}: field '{name}' = {raw[name]!r} is not allowed; use a number from {lo:g} to {hi:g} (1 = default).")
        scales[name] = number
    negative = raw.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise LayoutError(f"{where}: field 'negative' must be a text (this region's negative prompt for MultiDiffusion) or null.")
    negative = negative.strip() if negative and negative.strip() else None
    return Instance(description=description.strip(), box=(x0, y0, x1, y1), mask=mask,
                    box_given=raw.get("box") is not None, negative=negative, **scales)


def _parse_mask(where: str, value: Any) -> tuple[str, list[float]]:
    """Validate a mask string; return it and the box MIGC++ derives from it at the mask's own size."""
    from .mask_codec import MaskDecodeError, decode_mask, mask_to_box

    if not isinstance(value, str) or not value.strip():
        raise LayoutError(f"{where}: field 'mask' must be a PNG image as a data URL ('data:image/png;base64,...') "
                          "or bare base64; white = inside the instance, black = outside, grey = partly.")
    try:
        mask = decode_mask(value)
    except MaskDecodeError as exc:
        raise LayoutError(f"{where}: field 'mask' could not be read: {exc}.") from None
    try:
        box = mask_to_box(mask)
    except ValueError:
        raise LayoutError(f"{where}: field 'mask' is empty (every pixel is black); paint the instance's area in "
                          "white, or give a 'box' instead.") from None
    return value.strip(), list(box)


def fit_masks(layout: Layout, width: int, height: int) -> Layout:
    """The layout with every mask brought to the image size (8-bit levels, re-encoded as PNG) and each
    derived box recomputed there, so the generation, the infotext and a regeneration from it all see the
    same values. Box-only layouts are returned unchanged."""
    if not layout.has_masks:
        return layout
    from dataclasses import replace

    from .mask_codec import decode_mask, encode_mask, fit_mask, mask_to_box

    fitted = []
    for index, inst in enumerate(layout.instances):
        if inst.mask is None:
            fitted.append(inst)
            continue
        values = fit_mask(decode_mask(inst.mask), height, width)
        try:
            box = inst.box if inst.box_given else mask_to_box(values)
        except ValueError:
            raise LayoutError(f"{_where(index, inst.to_dict())}: field 'mask' vanishes at {width}x{height}; "
                              "paint a larger area.") from None
        if box[2] <= box[0] or box[3] <= box[1]:
            raise LayoutError(f"{_where(index, inst.to_dict())}: field 'mask' is a single row or column of pixels at "
                              f"{width}x{height}, so no box can be derived from it; paint a larger area.")
        fitted.append(replace(inst, mask=encode_mask(values), box=tuple(float(v) for v in box)))
    return replace(layout, instances=tuple(fitted))
