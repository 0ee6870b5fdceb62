"""Which files in the models folder are MIGC weights.

Kept free of torch so that the panel (and the standalone UI demo the browser tests run) can list
the weights dropdown without importing the model code.
"""
from __future__ import annotations

import os

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = PICKLE_SUFFIXES[:2] + SAFE_SUFFIXES


def list_weight_files(folder: str) -> list[str]:
    """File names of MIGC weights (``.ckpt``/``.pt``/``.safetensors``) in ``folder``, sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, name))
    )
