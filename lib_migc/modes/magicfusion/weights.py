"""MagicFusion's model B: only its UNet weights, read safely from a standard SD1 checkpoint, and the
check that it pairs with the loaded model.

SNB uses only B's UNet (A's text encoder and VAE serve both, as in the official fused run), so the
text encoder and VAE of B's file are never materialised; a pickle is read by the allow-list unpickler
(:mod:`lib_migc.core.safe_pickle`), so no code in it runs on any torch version. Nothing here imports the WebUI.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ...core.errors import CheckpointError, MigcError
from ..migc.checkpoint import read_pickle

SD1_CONTEXT_DIM = 768
UNET_PREFIX = "model.diffusion_model."
INPUT_CONV_KEY = "input_blocks.0.0.weight"
#: The first cross-attention key projection of the SD1 UNet: its shape is (320, context width).
ATTN2_TO_K_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _unet_only(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The ``model.diffusion_model.*`` tensors with the prefix stripped (EMA, CLIP and VAE keys dropped)."""
    return {k[len(UNET_PREFIX):]: v for k, v in state.items()
            if isinstance(k, str) and k.startswith(UNET_PREFIX) and isinstance(v, Tensor)}


def _read_safetensors_unet(path: str, name: str) -> dict[str, Tensor]:
    """Only the UNet tensors of a .safetensors file (the text encoder and VAE are never materialised)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"MagicFusion model B '{name}' could not be read as safetensors "
                              f"(truncated or corrupt?): {str(exc)[:300]}") from None


def _read_pickle_unet(path: str, name: str) -> dict[str, Tensor]:
    """The UNet tensors of a torch pickle, read by the allow-list unpickler (no code in the file ever runs)."""
    data = read_pickle(path, f"MagicFusion model B '{name}'", "Use a .safetensors version of this model.")
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"MagicFusion model B '{name}' holds a {type(data).__name__}, not a checkpoint dict.")
    return _unet_only(data)


def load_unet_state(path: str) -> dict[str, Tensor]:
    """The UNet weights of a standard SD1 checkpoint, keys without ``model.diffusion_model.``.

    SNB uses only B's UNet (A's text encoder and VAE serve both), so nothing else is kept.
    ``.safetensors`` is read with safetensors; anything else as a torch pickle through the allow-list unpickler.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"MagicFusion model B file not found: {path}", status_code=404)
    if path.lower().endswith(".safetensors"):
        state = _read_safetensors_unet(path, name)
    else:
        state = _read_pickle_unet(path, name)
    if not state:
        raise CheckpointError(
            f"MagicFusion model B '{name}' has no UNet weights: expected a full Stable Diffusion 1.x checkpoint "
            f"with '{UNET_PREFIX}*' keys (a LoRA, VAE, embedding or diffusers folder cannot be model B).")
    return state


def state_shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Key → shape of a state dict, the form :func:`check_pair` compares."""
    return {k: tuple(v.shape) for k, v in state.items()}


def _key_shape(shapes: Mapping[str, Sequence[int]], key: str, name: str) -> tuple[int, ...]:
    if key not in shapes:
        raise MigcError(f"MagicFusion: '{name}' is not a Stable Diffusion 1.x UNet (it has no '{key}').")
    return tuple(shapes[key])


def check_pair(state_a_shapes: Mapping[str, Sequence[int]], state_b_shapes: Mapping[str, Sequence[int]],
               name_a: str, name_b: str) -> None:
    """Refuse a pair that is not two SD1.x UNets of one kind (UNet keys without prefix).

    SNB mixes the two models' noise in one latent space and feeds A's 768-wide CLIP embeddings to B,
    so the latent channels (input conv) and the context width (attn2 ``to_k``) must match and the
    context must be SD1's. B is built from A's UNet config, so every weight both have must have one
    shape (keys present in one only, e.g. modules another extension added to A, are left to the strict
    ``load_state_dict`` of B).
    """
    pair = f"main model '{name_a}' and model B '{name_b}'"
    conv_a, conv_b = (_key_shape(s, INPUT_CONV_KEY, n) for s, n in ((state_a_shapes, name_a), (state_b_shapes, name_b)))
    if conv_a != conv_b:
        raise MigcError(f"MagicFusion: {pair} have different UNet input layers ({conv_a[1]} vs {conv_b[1]} latent "
                        f"channels, shapes {conv_a} vs {conv_b}); an inpainting/instruct model pairs only with its own kind.")
    ctx_a, ctx_b = (_key_shape(s, ATTN2_TO_K_KEY, n) for s, n in ((state_a_shapes, name_a), (state_b_shapes, name_b)))
    if ctx_a != ctx_b or ctx_a[1] != SD1_CONTEXT_DIM:
        raise MigcError(f"MagicFusion: {pair} must both be Stable Diffusion 1.x (text context width {SD1_CONTEXT_DIM}); "
                        f"got {ctx_a[1]} and {ctx_b[1]} (attn2.to_k shapes {ctx_a} vs {ctx_b}).")
    common = set(state_a_shapes) & set(state_b_shapes)
    differing = sorted(k for k in common if tuple(state_a_shapes[k]) != tuple(state_b_shapes[k]))
    if differing:
        shown = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise MigcError(f"MagicFusion: {pair} have different UNet layouts ({len(differing)} keys differ: {shown}).")
