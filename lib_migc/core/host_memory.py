"""Give memory back after dropping a large model, on the GPU and on the CPU.

Why more than ``gc.collect()``: a UNet's parameters are many blocks of a few MB, which glibc serves from
its heap rather than from separate mappings, and keeps after they are freed; on a CPU-only WebUI that
leaves model B's gigabytes in the server's resident memory for every later job. ``malloc_trim`` hands
the free heap pages back to the system (glibc only; elsewhere it is skipped).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

_libc = None


def trim() -> None:
    """Hand the C heap's free pages back (cheap): after a job, whose activations fragment the heap."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    malloc_trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if malloc_trim is not None:
        malloc_trim(0)


def release() -> None:
    """After the last reference to a large model is gone: collect, empty the CUDA cache, trim the C heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim()
