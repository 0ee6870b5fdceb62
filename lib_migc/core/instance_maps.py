"""Where each instance acted: per-image sums of the shares a mode already computes, gathered while sampling.

A mode hands :meth:`InstanceMaps.add` a (rows, K, h, w) tensor of shares in [0, 1], one channel per
labelled region (MIGC's SAC weights times the instance masks, the naive fuser's weights, MultiDiffusion's
fusion weights, StructureDiffusion's span attention, MagicFusion's model-B mask); whatever is left to 1 is
"the rest" (background, global prompt, template, model A). Sums stay on the sampling device, one tensor per
feature resolution, so recording is one ``index_add_`` per call and never a host sync; they are averaged
and brought to the CPU once per batch (:meth:`end_batch`). Nothing here touches the tensors the sampler
uses, so the main image is the same with maps on or off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .masks import LATENT_FACTOR, feature_size

#: Record attention shares only where a feature map has at most 1/16 of the latent's cells (at 512x512:
#: the 16x16 and 8x8 maps MIGC shades): what "dominated" means is already visible there, and the cost stays tiny.
MAX_TOKEN_FRACTION = 16
#: How legends name those layers.
COARSE_LAYERS = "the coarse (16x16, 8x8 at 512x512) attention maps"


@dataclass
class BatchMaps:
    """One batch's maps, per image a (K, H, W) CPU tensor of mean shares (None: nothing was recorded)."""

    shares: list[torch.Tensor | None]
    labels: list[str]
    source: str


@dataclass
class InstanceMaps:
    """The job's collector; ``owner`` is the mode that fills it (one map per image, from one mode)."""

    owner: str
    labels: list[str] = field(default_factory=list)
    source: str = ""
    batches: list[BatchMaps] = field(default_factory=list)
    _images: int = 0
    _latent_hw: tuple[int, int] = (0, 0)
    _sums: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _counts: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # calls per image, on the host
    _index: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def begin_pass(self, images: int, width: int, height: int) -> None:
        """A sampling pass of ``images`` images at ``width`` x ``height`` px (the hires pass adds to the same batch)."""
        self._images = max(int(images), 1)
        self._latent_hw = (height // LATENT_FACTOR, width // LATENT_FACTOR)

    def wants(self, tokens: int) -> bool:
        """Whether an attention layer with ``tokens`` query cells is one the maps record."""
        return 0 < tokens * MAX_TOKEN_FRACTION <= self._latent_hw[0] * self._latent_hw[1]

    def size_of(self, tokens: int) -> tuple[int, int]:
        """(h, w) of a feature map with ``tokens`` cells in this pass."""
        return feature_size(self._latent_hw, tokens)

    def add(self, images: Sequence[int], shares: torch.Tensor) -> None:
        """Add ``shares`` (rows, K, h, w) of the images ``images`` (one index per row)."""
        shares = shares.detach()
        _, k, h, w = shares.shape
        sums = self._sums.get((h, w))
        if sums is None or sums.shape[1] != k or sums.device != shares.device:
            sums = self._sums[(h, w)] = torch.zeros((self._images, k, h, w), device=shares.device)
            self._counts[(h, w)] = [0] * self._images
        key = tuple(min(int(i), self._images - 1) for i in images)
        sums.index_add_(0, self._index_of(key, shares.device), shares.float())
        counts = self._counts[(h, w)]
        for image in key:
            counts[image] += 1

    def _index_of(self, images: tuple, device: torch.device) -> torch.Tensor:
        key = (images, str(device))
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(images, device=device)
        return index

    def end_batch(self) -> None:
        """Average what this batch recorded over every call (each resolution brought to the largest one, so
        a call counts the same wherever it was made) and keep it on the CPU."""
        per_image: list[torch.Tensor | None] = []
        target = max(self._sums, key=lambda hw: hw[0] * hw[1], default=None)
        for image in range(self._images):
            total, calls = None, 0.0
            for hw, sums in self._sums.items():
                count = self._counts[hw][image]
                if count <= 0:
                    continue
                part = sums[image].cpu()
                if hw != target:
                    part = F.interpolate(part[None], size=target, mode="bilinear", align_corners=False)[0]
                total = part if total is None else total + part
                calls += count
            per_image.append(None if total is None else total / calls)
        self.batches.append(BatchMaps(per_image, list(self.labels), self.source))
        self._sums, self._counts, self._index = {}, {}, {}
