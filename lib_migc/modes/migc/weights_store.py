"""Finding, hashing and caching MIGC weight files in the models folder.

Loading the 219 MB official file takes a moment and its blocks live on the GPU, so the last loaded
file stays cached (keyed by path, size, mtime, device and dtype): at most one file's blocks are held,
until another file is selected or :func:`unload` runs (the main model changed to one MIGC cannot use).
"""
from __future__ import annotations

import hashlib
import os
import threading

import torch

from ...core import host_memory
from ...core.errors import CheckpointError
from ...core.rng import global_rng_kept
from .checkpoint import MigcWeights, load_migc_weights
from .weight_files import list_weight_files

HASH_CHARS = 10  # the WebUI's short-hash length

_lock = threading.Lock()
_cached: tuple[tuple, MigcWeights] | None = None
_hashes: dict[tuple, str] = {}


def resolve(folder: str, name: str) -> str:
    """Absolute path of weights ``name`` in ``folder``; a clear error naming both when it is not there."""
    path = os.path.join(folder, os.path.basename(name))
    if not os.path.isfile(path):
        found = list_weight_files(folder)
        have = f" Files there: {', '.join(found)}." if found else " The folder has no .ckpt/.safetensors files."
        raise CheckpointError(
            f"MIGC weights '{name}' not found in {os.path.abspath(folder)}. Download the official MIGC_SD14.ckpt "
            f"(see the extension's README) into that folder, or pick another file in the MIGC panel.{have}",
            status_code=404,
        )
    return path


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def short_hash(path: str) -> str:
    """First 10 hex digits of the file's sha256 (as the WebUI shows model hashes), cached per file version."""
    key = _stat_key(path)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()[:HASH_CHARS]
    return _hashes[key]


def load_cached(path: str, device: torch.device, dtype: torch.dtype) -> MigcWeights:
    """The blocks of ``path`` on ``device``/``dtype``, reusing the last load when nothing changed."""
    global _cached
    key = (*_stat_key(path), str(device), dtype)
    with _lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        _cached = None  # free the previous file's blocks before loading the next
        with global_rng_kept():  # building the blocks draws initial values the file then replaces
            weights = load_migc_weights(path, device=device, dtype=dtype)
        _cached = (key, weights)
        return weights


def unload() -> bool:
    """Free the cached blocks; whether there were any."""
    global _cached
    with _lock:
        had, _cached = _cached is not None, None
    if had:
        host_memory.release()
    return had


def loaded() -> bool:
    return _cached is not None
