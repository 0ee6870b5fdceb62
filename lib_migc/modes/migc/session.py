"""Per-generation MIGC state, shared by the host adapters.

Created when a MIGC job starts and dropped when it ends: the parameters, the encoded instances, the
weights, the masks of the current pass (cached per feature resolution), one SAC generator per image
seeded from that image's seed, the current sampler step and one :class:`LayerShader` per hooked layer.
Layer hooks read from it and keep no global state of their own.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ...core.instance_maps import InstanceMaps
from ...core.masks import FeatureMasks, MaskCache
from ...params import MigcParams, step_limit
from ..structure.method import StructureRuntime
from .checkpoint import MigcWeights
from .shading import (InstanceConditioning, LayerShader, ShadingMode, draw_sac_permutations, naive_instance_shares,
                      sac_instance_shares, sac_slots)

PlainForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private generator on ``device`` (no host sync to use it), CPU where the device has none."""
    try:
        return torch.Generator(device=device).manual_seed(int(seed))
    except RuntimeError:
        return torch.Generator().manual_seed(int(seed))


class MigcSession:
    """State of one MIGC generation; hosts call :meth:`begin_pass`, :meth:`set_step` and :meth:`shade`."""

    def __init__(
        self,
        params: MigcParams,
        conditioning: InstanceConditioning,
        weights: MigcWeights | None,
        global_context: torch.Tensor | None = None,
    ) -> None:
        self.params = params
        self.conditioning = conditioning
        self.weights = weights
        self.global_context = global_context  # (1, L, D) when the layout's own global prompt replaces the main one
        self.pending_error: Exception | None = None
        self.step = 0
        self.total_steps = 1
        self._masks: MaskCache | None = None
        self._generators: list[torch.Generator] = []
        self._shaders: dict[str, LayerShader] = {}
        self.structure: StructureRuntime | None = None  # StructureDiffusion on the cond rows of every attn2
        self.migc_off = False  # a pass where only other modes run (e.g. MagicFusion's hires pass)
        self.maps: InstanceMaps | None = None  # *Show instance maps*, when MIGC is the mode that fills them

    # ------------------------------------------------------------------ pass / step
    def begin_pass(self, width: int, height: int, seeds: Sequence[int], device: torch.device) -> None:
        """A sampling pass at ``width`` x ``height`` for images with ``seeds``: fresh masks and generators."""
        self._masks = MaskCache.from_layout(self.params.layout, height, width)
        self._generators = [make_generator(seed, device) for seed in seeds]
        self.step, self.total_steps = 0, 1

    def vanished_instances(self, levels: Sequence[int] = (2, 3)) -> list[int]:
        """Instances whose mask is all zero at a feature map the MIGC layers shade (16x16 and 8x8 at 512²:
        2 and 3 halvings of the latent). Thin masks are point-sampled there (MIGC++ spec §3.3): such an
        instance gets no shading, and only dilutes the aggregation's softmax."""
        if self._masks is None or self.conditioning.count == 0:
            return []
        h, w = self._masks.latent_hw
        gone = set()
        for level in levels:
            size = (h, w)
            for _ in range(level):
                size = (-(-size[0] // 2), -(-size[1] // 2))
            masks = self._masks.at(size, torch.device("cpu"), torch.float32)
            gone.update(i for i, row in enumerate(masks.instances) if not bool(row.any()))
        return sorted(gone)

    def set_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = int(step), max(int(total_steps), 1)

    def mode_for(self, layer: str) -> ShadingMode:
        """MIGC on layers with weights up to the MIGC step limit, then the naive fuser up to its limit."""
        if self.conditioning.count == 0 or self.migc_off:
            return ShadingMode.VANILLA
        has_block = self.weights is not None and layer in self.weights.blocks
        if has_block and self.step <= step_limit(self.params.migc_steps, self.total_steps):
            return ShadingMode.MIGC
        if self.step <= step_limit(self.params.naive_steps, self.total_steps):
            return ShadingMode.NAIVE
        return ShadingMode.VANILLA

    def is_shaded(self, mode: ShadingMode) -> bool:
        """Whether a layer in ``mode`` needs :meth:`shade` for its cond rows (StructureDiffusion: always)."""
        return mode is not ShadingMode.VANILLA or self.structure is not None

    def hooked_layers(self, available: Sequence[str]) -> list[str]:
        """Layers that can leave vanilla at some step: the MIGC layers, and every attn2 with the naive
        fuser or StructureDiffusion."""
        if self.structure is not None:
            return list(available)
        if self.conditioning.count == 0 or self.migc_off:
            return []
        if self.params.naive_steps > 0:
            return list(available)
        return [name for name in available if self.weights is not None and name in self.weights.blocks]

    # ------------------------------------------------------------------ the per-call work
    def masks_for(self, tokens: int, x: torch.Tensor) -> FeatureMasks:
        if self._masks is None:
            raise RuntimeError("MIGC session used before begin_pass")
        return self._masks.for_tokens(tokens, x.device, x.dtype)

    def shade(
        self,
        layer: str,
        attn: nn.Module,
        plain: PlainForward,
        x: torch.Tensor,
        context: torch.Tensor,
        images: Sequence[int],
        mode: ShadingMode,
    ) -> torch.Tensor:
        """Cond rows ``x`` of images ``images`` (one index per row) through this layer's shading."""
        structure = self.structure
        if mode is ShadingMode.VANILLA:
            return structure.forward(attn, x, context, images, self.step) if structure is not None else plain(x, context)
        shader = self._shaders.get(layer)
        if shader is None or shader.attn is not attn:
            block = self.weights.blocks.get(layer) if self.weights is not None else None
            shader = self._shaders[layer] = LayerShader(attn, plain, self.conditioning, block)
        shader.plain_forward = plain
        global_heads = None
        if self.global_context is not None:
            context = self.global_context.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        elif structure is not None:  # the spans belong to the main prompt, which is this context
            step = self.step
            global_heads = lambda q: structure.heads(attn, q, context, images, step, shader.heads)  # noqa: E731
        perms = None
        if mode is ShadingMode.MIGC:
            gens = [self._generators[min(i, len(self._generators) - 1)] for i in images]
            perms = draw_sac_permutations(gens, x.device, sac_slots(shader.block))
        masks = self.masks_for(x.shape[1], x)
        maps = self.maps
        if maps is None or not maps.wants(x.shape[1]):
            return shader(x, context, masks, mode, perms=perms, global_heads=global_heads)
        out, weights = shader(x, context, masks, mode, perms=perms, global_heads=global_heads, return_weights=True)
        shares = sac_instance_shares(weights, masks) if weights is not None else naive_instance_shares(masks)
        maps.add(images, shares.expand(x.shape[0], *shares.shape[-3:]))
        return out
