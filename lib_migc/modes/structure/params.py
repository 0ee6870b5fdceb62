"""The StructureDiffusion settings of a job: on/off, mode, and where the phrases come from.

Kept apart from :mod:`lib_migc.params` so the mode is one small module: ``params`` only nests it
under the ``"structure"`` key of the API dict and the infotext, and appends its panel fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...core.errors import MigcError

MODES = ("default", "conjunction")
SOURCES = ("instances", "auto")
CUSTOM = "custom"  # the panel's third choice: the phrases typed in its textbox
KEYS = ("enabled", "mode", "phrases")
MAX_PHRASES = 32


@dataclass(frozen=True)
class StructureParams:
    """``phrases``: "instances" (the MIGC instance descriptions), "auto" (the rule-based splitter of the
    main prompt) or an explicit tuple of phrases."""

    enabled: bool = False
    mode: str = "default"
    phrases: str | tuple[str, ...] = "instances"

    def to_api(self) -> dict[str, Any]:
        phrases = list(self.phrases) if isinstance(self.phrases, tuple) else self.phrases
        return {"enabled": self.enabled, "mode": self.mode, "phrases": phrases}

    @classmethod
    def from_api(cls, data: Any) -> "StructureParams":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise MigcError('MIGC: field \'structure\' must be an object like {"enabled": true, "mode": "default", "phrases": "instances"}.')
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise MigcError(f"MIGC structure: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS)}.")
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            raise MigcError(f"MIGC structure: field 'enabled' must be true or false, got {enabled!r}.")
        mode = data.get("mode", "default")
        if mode not in MODES:
            raise MigcError(f"MIGC structure: field 'mode' = {mode!r} is not allowed; use one of {', '.join(map(repr, MODES))}.")
        return cls(enabled=enabled, mode=mode, phrases=_phrases(data.get("phrases", "instances")))

    @classmethod
    def from_ui(cls, enabled: Any, mode: Any, source: Any, custom: Any) -> "StructureParams":
        if not enabled:
            return cls()
        phrases: Any = source or "instances"
        if phrases == CUSTOM:
            phrases = [line.strip() for line in str(custom or "").replace(";", "\n").splitlines() if line.strip()]
            if not phrases:
                raise MigcError("MIGC structure: 'custom' phrases are selected but the phrases box is empty; type one phrase per line.")
        return cls.from_api({"enabled": True, "mode": mode or "default", "phrases": phrases})

    def ui_values(self) -> list[Any]:
        """(enabled, mode, source, custom text) for the panel."""
        if isinstance(self.phrases, tuple):
            return [self.enabled, self.mode, CUSTOM, "\n".join(self.phrases)]
        return [self.enabled, self.mode, self.phrases, ""]


def _phrases(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str) and value in SOURCES:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        if len(value) > MAX_PHRASES:
            raise MigcError(f"MIGC structure: {len(value)} phrases given; at most {MAX_PHRASES}.")
        return tuple(v.strip() for v in value)
    raise MigcError(f"MIGC structure: field 'phrases' = {value!r} is not allowed; use \"instances\", \"auto\" "
                    "or a non-empty list of phrases that appear in the prompt.")
