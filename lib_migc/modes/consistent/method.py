"""Consistent-MIG's two mechanisms as pure torch functions (migc-official-notes.md §5.5).

1. Latent preservation: the instances that changed since the recorded generation (the symmetric
   difference of the two (box, description) sets) define a map G at latent resolution: 1 where the
   previous image is kept, 0 inside every changed box grown by :data:`GROW` latent pixels, softened by a
   :data:`BLUR`×:data:`BLUR` box blur. Each step's latent becomes ``x·(1−G) + recorded·G``.
2. Self-attention sharing: in the up blocks' self-attention, keys and values come from the current
   tokens followed by the recorded tokens of the same call (queries from the current tokens only), so
   an edited instance takes the identity and style of the scene it is put into.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

#: Latent pixels a changed box grows by on every side, and the side of the box blur (the official values).
GROW, BLUR = 5, 5

Box = tuple[float, float, float, float]
Instance = tuple[Box, str]


def instance_set(boxes: Sequence[Sequence[float]], descriptions: Sequence[str]) -> frozenset[Instance]:
    """The (box, description) pairs of a layout, as the record keeps them (boxes in image fractions)."""
    return frozenset((tuple(float(v) for v in box), text) for box, text in zip(boxes, descriptions))


def changed_instances(previous: Iterable[Instance], current: Iterable[Instance]) -> frozenset[Instance]:
    """Instances added, removed, edited (both the old and the new description count) or moved (both
    places count): the symmetric difference of the two sets."""
    return frozenset(previous) ^ frozenset(current)


def changed_region(changed: Iterable[Instance], width: int, height: int) -> torch.Tensor:
    """(height//8, width//8) float64: 0 inside each changed box grown by :data:`GROW` latent pixels, 1 elsewhere.

    A box edge in latent pixels is ``int(size·fraction // 8)`` (floored, as the official code does),
    the grown start is clamped at 0 and the end at the latent side."""
    h, w = height // 8, width // 8
    region = torch.ones((h, w), dtype=torch.float64)
    for (x0, y0, x1, y1), _ in changed:
        left, right = max(0, int(width * x0 // 8) - GROW), min(w, int(width * x1 // 8) + GROW)
        top, bottom = max(0, int(height * y0 // 8) - GROW), min(h, int(height * y1 // 8) + GROW)
        region[top:bottom, left:right] = 0.0
    return region


def box_blur(values: torch.Tensor, size: int = BLUR) -> torch.Tensor:
    """Mean over a size×size window of a 2-D float64 map, the border mirrored edge-inclusively
    (``d c b a | a b c d``, scipy's ``uniform_filter`` default), so an all-ones map stays all ones."""
    pad = size // 2
    padded = values[None, None]
    for dim in (2, 3):
        n = padded.shape[dim]  # a latent side is at least 8 > pad
        before = padded.narrow(dim, 0, pad).flip(dim)
        after = padded.narrow(dim, n - pad, pad).flip(dim)
        padded = torch.cat([before, padded, after], dim=dim)
    return F.avg_pool2d(padded, size, stride=1)[0, 0]


def preservation_map(changed: Iterable[Instance], width: int, height: int) -> torch.Tensor:
    """G: (height//8, width//8) float64, 1 where the recorded latent is kept, 0 where the new one is used."""
    return box_blur(changed_region(changed, width, height))


def blend_latent(x: torch.Tensor, recorded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x·(1−G) + recorded·G`` computed in float64 and returned in ``x``'s dtype: where G is 1 the result
    is the recorded latent bit for bit, so an edit that changes nothing reproduces the recorded image."""
    keep = keep.to(x.device)
    mixed = x.double() * (1.0 - keep) + recorded.to(x.device).double() * keep
    return mixed.to(x.dtype)


def shared_keys_source(x: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """The keys/values source of a shared self-attention: each row's current tokens followed by the
    recorded tokens of the same row (rows × 2·tokens × channels)."""
    return torch.cat([x, recorded.to(device=x.device, dtype=x.dtype)], dim=1)
