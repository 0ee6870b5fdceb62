"""One parameters object for a MIGC job, built from the panel, the API or the infotext.

Processing code never looks at positional argument lists: the Script turns whatever arrived into a
:class:`MigcParams` first, and this module is the one place that knows each format. Each mode owns its
part (``modes/<mode>/params.py``: defaults, checks, and for StructureDiffusion and MagicFusion the codec
of their own API section); the migc and multidiffusion fields stay top-level here because the API, the
positional list and the infotext only grow.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from .core.checks import switch
from .core.errors import MigcError
from .core.layout import Layout, parse_layout
from .modes.consistent import params as consistent_params
from .modes.magicfusion.params import FusionParams
from .modes.migc import params as migc_params
from .modes.migc.params import DEFAULT_WEIGHTS, MODE_MIGC, MODE_NAIVE
from .modes.multidiffusion import params as region_params
from .modes.multidiffusion.params import DEFAULT_BOOTSTRAP, MODE_MULTIDIFFUSION
from .modes.structure.params import StructureParams

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_WEIGHTS", "INFOTEXT_KEY", "MODES", "MODE_MIGC", "MODE_MULTIDIFFUSION", "MODE_NAIVE",
           "MigcParams", "UI_FIELDS", "API_FIELDS"]

INFOTEXT_KEY = "MIGC"
#: How the instances are realised (the ``mode`` field): the trained MIGC/MIGC++ layers, or a training-free mode.
MODES = (MODE_MIGC, MODE_MULTIDIFFUSION, MODE_NAIVE)


@dataclass(frozen=True)
class MigcParams:
    """Everything a MIGC generation needs besides the WebUI's own parameters.

    migc_steps / naive_steps: fractions of the sampler's steps; MIGC runs at step indices
    ``i <= round(fraction * steps)`` (the official 25 of 50 steps is 0.5); 0 turns a phase off.
    use_main_prompt: the cond rows' own context is MIGC's global prompt; otherwise
    ``layout.global_prompt`` is encoded and used by the MIGC layers.
    append_descriptions: add instance descriptions missing from the prompt to it (the official
    convention: the global prompt names every instance).
    hires: run MIGC in the hires-fix pass too.
    structure: StructureDiffusion, which runs with MIGC or alone (``enabled`` is MIGC's own switch).
    magicfusion: MagicFusion (a second checkpoint's noise blended in by saliency), with the others or alone.
    mode: ``migc`` (trained weights, SD1.x), ``naive`` (MIGC's weight-free fuser on every attn2, any
    family) or ``multidiffusion`` (region fusion of the denoiser output, any family).
    md_bootstrap: MultiDiffusion's bootstrapping phase as a fraction of the steps (0 = off).
    md_window / md_stride / md_wrap: MultiDiffusion's windows on canvases larger than the model (window
    side in px, 0 = native, -1 = the whole canvas; stride in px; wrap around left-right for 360°).
    consistent: Consistent-MIG (keep unchanged instances): False, True, or "reset" (forget the record first).
    maps: add an instance-map image per generated image (where each instance acted); never changes the image.
    """

    enabled: bool = False
    weights: str = migc_params.DEFAULTS["weights"]
    layout: Layout = field(default_factory=Layout)
    migc_steps: float = migc_params.DEFAULTS["migc_steps"]
    naive_steps: float = migc_params.DEFAULTS["naive_steps"]
    use_main_prompt: bool = True
    append_descriptions: bool = True
    draw_boxes: bool = False
    hires: bool = False
    structure: StructureParams = field(default_factory=StructureParams)
    magicfusion: FusionParams = field(default_factory=FusionParams)
    mode: str = MODE_MIGC
    md_bootstrap: float = region_params.DEFAULTS["md_bootstrap"]
    md_window: int = region_params.DEFAULTS["md_window"]
    md_stride: int = region_params.DEFAULTS["md_stride"]
    md_wrap: bool = region_params.DEFAULTS["md_wrap"]
    consistent: bool | str = False
    maps: bool = False

    @property
    def training_free(self) -> bool:
        return self.mode != MODE_MIGC

    # ------------------------------------------------------------------ formats
    @classmethod
    def from_ui(cls, *args: Any) -> "MigcParams":
        """Positional values in the order of :data:`UI_FIELDS` (the panel's components, and the API's list form).

        A dict as the first value is the API's dict form. Missing trailing values keep their defaults.
        """
        if args and isinstance(args[0], Mapping):
            return cls.from_api(args[0])
        if len(args) > len(UI_FIELDS):
            raise MigcError(f"MIGC: {len(args)} arguments given, at most {len(UI_FIELDS)} expected: {', '.join(UI_FIELDS)}.")
        values = dict(zip(UI_FIELDS, args))
        structure = StructureParams.from_ui(*(values.pop(name, None) for name in STRUCTURE_UI_FIELDS))
        fusion = FusionParams.from_ui(*(values.pop(name, None) for name in FUSION_UI_FIELDS))
        global_prompt = values.pop("global_prompt", None)
        layout = parse_layout(values.pop("layout", None))
        if isinstance(global_prompt, str) and global_prompt.strip():
            layout = replace(layout, global_prompt=global_prompt.strip())
        return cls._checked(layout=layout, structure=structure, magicfusion=fusion, **values)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> "MigcParams":
        """The API's dict form: ``{"enabled": true, "weights": ..., "instances": [...], "migc_steps": 0.5, ...}``."""
        unknown = sorted(set(data) - set(API_FIELDS))
        if unknown:
            raise MigcError(f"MIGC: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(API_FIELDS)}.")
        values = dict(data)
        values.setdefault("enabled", True)
        layout_source: dict[str, Any] = {}
        if "instances" in values:
            layout_source["instances"] = values.pop("instances")
        if "global_prompt" in values:
            layout_source["global_prompt"] = values.pop("global_prompt")
        structure = StructureParams.from_api(values.pop("structure", None))
        fusion = FusionParams.from_api(values.pop("magicfusion", None))
        return cls._checked(layout=parse_layout(layout_source), structure=structure, magicfusion=fusion, **values)

    def to_api(self) -> dict[str, Any]:
        skipped = (("layout", "structure", "magicfusion") + (() if self.mode == MODE_MULTIDIFFUSION else region_params.WINDOW_FIELDS)
                   + (() if self.consistent else ("consistent",)) + (() if self.maps else ("maps",)))
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        out.update(self.layout.to_dict())
        if self.structure.enabled:
            out["structure"] = self.structure.to_api()
        if self.magicfusion.enabled:
            out["magicfusion"] = self.magicfusion.to_api()
        return out

    def to_infotext(self, weights_hash: str | None = None, model_b_hash: str | None = None,
                    weights_kind: str | None = None, consistent: str | None = None) -> str:
        """Compact JSON of every field but ``enabled`` (its presence means enabled), plus the short hashes of
        the MIGC weights and of MagicFusion's model B, which kind the weights were (MIGC or MIGC++), and
        whether the image recorded or edited (``consistent``: "record" / "edit")."""
        data = self.to_api()
        if consistent:
            data["consistent"] = consistent
        if weights_kind:
            data["weights_kind"] = weights_kind
        if model_b_hash and "magicfusion" in data:
            data["magicfusion"]["model_b_hash"] = model_b_hash
        if data["enabled"]:
            del data["enabled"]  # kept only as false: StructureDiffusion alone
        if weights_hash:
            data["weights_hash"] = weights_hash
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_infotext(cls, text: str) -> "MigcParams":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise MigcError(f"MIGC: the infotext entry {INFOTEXT_KEY!r} is not valid JSON.") from None
        if not isinstance(data, dict):
            raise MigcError(f"MIGC: the infotext entry {INFOTEXT_KEY!r} must be a JSON object.")
        data.pop("weights_hash", None)
        data.pop("weights_kind", None)
        if isinstance(data.get("magicfusion"), dict):
            data["magicfusion"].pop("model_b_hash", None)
        return cls.from_api({"enabled": True, **region_params.legacy_infotext(data)})

    def ui_values(self) -> list[Any]:
        """Values for the panel's components, in :data:`UI_FIELDS` order."""
        layout = replace(self.layout, global_prompt=None)
        return [
            self.enabled, self.weights, layout.to_json() if len(layout) else "", self.migc_steps, self.naive_steps,
            self.use_main_prompt, self.layout.global_prompt or "", self.append_descriptions, self.draw_boxes, self.hires,
            *self.structure.ui_values(), *self.magicfusion.ui_values(), self.mode, self.md_bootstrap,
            self.md_window, self.md_stride, self.md_wrap, bool(self.consistent), self.maps,
        ]

    # ------------------------------------------------------------------ validation
    @classmethod
    def _checked(cls, **values: Any) -> "MigcParams":
        for name in ("enabled", "use_main_prompt", "append_descriptions", "draw_boxes", "hires", "maps"):
            if values.get(name) is not None:
                switch(name, values[name])
        mode = values.get("mode")
        if mode is not None and mode not in MODES:
            raise MigcError(f"MIGC: field 'mode' = {mode!r} is not allowed; use one of {', '.join(MODES)}.")
        migc_params.check(values)
        region_params.check(values)
        if "consistent" in values:
            values["consistent"] = consistent_params.check(values["consistent"])
        values = {k: v for k, v in values.items() if v is not None}
        return cls(**values)


#: Panel components / API list form, in order.
UI_FIELDS: tuple[str, ...] = (
    "enabled", "weights", "layout", "migc_steps", "naive_steps", "use_main_prompt", "global_prompt",
    "append_descriptions", "draw_boxes", "hires",
    "structure_enabled", "structure_mode", "structure_phrases", "structure_custom",
    "fusion_enabled", "fusion_model_b", "fusion_prompt_b", "fusion_k_a", "fusion_k_b", "fusion_window_mode",
    "fusion_switch_t", "fusion_hires", "mode", "md_bootstrap", "md_window", "md_stride", "md_wrap", "consistent", "maps",
)
STRUCTURE_UI_FIELDS = tuple(name for name in UI_FIELDS if name.startswith("structure_"))
FUSION_UI_FIELDS = tuple(name for name in UI_FIELDS if name.startswith("fusion_"))
#: API dict form.
API_FIELDS: tuple[str, ...] = (
    "enabled", "weights", "instances", "global_prompt", "migc_steps", "naive_steps", "use_main_prompt",
    "append_descriptions", "draw_boxes", "hires", "structure", "magicfusion", "mode", "md_bootstrap",
    "md_window", "md_stride", "md_wrap", "consistent", "maps",
)


def step_limit(fraction: float, total_steps: int) -> int:
    """Last sampler step index (inclusive) of a phase that lasts ``fraction`` of ``total_steps``; -1 = off."""
    return -1 if fraction <= 0 else int(round(fraction * total_steps))


def with_descriptions_appended(prompt: str, descriptions: Sequence[str]) -> str:
    """The official convention: the global prompt names every instance. Adds only what is missing, so a
    prompt restored from infotext (which already has them) is left as it is."""
    missing = [d for d in descriptions if d.lower() not in prompt.lower()]
    if not missing:
        return prompt
    base = prompt.rstrip()
    joiner = "" if not base else (" " if base.endswith(",") else ", ")
    return base + joiner + ", ".join(missing)


def has_and_subprompts(prompt: str) -> bool:
    """Whether the WebUI will split ``prompt`` into AND sub-prompts (its own rule: the word AND, upper case)."""
    return re.search(r"\bAND\b", prompt or "") is not None


def asks_for_anything(args: tuple) -> bool:
    """Whether the raw arguments enable MIGC, StructureDiffusion or MagicFusion, even when otherwise invalid."""
    if not args:
        return False
    first = args[0]
    if isinstance(first, dict):
        parts = [first.get(name) for name in ("structure", "magicfusion")]
        return first.get("enabled", True) is not False or any(d is not None and (not isinstance(d, dict) or d.get("enabled", True) is not False) for d in parts)
    # Anything but an explicit off (false/null) counts as asking: a wrong type then gets its 4xx message.
    switches = [UI_FIELDS.index(name) for name in ("structure_enabled", "fusion_enabled")]
    return _switch_on(first) or any(len(args) > i and _switch_on(args[i]) for i in switches)


def _switch_on(value: Any) -> bool:
    return value is not None and value is not False
