"""Where the cross-attention layers of an SD1.x CompVis/ldm UNet are, by the names MIGC uses.

A layer is named like its spatial transformer in the UNet (``middle_block.1``, ``output_blocks.3.1``),
the names the checkpoint keys use. Both A1111 and (through its own UNet) Forge number blocks the same way.
SD1.x/SD2.x spatial transformers hold one transformer block; SDXL's hold 2 or 10, and the attn2 of
block k > 0 is named with a suffix (``output_blocks.3.1.4``) so training-free modes reach all of them.
"""
from __future__ import annotations

import re

import torch.nn as nn

#: The attn2 layers that carry trained MIGC blocks in MIGC_SD14 (C = 1280; 8x8 and 16x16 at 512x512).
MIGC_LAYERS = ("middle_block.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1")

_ATTENTION = re.compile(
    r"^(?:.*\.)?((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.transformer_blocks\.(\d+)\.(attn[12])$"
)


def layer_name(spatial_transformer: str, transformer_index: int) -> str:
    """``output_blocks.3.1`` for the first transformer block, ``output_blocks.3.1.4`` for the fifth."""
    return spatial_transformer if transformer_index == 0 else f"{spatial_transformer}.{transformer_index}"


def split_layer_name(name: str) -> tuple[str, int]:
    """Inverse of :func:`layer_name`: (spatial transformer, transformer block index)."""
    parts = name.split(".")
    base_len = 2 if parts[0] == "middle_block" else 3
    return ".".join(parts[:base_len]), int(parts[base_len]) if len(parts) > base_len else 0


def attn2_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> attn2 module of every transformer block of every spatial transformer in ``unet``."""
    return attention_layers(unet, "attn2")


def attn1_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> attn1 (self-attention) module, named like the attn2 of the same transformer block."""
    return attention_layers(unet, "attn1")


def attention_layers(unet: nn.Module, which: str) -> dict[str, nn.Module]:
    found = {}
    for name, module in unet.named_modules():
        match = _ATTENTION.match(name)
        if match and match.group(3) == which:
            found[layer_name(match.group(1), int(match.group(2)))] = module
    return found


def layer_sort_key(name: str) -> tuple:
    """Order layer names as the UNet runs them: input blocks, middle block, output blocks."""
    kind, *idx = name.split(".")
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(kind, 3)
    return (order, *[int(i) for i in idx if i.isdigit()])
