"""Several modes on the same attn2 slot: the host's attention hooks serve one processor, and this chains many.

An attention processor is what a host's attn2 hooks call (both hosts, the same calls): ``pending_error``,
``hooked_layers(available)``, ``set_step(step, steps)``, ``mode_for(layer)`` (an opaque per-step token),
``is_shaded(token)`` and ``shade(layer, attn, plain, x, context, images, token)``, which returns the cond
rows' attention output and calls ``plain(x, context)`` for what it leaves alone. The job's attention
session (MIGC, the naive shader, StructureDiffusion) is one; a mode may add its own (see
``modes/README.md``). Chained, each processor's ``plain`` is the processors before it, then the layer
itself (or whatever another extension put there), so every mode sees the rows and layers it asked for and
leaves the rest to what was there before.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

PlainForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionChain:
    """Processors applied in order on each hooked layer; the first one carries the job's pending error."""

    def __init__(self, processors: Sequence[Any]) -> None:
        self.processors = list(processors)

    @property
    def pending_error(self) -> Exception | None:
        return self.processors[0].pending_error

    @pending_error.setter
    def pending_error(self, error: Exception | None) -> None:
        self.processors[0].pending_error = error

    def hooked_layers(self, available: Sequence[str]) -> list[str]:
        wanted = set().union(*(processor.hooked_layers(available) for processor in self.processors))
        return [name for name in available if name in wanted]

    def set_step(self, step: int, total_steps: int) -> None:
        for processor in self.processors:
            processor.set_step(step, total_steps)

    def mode_for(self, layer: str) -> tuple:
        return tuple(processor.mode_for(layer) for processor in self.processors)

    def is_shaded(self, tokens: tuple) -> bool:
        return any(processor.is_shaded(token) for processor, token in zip(self.processors, tokens))

    def shade(self, layer: str, attn: nn.Module, plain: PlainForward, x: torch.Tensor, context: torch.Tensor,
              images: Sequence[int], tokens: tuple) -> torch.Tensor:
        forward = plain
        for processor, token in zip(self.processors, tokens):
            if processor.is_shaded(token):
                forward = _through(processor, layer, attn, forward, images, token)
        return forward(x, context)


def _through(processor: Any, layer: str, attn: nn.Module, inner: PlainForward, images: Sequence[int], token: Any) -> PlainForward:
    def forward(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return processor.shade(layer, attn, inner, x, context, images, token)

    return forward


def chain(processors: Sequence[Any]) -> Any:
    """One processor as it is (the common case, no indirection), several as an :class:`AttentionChain`."""
    return processors[0] if len(processors) == 1 else AttentionChain(processors)
