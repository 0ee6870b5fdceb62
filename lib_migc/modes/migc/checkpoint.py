"""Loading MIGC weights safely and strictly.

The official ``MIGC_SD14.ckpt`` is a torch pickle ``{"state_dict": {...}}`` whose keys name positions in
the CompVis UNet and contain the token ``migc``; the sub-key of a layer's block is everything after that
token. Community conversions use diffusers block names instead. Keys are parsed by their tokens (block
kind, block index, ``migc``), never by a fixed prefix. A pickle is read by :mod:`lib_migc.core.safe_pickle`
(an allow-list unpickler of our own, whatever the host's torch), never by ``torch.load``, unless the
user explicitly converts a file with ``--trust``.

Every problem found (missing, unexpected or wrongly shaped keys) is reported together in one
:class:`CheckpointError`, so a user sees at once what is wrong with a file.
"""
from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ...core import safe_pickle
from ...core.errors import CheckpointError
from ...core.unet_layers import layer_sort_key
from .modules import BlockType, block_class, expected_state_shapes
from .weight_files import SAFE_SUFFIXES

KIND_MIGC = "migc"
KIND_MIGC_PLUS = "migc++"
MARKER = "migc"
MAX_LISTED = 12


@dataclass
class MigcWeights:
    """Loaded MIGC or MIGC++ blocks keyed by UNet layer name (``middle_block.1``, ``output_blocks.3.1``, ...)."""

    kind: str
    blocks: dict[str, BlockType]
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return sorted(self.blocks, key=layer_sort_key)

    @property
    def plus(self) -> bool:
        return self.kind == KIND_MIGC_PLUS

    @property
    def label(self) -> str:
        """What the infotext and messages call it: "MIGC" or "MIGC++"."""
        return "MIGC++" if self.plus else "MIGC"


# ------------------------------------------------------------------------------------ reading files
def _trusted_torch_load():
    """torch's own full loader, only for the convert CLI's ``--trust``. A1111 replaces ``torch.load``
    with a checker (modules.safe) that rejects files written by current torch; its original is kept."""
    safe = sys.modules.get("modules.safe")
    return getattr(safe, "unsafe_torch_load", None) or torch.load


def read_pickle(path: str, what: str, hint: str) -> object:
    """The object a torch pickle holds, through the allow-list unpickler; refusals and damage become
    :class:`CheckpointError` naming ``what`` (e.g. "MIGC weights 'x.ckpt'") and ending with ``hint``."""
    try:
        return safe_pickle.load(path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{what} contain Python objects other than tensors, which are not loaded for safety "
                              f"({str(exc).splitlines()[0][:200]}). {hint}") from None
    except zipfile.BadZipFile:
        raise CheckpointError(f"{what} could not be read (truncated or corrupt?): not a torch zip checkpoint "
                              f"(torch before 1.6 wrote another format). {hint}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{what} could not be read (truncated or corrupt?): {str(exc)[:300]}") from None


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch pickle file, unwrapping a ``state_dict`` entry.

    Pickles go through :func:`read_pickle` (never ``torch.load``); ``trust_pickle`` (only for the
    explicit convert CLI) allows torch's full unpickle of a file the user vouches for.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"MIGC weights file not found: {path}", status_code=404)
    name = os.path.basename(path)
    if path.lower().endswith(SAFE_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"MIGC weights '{name}' could not be read as safetensors (truncated or corrupt?): {exc}") from None
    if trust_pickle:
        data = _trusted_torch_load()(path, map_location="cpu", weights_only=False)
    else:
        data = read_pickle(path, f"MIGC weights '{name}'",
                           f"If you trust this file, convert it once with 'python -m lib_migc.convert --trust \"{path}\" "
                           "OUT.safetensors' and select the .safetensors file.")
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"MIGC weights '{name}' hold a {type(data).__name__}, not a dict of tensors.")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k, v in data.items() if not isinstance(v, torch.Tensor))
    if others:
        raise CheckpointError(f"MIGC weights '{name}': entries that are not tensors: {_listing(others)}")
    return tensors


# ------------------------------------------------------------------------------------ key parsing
def layer_of_key(key: str) -> tuple[str | None, str | None]:
    """(UNet layer name, block sub-key) of a checkpoint key, or (None, None) when it names no MIGC layer.

    CompVis names: ``[model.diffusion_model.]output_blocks.3.1.transformer_blocks.0.attn2.migc.<sub>``.
    Diffusers names: ``up_blocks.1.attentions.0.transformer_blocks.0.attn2[.processor].migc.<sub>``.
    """
    tokens = key.split(".")
    if MARKER not in tokens:
        return None, None
    at = tokens.index(MARKER)
    head, sub = tokens[:at], ".".join(tokens[at + 1:])
    if not sub:
        return None, None
    if "transformer_blocks" in head:
        t = head.index("transformer_blocks")
        if t + 1 >= len(head) or head[t + 1] != "0":
            return None, None  # SD1.x spatial transformers have exactly one transformer block
    return _layer_from_tokens(head), sub


def _int(tokens: list[str], i: int) -> int | None:
    return int(tokens[i]) if i < len(tokens) and tokens[i].isdigit() else None


def _layer_from_tokens(head: list[str]) -> str | None:
    for kind in ("input_blocks", "output_blocks", "middle_block"):
        if kind in head:
            j = head.index(kind)
            if kind == "middle_block":
                return "middle_block.1"
            index = _int(head, j + 1)
            if index is None:
                return None
            sub = _int(head, j + 2)
            return f"{kind}.{index}.{1 if sub is None else sub}"
    if "mid_block" in head:
        return "middle_block.1"
    for kind, offset in (("up_blocks", 0), ("down_blocks", 1)):
        if kind in head:
            j = head.index(kind)
            block, attention = _int(head, j + 1), _int(head, j + 3)
            if block is None or attention is None or head[j + 2] != "attentions":
                return None
            target = "output_blocks" if kind == "up_blocks" else "input_blocks"
            return f"{target}.{3 * block + attention + offset}.1"
    return None


def group_by_layer(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split a flat state dict into per-layer block state dicts; also return the keys that fit no layer."""
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    stray = []
    for key, tensor in state.items():
        layer, sub = layer_of_key(key)
        if layer is None:
            stray.append(key)
        else:
            layers[layer][sub] = tensor
    return dict(layers), stray


def detect_kind(layers: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """MIGC blocks have ``sac.conv1``; MIGC++ blocks have ``gamma`` and no ``conv1`` (see migcplus spec)."""
    subkeys = {k for sub in layers.values() for k in sub}
    if "gamma" in subkeys or ("sac.conv2.weight" in subkeys and "sac.conv1.weight" not in subkeys):
        return KIND_MIGC_PLUS
    return KIND_MIGC


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _channels(sub: Mapping[str, torch.Tensor]) -> int | None:
    for key, dim in (("norm.bias", 0), ("norm.weight", 0), ("ea.to_q.weight", 0), ("sac.conv1.bias", 0)):
        if key in sub and sub[key].ndim >= 1:
            return int(sub[key].shape[dim])
    return None


def validate_layers(
    layers: Mapping[str, Mapping[str, torch.Tensor]], stray: list[str], name: str, plus: bool = False
) -> dict[str, int]:
    """Check every layer's sub-keys and shapes strictly; return layer -> channels or raise one error."""
    problems: list[str] = []
    channels: dict[str, int] = {}
    if stray:
        problems.append(f"unexpected keys (no 'migc' token or no known UNet layer): {_listing(sorted(stray))}")
    if not layers and not stray:
        problems.append("no tensors at all")
    for layer in sorted(layers, key=layer_sort_key):
        sub = layers[layer]
        c = _channels(sub)
        if c is None:
            problems.append(f"{layer}: cannot tell the channel count (norm.bias missing)")
            continue
        expected = expected_state_shapes(c, plus)
        missing = sorted(set(expected) - set(sub))
        unexpected = sorted(set(sub) - set(expected))
        shaped = [
            f"{k} {tuple(sub[k].shape)} (expected {expected[k]})"
            for k in sorted(set(sub) & set(expected))
            if tuple(sub[k].shape) != expected[k] or not sub[k].is_floating_point()
        ]
        if missing:
            problems.append(f"{layer}: missing {len(missing)} key(s): {_listing(['migc.' + k for k in missing])}")
        if unexpected:
            problems.append(f"{layer}: unexpected key(s): {_listing(['migc.' + k for k in unexpected])}")
        if shaped:
            problems.append(f"{layer}: wrong shape or dtype: {_listing(shaped)}")
        channels[layer] = c
    if problems:
        reference = "MIGC++_SD14.ckpt, 26 keys per layer" if plus else "MIGC_SD14.ckpt, 32 keys per layer"
        raise CheckpointError(
            f"'{name}' is not a valid {'MIGC++' if plus else 'MIGC'} checkpoint (expected the layout of the official "
            f"{reference}):\n- " + "\n- ".join(problems)
        )
    return channels


# ------------------------------------------------------------------------------------ building blocks
def check_state(
    state: Mapping[str, torch.Tensor], name: str
) -> tuple[str, dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Group a flat state dict by layer, tell MIGC from MIGC++ and validate it strictly against that kind:
    (kind, layer -> block state, layer -> channels). Which layers carry blocks is read from the keys."""
    layers, stray = group_by_layer(state)
    kind = detect_kind(layers)
    return kind, layers, validate_layers(layers, stray, name, plus=kind == KIND_MIGC_PLUS)


def blocks_from_state(
    state: Mapping[str, torch.Tensor],
    name: str = "weights",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MigcWeights:
    """Validate a flat state dict and build the MIGC or MIGC++ blocks on ``device``/``dtype``."""
    kind, layers, channels = check_state(state, name)
    blocks = {}
    for layer, sub in layers.items():
        block = block_class(kind == KIND_MIGC_PLUS)(channels[layer])
        block.load_state_dict(dict(sub), strict=True)
        blocks[layer] = block.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return MigcWeights(kind=kind, blocks=blocks, source=name)


def load_migc_weights(
    path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MigcWeights:
    """Read, validate and build the MIGC blocks of a ``.ckpt``/``.safetensors`` file, never unpickling code."""
    weights = blocks_from_state(read_state_dict(path), os.path.basename(path), device, dtype)
    weights.source = path
    return weights
