"""MultiDiffusion's windows ("views"): a canvas larger than the model covered by native-size latent windows.

Written from docs/modes/multidiffusion.md §1.4. The official panorama code slides a 64x64 latent window
(512 px, SD's native size) with a stride of 8 cells over the canvas, runs the method in each window and
divides the per-pixel sums once. Its grid leaves the last rows/columns uncovered when a side is not
``size + k*stride`` and cannot do a side shorter than the window; :func:`plan_windows` adds windows
aligned to the far edges and clips the window to a short side, so every multiple-of-8 canvas works, and
on canvases that fit the official grid it returns exactly the official windows, in the official order.

With ``wrap`` the horizontal windows run past the right edge and continue at the left one, so the
fused prediction is periodic left to right and the image tiles seamlessly (360° panoramas). Such a
window's columns are given modulo the width (:func:`columns`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Window:
    """Latent cells [h0, h1) x [w0, w1); with wrap, w1 may pass the canvas width (columns taken modulo it)."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def height(self) -> int:
        return self.h1 - self.h0

    @property
    def width(self) -> int:
        return self.w1 - self.w0


def whole_canvas(height: int, width: int) -> list[Window]:
    """One window over the whole latent canvas (the region mode before windows, and any canvas that fits)."""
    return [Window(0, height, 0, width)]


def official_windows(height: int, width: int, size: int = 64, stride: int = 8) -> list[Window]:
    """The official grid, row-major: ``n_h = (h - size)//stride + 1`` rows of ``n_w`` windows, window k at
    ``(stride*(k // n_w), stride*(k % n_w))``. Empty where a side is shorter than the window."""
    n_h, n_w = (height - size) // stride + 1, (width - size) // stride + 1
    if n_h <= 0 or n_w <= 0:
        return []
    return [Window(stride * (k // n_w), stride * (k // n_w) + size, stride * (k % n_w), stride * (k % n_w) + size)
            for k in range(n_h * n_w)]


def _starts(side: int, size: int, stride: int, wrap: bool) -> list[int]:
    """Window starts along one side for windows of ``size`` (already clipped to the side)."""
    if wrap:
        return list(range(0, side, stride))
    if size >= side:
        return [0]
    starts = list(range(0, side - size + 1, stride))
    if starts[-1] + size < side:
        starts.append(side - size)  # aligned to the far edge: the official grid would leave these cells out
    return starts


def plan_windows(height: int, width: int, size_h: int, size_w: int, stride: int, wrap: bool = False) -> list[Window]:
    """Windows covering every cell of a (height, width) latent, row-major.

    Windows are ``size_h`` x ``size_w`` cells clipped to the canvas; starts every ``stride`` cells plus
    one aligned to the far edge where the grid falls short (on a canvas of ``size + k*stride`` cells this
    is the official grid). ``wrap``: horizontal starts every ``stride`` cells across the whole width, the
    windows continuing past the right edge at the left one.
    """
    if min(height, width, size_h, size_w, stride) <= 0:
        raise ValueError(f"windows need positive sizes, got canvas {height}x{width}, window {size_h}x{size_w}, stride {stride}")
    win_h, win_w = min(size_h, height), min(size_w, width)
    rows = _starts(height, win_h, stride, False)
    cols = _starts(width, win_w, stride, wrap)
    return [Window(h0, h0 + win_h, w0, w0 + win_w) for h0 in rows for w0 in cols]


def columns(window: Window, width: int, device: torch.device | str | None = None) -> slice | torch.Tensor:
    """The window's latent columns: a slice, or (wrapping windows) an index tensor modulo ``width``."""
    if window.w1 <= width:
        return slice(window.w0, window.w1)
    return torch.arange(window.w0, window.w1, device=device) % width


def crop(x: torch.Tensor, window: Window) -> torch.Tensor:
    """``x[..., h0:h1, w0:w1]`` (columns modulo the width for a wrapping window)."""
    cols = columns(window, x.shape[-1], x.device)
    rows = x[..., window.h0:window.h1, :]
    return rows[..., cols] if isinstance(cols, slice) else rows.index_select(-1, cols)


def add_into(total: torch.Tensor, window: Window, value: torch.Tensor) -> None:
    """``total[..., window] += value`` in place (a window never covers a column twice)."""
    cols = columns(window, total.shape[-1], total.device)
    rows = total[..., window.h0:window.h1, :]
    if isinstance(cols, slice):
        rows[..., cols] += value
    else:
        rows.index_add_(-1, cols, value)


def coverage(windows: Sequence[Window], height: int, width: int) -> torch.Tensor:
    """(height, width) how many windows cover each latent cell."""
    count = torch.zeros((height, width))
    for window in windows:
        add_into(count, window, torch.ones((window.height, window.width)))
    return count


#: SDXL's ``y`` (2816): the pooled text (1280), then original size, crop top-left and target size, each
#: pair of numbers as two 256-d sinusoidal embeddings (sgm's ConcatTimestepEmbedderND; Forge builds the same).
SDXL_VECTOR_DIM, SDXL_CROP, SIZE_EMBED_DIM = 2816, slice(1792, 2304), 256


def size_embedding(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The sinusoidal embedding SDXL gives each size number: cos then sin of ``value * 10000^(-k/128)``."""
    half = SIZE_EMBED_DIM // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor([float(v) for v in values], dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1).reshape(-1).to(device=like.device, dtype=like.dtype)


def with_crop_coordinates(vector: torch.Tensor, window: Window, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """An SDXL ``y`` whose crop coordinates are the window's top-left corner in pixels, so each window is
    conditioned as the crop of the canvas it is; any other vector is returned as it is. ``embedding``:
    the window's crop embedding when the caller already computed it."""
    if vector.shape[-1] != SDXL_VECTOR_DIM:
        return vector
    out = vector.clone()
    out[..., SDXL_CROP] = size_embedding((8 * window.h0, 8 * window.w0), vector) if embedding is None else embedding
    return out


def window_vectors(vectors: Sequence[torch.Tensor | None], window: Window) -> list[torch.Tensor | None]:
    """Each row's vector with the window's crop coordinates: the crop embedding is computed once per window,
    and rows that share one vector share its copy."""
    like = next((vector for vector in vectors if vector is not None), None)
    if like is None or like.shape[-1] != SDXL_VECTOR_DIM:
        return list(vectors)
    embedding = size_embedding((8 * window.h0, 8 * window.w0), like)
    done: dict[int, torch.Tensor | None] = {}
    out = []
    for vector in vectors:
        if id(vector) not in done:
            done[id(vector)] = None if vector is None else with_crop_coordinates(vector, window, embedding)
        out.append(done[id(vector)])
    return out
