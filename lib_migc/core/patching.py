"""Install per-module ``forward`` overrides for one generation and put back exactly what was there.

A1111 swaps ``CrossAttention.forward`` on the *class* for its attention optimisations; an instance
attribute wins over the class method, so overriding the instances MIGC needs works whichever
optimisation is active, and removing the attribute restores the class behaviour bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MISSING = object()


class ForwardPatches:
    """Records every override so :meth:`remove` restores the modules' previous state, in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, object]] = []

    def install(self, module: nn.Module, forward: Callable) -> None:
        self._saved.append((module, module.__dict__.get("forward", _MISSING)))
        module.forward = forward

    def remove(self) -> None:
        while self._saved:
            module, previous = self._saved.pop()
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def __enter__(self) -> "ForwardPatches":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
