"""Layouts made with other regional extensions, converted to MIGC boxes with descriptions.

Each parser is written from the format its extension writes (infotext keys, saved files; see the
docstrings), never from its code. Every converter returns a :class:`Converted`: the layout in the API's
form and notes on what had no MIGC equivalent, for the status line. Sources:

* Regional Prompter: its infotext (``RP Active``, ``RP Divide mode``, ``RP Matrix submode``, ``RP Ratios``,
  ``RP Flip``, ``RP Use Base``/``RP Use Common``) and the prompt's ``BREAK``-separated parts.
* Forge Couple: its infotext (``forge_couple``, ``forge_couple_mode``, ``forge_couple_direction``,
  ``forge_couple_background``, ``forge_couple_mapping``, ``forge_couple_separator``) and the prompt's lines.
* Tiled Diffusion's region control: its infotext dict (``{"Region control": {"Region 1": {...}}}``) or its
  saved ``region_configs/*.json`` (``{"bbox_controls": [...]}``): ``x``, ``y`` (top-left), ``w``, ``h`` fractions.
* GLIGEN GUI: its saved JSON (``mapProps.boxMap``: ``[id, {x1, y1, x2, y2, caption}]`` in canvas pixels;
  ``stringProps.canvasWidth``/``canvasHeight``, default 512).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .core.errors import MigcError
from .core.layout import parse_layout


@dataclass
class Converted:
    source: str
    instances: list[dict[str, Any]] = field(default_factory=list)
    global_prompt: str | None = None
    notes: list[str] = field(default_factory=list)

    def layout(self) -> dict[str, Any]:
        out: dict[str, Any] = {"instances": self.instances}
        if self.global_prompt:
            out["global_prompt"] = self.global_prompt
        return out

    def message(self) -> str:
        """What the status line says: what was converted, and what has no MIGC equivalent."""
        text = f"Imported {len(self.instances)} box(es) from {self.source}."
        return text + (" Not converted: " + " ".join(self.notes) if self.notes else "")


def _box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    clamp = lambda v: min(max(float(v), 0.0), 1.0)  # noqa: E731
    return [round(clamp(v), 6) for v in (x0, y0, x1, y1)]


def _true(value: Any) -> bool:
    return str(value).strip().lower() == "true"


# ------------------------------------------------------------------------------------------ Regional Prompter
_RP_SEPARATORS = re.compile(r"\b(?:BREAK|ADDCOMM|ADDBASE|ADDCOL|ADDROW|ADDP)\b")


def _fractions(values: list[float]) -> list[tuple[float, float]]:
    total = sum(values)
    if total <= 0:
        raise MigcError("Regional Prompter import: the divide ratios must be positive numbers.")
    spans, start = [], 0.0
    for value in values:
        spans.append((start / total, (start + value) / total))
        start += value
    return spans


def _numbers(text: str, separator: str = ",") -> list[float]:
    try:
        return [float(v.strip()) for v in text.split(separator) if v.strip()]
    except ValueError:
        raise MigcError(f"Regional Prompter import: the divide ratio {text!r} is not a list of numbers.") from None


def rp_cells(ratios: str, columns: bool) -> list[list[float]]:
    """Matrix mode's rectangles, in region order: ``1,2,1`` divides the width (columns) or height (rows);
    with ``;`` (columns mode) each ``;``-group is a row whose first number is its height and the rest its
    column widths; rows mode transposes it (``,``-groups are columns, ``;`` inside)."""
    ratios = ratios.strip().strip('"')
    if ";" not in ratios:
        spans = _fractions(_numbers(ratios))
        return [[a, 0.0, b, 1.0] if columns else [0.0, a, 1.0, b] for a, b in spans]
    outer_sep, inner_sep = (";", ",") if columns else (",", ";")
    groups = [_numbers(g, inner_sep) for g in ratios.split(outer_sep) if g.strip()]
    outer = _fractions([g[0] for g in groups])
    cells = []
    for (a, b), group in zip(outer, groups):
        inner = _fractions(group[1:]) if len(group) > 1 else [(0.0, 1.0)]
        for c, d in inner:
            cells.append([c, a, d, b] if columns else [a, c, b, d])
    return cells


def from_regional_prompter(params: Mapping[str, Any], prompt: str) -> Converted:
    out = Converted("Regional Prompter")
    divide = str(params.get("RP Divide mode", "Matrix"))
    sub = str(params.get("RP Matrix submode", ""))
    if divide in ("Horizontal", "Vertical"):  # its 2023 infotexts: the direction was the divide mode
        divide, sub = "Matrix", divide
    if divide != "Matrix" or sub == "Random":
        raise MigcError(f"Regional Prompter import: its {divide if divide != 'Matrix' else 'Random matrix'} mode draws "
                        "regions from a painted mask or from attention, which have no boxes to convert.")
    ratios = str(params.get("RP Ratios", "1,1"))
    if _true(params.get("RP Flip")):
        ratios = ratios.translate(str.maketrans({",": ";", ";": ","}))
    cells = rp_cells(ratios, columns=sub in ("Columns", "Horizontal", ""))
    parts = [part.strip(" ,\n") for part in _RP_SEPARATORS.split(prompt.replace(" AND ", " BREAK "))]
    common = parts.pop(0) if (_true(params.get("RP Use Common")) or "ADDCOMM" in prompt) and parts else None
    base = parts.pop(0) if (_true(params.get("RP Use Base")) or "ADDBASE" in prompt) and parts else None
    for cell, text in zip(cells, parts):
        if text:
            out.instances.append({"description": f"{common}, {text}" if common else text, "box": _box(*cell)})
    out.global_prompt = base or ", ".join(p for p in ([common] if common else []) + parts if p)
    if base:
        out.notes.append(f"the base prompt's blend ratio ({params.get('RP Base Ratios', '0.2')}) — the base prompt became "
                         "MIGC's global prompt.")
    if len(parts) != len(cells):
        out.notes.append(f"{len(parts)} prompt part(s) for {len(cells)} region(s): the extra ones were left out.")
    if params.get("RP Calc Mode") == "Latent":
        out.notes.append("Latent calc mode (MIGC shades in attention).")
    return out


# ------------------------------------------------------------------------------------------ Forge Couple
def _mapping_rows(value: Any) -> list[list[float]]:
    rows = json.loads(value) if isinstance(value, str) else value
    out = []
    for row in rows:
        if isinstance(row[0], str):  # before August 2024: ["x1:x2", "y1:y2", "w"]
            (x1, x2), (y1, y2) = (map(float, row[0].split(":")), map(float, row[1].split(":")))
            out.append([x1, x2, y1, y2, float(row[2])])
        else:
            out.append([float(v) for v in row[:5]])
    return out


def from_forge_couple(params: Mapping[str, Any], prompt: str, width: int | None = None, height: int | None = None) -> Converted:
    out = Converted("Forge Couple")
    mode = str(params.get("forge_couple_mode", "Basic"))
    if mode == "Mask":
        raise MigcError("Forge Couple import: its Mask mode keeps painted masks, which are not in the infotext.")
    separator = str(params.get("forge_couple_separator", "\\n") or "\\n").replace("\\n", "\n")
    lines = [line.strip() for line in prompt.split(separator)]
    if mode == "Advanced":
        rows = _mapping_rows(params.get("forge_couple_mapping", "[]"))
        for (x1, x2, y1, y2, weight), text in zip(rows, lines):
            if text:
                out.instances.append({"description": text, "box": _box(x1, y1, x2, y2)})
        if any(row[4] != 1.0 for row in rows):
            out.notes.append("the regions' weights.")
        if len(rows) != len(lines):
            out.notes.append(f"{len(lines)} line(s) for {len(rows)} region(s): the extra ones were left out.")
        return out
    background = str(params.get("forge_couple_background", "None"))
    if background == "First Line" and lines:
        out.global_prompt = lines.pop(0)
    elif background == "Last Line" and lines:
        out.global_prompt = lines.pop()
    if out.global_prompt:
        out.notes.append("the background line's weight — it became MIGC's global prompt.")
    horizontal = str(params.get("forge_couple_direction", "Horizontal")) == "Horizontal"
    side = (width if horizontal else height) or 0
    n = len(lines)
    for i, text in enumerate(lines):
        if side:  # its tiles are ceil(side / n) px, the last one clipped
            tile = math.ceil(side / n)
            a, b = i * tile / side, min((i + 1) * tile, side) / side
        else:
            a, b = i / n, (i + 1) / n
        if text:
            out.instances.append({"description": text, "box": _box(a, 0, b, 1) if horizontal else _box(0, a, 1, b)})
    return out


# ------------------------------------------------------------------------------------------ Tiled Diffusion
def from_tiled_diffusion(data: Mapping[str, Any]) -> Converted:
    """Its infotext dict (or the value of its ``Tiled Diffusion`` key) or a saved region config."""
    out = Converted("Tiled Diffusion region control")
    data = data.get("Tiled Diffusion", data)
    regions = data.get("bbox_controls") or list((data.get("Region control") or {}).values())
    if not regions:
        raise MigcError("Tiled Diffusion import: no regions found (expected 'Region control' or 'bbox_controls').")
    dropped = set()
    for region in regions:
        if region.get("enable") is False:
            continue
        x, y, w, h = (float(region.get(k, 0)) for k in ("x", "y", "w", "h"))
        if w <= 0 or h <= 0 or x > 1 or y > 1 or not str(region.get("prompt", "")).strip():
            continue
        instance = {"description": str(region["prompt"]).strip(), "box": _box(x, y, x + w, y + h)}
        if str(region.get("neg_prompt", "")).strip():
            instance["negative"] = str(region["neg_prompt"]).strip()
        out.instances.append(instance)
        if region.get("blend_mode") == "Background":
            dropped.add("Background blend mode (each region became a box)")
        if region.get("blend_mode") == "Foreground":
            dropped.add("feathering")
        if int(region.get("seed", -1)) != -1:
            dropped.add("per-region seeds")
    out.notes += [f"{name}." for name in sorted(dropped)]
    if any("negative" in i for i in out.instances):
        out.notes.append("per-region negative prompts act in the multidiffusion mode only.")
    return out


# ------------------------------------------------------------------------------------------ GLIGEN GUI
def from_gligen_gui(data: Mapping[str, Any]) -> Converted:
    out = Converted("GLIGEN GUI")
    strings = data.get("stringProps") or {}
    width = float(strings.get("canvasWidth") or 512)
    height = float(strings.get("canvasHeight") or 512)
    boxes = (data.get("mapProps") or {}).get("boxMap") or []
    skipped = 0
    for entry in boxes:
        box = entry[1] if isinstance(entry, list) and len(entry) > 1 else entry
        caption = (box.get("caption") or "").strip()
        if not caption:
            skipped += 1
            continue
        x1, x2 = sorted((float(box["x1"]), float(box["x2"])))
        y1, y2 = sorted((float(box["y1"]), float(box["y2"])))
        out.instances.append({"description": caption, "box": _box(x1 / width, y1 / height, x2 / width, y2 / height)})
    if strings.get("positivePrompt"):
        out.global_prompt = str(strings["positivePrompt"])
    if skipped:
        out.notes.append(f"{skipped} box(es) without a caption.")
    if (data.get("mapProps") or {}).get("loraMap"):
        out.notes.append("its LoRAs.")
    return out


# ------------------------------------------------------------------------------------------ dispatch
def from_infotext(params: Mapping[str, Any]) -> Converted | None:
    """The layout of a pasted infotext's Regional Prompter or Forge Couple entries (the WebUI's parsed
    ``params``); None when it has neither."""
    prompt = str(params.get("Prompt", ""))
    width, height = params.get("Size-1"), params.get("Size-2")
    if _true(params.get("RP Active")):
        return from_regional_prompter(params, prompt)
    if _true(params.get("forge_couple")):
        return from_forge_couple(params, prompt, int(width) if width else None, int(height) if height else None)
    return None


def from_text(text: str) -> Converted:
    """What the user pasted into the layout box: a GLIGEN GUI file, a Tiled Diffusion region config or
    infotext dict, or an image's whole infotext with Regional Prompter / Forge Couple entries."""
    text = (text or "").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "mapProps" in data:
        return _checked(from_gligen_gui(data))
    if isinstance(data, dict) and ({"bbox_controls", "Region control", "Tiled Diffusion"} & set(data)):
        return _checked(from_tiled_diffusion(data))
    if data is None and text:
        from modules.infotext_utils import parse_generation_parameters

        converted = from_infotext(parse_generation_parameters(text))
        if converted is not None:
            return _checked(converted)
    raise MigcError("Nothing to import: paste a GLIGEN GUI file, a Tiled Diffusion region config, or the infotext of "
                    "an image made with Regional Prompter or Forge Couple into the layout box.")


def _checked(converted: Converted) -> Converted:
    parse_layout(converted.layout())  # the same checks as any layout
    return converted
