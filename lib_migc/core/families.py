"""Which Stable Diffusion family the loaded model is, as the WebUIs mark it."""
from __future__ import annotations

from typing import Any


def model_family(model: Any) -> str | None:
    """"sd1", "sd2", "sdxl" or None (another architecture, e.g. Flux on Forge)."""
    for family in ("sd1", "sd2", "sdxl"):
        if getattr(model, f"is_{family}", False):
            return family
    return None
