"""Instance and background masks exactly as the official MIGC rasterises them, cached per resolution.

Why the odd two-step resize: the official pipeline rasterises each box at *image* resolution, resizes it
bilinearly to the latent (h/8, w/8) and the MIGC block resizes that again to the layer's feature size. A
feature value therefore depends on a few full-resolution pixels and masks are soft at the edges; trained
weights saw exactly these masks, so we reproduce them instead of rasterising at feature size.

Unlike the official code (which guesses the feature size from ``sqrt(h*w/HW)`` and breaks unless sizes
are multiples of 64) the feature size here comes from the latent size and the UNet level, following the
stride-2 convolutions that round up, so any multiple of 8 works, square or not.
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch
import torch.nn.functional as F

from .layout import Box, Layout

LATENT_FACTOR = 8
MAX_LEVELS = 6


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """Rasterise a fractional box at (height, width): rows int(h*y0)..int(h*y1)-1, same for columns."""
    x0, y0, x1, y1 = box
    mask = torch.zeros((height, width), dtype=torch.float64)
    mask[int(height * y0):int(height * y1), int(width * x0):int(width * x1)] = 1.0
    return mask


def fitted_mask(mask: str, height: int, width: int) -> torch.Tensor:
    """A mask instance's (soft) values at the image size, float64: what every mode reads of a mask."""
    from .mask_codec import decode_mask, fit_mask

    return torch.from_numpy(fit_mask(decode_mask(mask), height, width))


def full_res_masks(layout: Layout, height: int, width: int) -> torch.Tensor:
    """(N, height, width) float64 instance masks at image resolution: a mask instance's own (soft) values,
    a box instance's rasterised box."""
    masks = [
        fitted_mask(inst.mask, height, width) if inst.mask is not None else box_mask(inst.box, height, width)
        for inst in layout.instances
    ]
    return torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.float64)


def _bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear, align_corners=False, no antialias (the official resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def latent_masks(
    full_res_masks: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance masks (N, h/8, w/8) float32 and the background mask (h/8, w/8) from (N, h, w) float64 masks.

    As in the official code the instances are cast to float32 before the resize and the background
    (1 - min(1, sum)) is resized in float64 and cast after.
    """
    latent = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    background = 1.0 - full_res_masks.sum(0).clamp(max=1.0) if len(full_res_masks) else torch.ones(
        (height, width), dtype=torch.float64
    )
    inst = _bilinear(full_res_masks.float(), latent) if len(full_res_masks) else torch.zeros((0, *latent))
    bg = _bilinear(background[None], latent)[0].float()
    return inst, bg


def feature_size(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (H, W) of a UNet feature map with ``tokens`` positions for a latent of ``latent_hw``.

    Each UNet level halves with a stride-2, padding-1, kernel-3 conv: n -> ceil(n / 2).
    """
    h, w = latent_hw
    for _ in range(MAX_LEVELS):
        if h * w == tokens:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"no UNet level of a {latent_hw[0]}x{latent_hw[1]} latent has {tokens} positions")


class FeatureMasks:
    """Masks at one feature resolution, flattened row-major like the attention tokens."""

    def __init__(self, instances: torch.Tensor, background: torch.Tensor, size: tuple[int, int]) -> None:
        self.instances = instances  # (N, HW)
        self.background = background  # (HW,)
        self.size = size

    @cached_property
    def layout_allowed(self) -> torch.Tensor:
        """(HW, HW) bool: may pixel p attend to pixel q in the Layout Attention (some region holds both).

        Built on first use only: the naive fuser never needs it, and at 64x64 tokens it is 16 M entries.
        """
        regions = torch.cat([self.instances, self.background[None]]) > 0
        return (regions.T.float() @ regions.float()) > 0


class MaskCache:
    """Masks of one layout at one image size, built once per feature resolution, device and dtype.

    Created once per generation (and again for a hires pass of another size); layer hooks ask it for
    the masks of the token count they see.
    """

    def __init__(self, full_res_masks: torch.Tensor, height: int, width: int) -> None:
        """``full_res_masks``: (N, height, width) float64 instance masks with values in [0, 1]."""
        if height % LATENT_FACTOR or width % LATENT_FACTOR:
            raise ValueError(f"image size {width}x{height} must be a multiple of {LATENT_FACTOR}")
        self.height, self.width = height, width
        self.latent_hw = (height // LATENT_FACTOR, width // LATENT_FACTOR)
        self.latent_instances, self.latent_background = latent_masks(full_res_masks, height, width)
        self._cache: dict[tuple, FeatureMasks] = {}

    @classmethod
    def from_layout(cls, layout: Layout, height: int, width: int) -> "MaskCache":
        """Box instances rasterised, mask instances brought to the image size (MIGC++ spec §3.1)."""
        return cls(full_res_masks(layout, height, width), height, width)

    @classmethod
    def from_boxes(cls, boxes: Sequence[Box], height: int, width: int) -> "MaskCache":
        full = (
            torch.stack([box_mask(b, height, width) for b in boxes])
            if len(boxes)
            else torch.zeros((0, height, width), dtype=torch.float64)
        )
        return cls(full, height, width)

    def for_tokens(self, tokens: int, device: torch.device, dtype: torch.dtype) -> FeatureMasks:
        """Masks for a layer whose hidden states have ``tokens`` positions."""
        return self.at(feature_size(self.latent_hw, tokens), device, dtype)

    def at(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> FeatureMasks:
        key = (tuple(size), torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(tuple(size), device, dtype)
        return cached

    def _build(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> FeatureMasks:
        inst = _bilinear(self.latent_instances, size).flatten(1)
        bg = _bilinear(self.latent_background[None], size).flatten(1)
        return FeatureMasks(inst.to(device=device, dtype=dtype), bg[0].to(device=device, dtype=dtype), size)
