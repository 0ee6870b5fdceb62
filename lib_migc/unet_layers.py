"""Where the cross-attention layers of an SD1.x CompVis/ldm UNet are, by the names MIGC uses.

A layer is named like its spatial transformer in the UNet (``middle_block.1``, ``output_blocks.3.1``),
the names the checkpoint keys use. Both A1111 and (through its own UNet) Forge number blocks the same way.
"""
from __future__ import annotations

import re

import torch.nn as nn

#: The attn2 layers that carry trained MIGC blocks in MIGC_SD14 (C = 1280; 8x8 and 16x16 at 512x512).
MIGC_LAYERS = ("middle_block.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1")

_ATTN2 = re.compile(r"^(?:.*\.)?((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.transformer_blocks\.0\.attn2$")


def attn2_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> attn2 module of every spatial transformer (its first transformer block) in ``unet``."""
    found = {}
    for name, module in unet.named_modules():
        match = _ATTN2.match(name)
        if match:
            found[match.group(1)] = module
    return found


def layer_sort_key(name: str) -> tuple:
    """Order layer names as the UNet runs them: input blocks, middle block, output blocks."""
    kind, *idx = name.split(".")
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(kind, 3)
    return (order, *[int(i) for i in idx if i.isdigit()])
