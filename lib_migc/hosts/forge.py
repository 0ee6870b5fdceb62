"""WebUI Forge adapter: MIGC through the UnetPatcher's attn2 patches, the Forge way.

``install`` clones ``p.sd_model.forge_objects.unet``, registers three patches and sets the clone back:
nothing global is patched, and Forge restores its objects for the next job, so there is nothing to undo.

Why three patches: Forge's attn2 *replacement* gets q/k/v already projected and must return the
result before ``to_out``, while MIGC mixes outputs after ``to_out`` and needs the attn2 input itself
(the Layout Attention and the Enhancement Attention read it). So

* ``attn2_patch`` (before attn2) keeps the normed input and context of a layer that is not vanilla
  at this step;
* ``attn2_replace`` on the hooked layers computes the attention of the uncond rows only, with Forge's
  own attention function (cond rows are left empty instead of computed and thrown away); at vanilla
  steps it is exactly Forge's attention for every row. When another extension (IP-Adapter, another
  regional extension) already replaced that layer's attention, its replacement is called instead, for
  all rows with the options it expects; only the cond rows MIGC shades are then overwritten;
* ``attn2_output_patch`` (after ``to_out``) puts the cond rows computed by the shared
  :meth:`MigcSession.shade` in place.

Which rows are cond comes from Forge itself (``cond_indices`` in the transformer options; Forge puts
uncond rows first); the step comes from the CFG-denoiser callback like on A1111. Patches are plain
functions holding the hooks weakly, not bound methods: a later ``clone()`` deep-copies the model options,
and Forge keeps sampled clones after the job.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.unet_layers import attn2_layers, layer_name, split_layer_name
from ..modes.migc.shading import ShadingMode
from .base import HooksBase, companion, weak_patch


def unet_of(p: Any) -> nn.Module:
    """Forge's UNet module (IntegratedUNet2DConditionModel) behind the job's UnetPatcher."""
    return p.sd_model.forge_objects.unet.model.diffusion_model


def decline_reason(p: Any, feature: str = "MIGC") -> str | None:
    return None

def fusion_adapter() -> ModuleType:
    """MagicFusion's hooks on this host; modes reach host code only through the host module they are handed."""
    return companion(__name__, "fusion")


def region_adapter() -> ModuleType:
    """MultiDiffusion's denoiser wrapper on this host."""
    return companion(__name__, "multidiffusion")


def block_key(layer: str) -> tuple[str, int, int]:
    """Our layer name -> Forge's transformer block key: ``output_blocks.3.1.4`` -> ("output", 3, 4)."""
    base, transformer_index = split_layer_name(layer)
    kind, index = base.split(".")[:2]
    names = {"input_blocks": ("input", int(index)), "middle_block": ("middle", 0), "output_blocks": ("output", int(index))}
    return (*names[kind], transformer_index)


def layer_of(extra_options: dict) -> str | None:
    """Forge's ``extra_options`` (``block`` and ``block_index``) -> our layer name."""
    block = extra_options.get("block")
    if not block:
        return None
    kind, index = block[0], int(block[1])
    base = {"input": f"input_blocks.{index}.1", "middle": "middle_block.1", "output": f"output_blocks.{index}.1"}.get(kind)
    return None if base is None else layer_name(base, int(extra_options.get("block_index", 0) or 0))


def _forge_attention() -> Callable:
    """Forge's own attention function (bit-identical vanilla rows); plain SDPA outside Forge."""
    try:
        from backend.attention import attention_function

        return attention_function
    except ImportError:
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any = None) -> torch.Tensor:
            split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(-2)

        return sdpa


def existing_attn2_replace(model_options: dict, key: tuple[str, int, int]) -> Callable | None:
    """The attn2 replacement another extension registered for this transformer block, found the way
    Forge's transformer block looks it up (``(block, number, index)`` first, then ``(block, number)``)."""
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(key) or replaces.get(key[:2])


class Hooks(HooksBase):
    """The patches of one sampling pass; ``remove`` makes them inert (Forge drops the clone itself).

    The patches reach these hooks through a weak reference (:func:`~.base.weak_patch`): Forge keeps
    sampled clones, and with them their patches, long after the job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layers: dict[str, nn.Module] = {}
        self.images = 1
        self._active = False
        self._attention = _forge_attention()
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor, ShadingMode]] = {}

    @property
    def installed(self) -> bool:
        return self._active

    def live(self) -> bool:
        if not self._active or not self.is_current():
            self._stash.clear()
            return False
        return True

    def install(self, p: Any) -> list[str]:
        patcher = p.sd_model.forge_objects.unet
        self.images = max(len(getattr(p, "seeds", [])), 1)
        all_layers = attn2_layers(patcher.model.diffusion_model)
        names = self.layers_to_hook(all_layers)
        self.layers = {name: all_layers[name] for name in names}
        clone = patcher.clone()
        clone.set_model_attn2_patch(weak_patch(self, Hooks._before, lambda n, context, value, extra_options: (n, context, value)))
        for name in names:
            key = block_key(name)
            clone.set_model_attn2_replace(self._replace_for(existing_attn2_replace(clone.model_options, key)), *key)
        clone.set_model_attn2_output_patch(weak_patch(self, Hooks._after, lambda n, extra_options: n))
        p.sd_model.forge_objects.unet = clone
        self._active = True
        return names

    def remove(self) -> None:
        self._active = False
        self._stash.clear()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        self.session.set_step(step, total_steps)

    def _before(self, n: torch.Tensor, context: torch.Tensor, value: Any, extra_options: dict) -> tuple:
        """attn2_patch: keep the normed input and context of a layer MIGC shades at this step."""
        self.raise_pending_error()
        layer = layer_of(extra_options)
        if layer in self.layers:
            mode = self.session.mode_for(layer)
            if self.session.is_shaded(mode) and extra_options.get("cond_indices"):
                self._stash[layer] = (n, context, mode)
        return n, context, value

    def _replace_for(self, previous: Callable | None) -> Callable:
        """Our attn2 replacement of one layer, chaining ``previous`` (another extension's replacement of
        that layer) for every row and step MIGC does not shade; it sees the rows and options it expects,
        and the cond rows MIGC shades are overwritten after ``to_out``."""
        attention = self._attention

        def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            if previous is not None:
                return previous(q, k, v, extra_options)
            return attention(q, k, v, extra_options["n_heads"])

        def replace(hooks: Hooks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            if previous is not None or layer_of(extra_options) not in hooks._stash:
                return plain(q, k, v, extra_options)
            uncond = extra_options.get("uncond_indices") or []
            out = q.new_zeros(q.shape)  # cond rows are shaded after to_out: not computed here to be thrown away
            if uncond:
                out[uncond] = attention(q[uncond], k[uncond], v[uncond], extra_options["n_heads"])
            return out

        return weak_patch(self, replace, plain)

    def _after(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """attn2_output_patch: put the cond rows shaded by :meth:`MigcSession.shade` in place."""
        layer = layer_of(extra_options)
        kept = self._stash.pop(layer, None) if layer is not None else None
        if kept is None:
            return n
        x, context, mode = kept
        cond = list(extra_options["cond_indices"])
        attn = self.layers[layer]
        images = [j % self.images for j in range(len(cond))]
        plain = lambda xx, cc: attn(xx, context=cc)  # noqa: E731
        shaded = self.session.shade(layer, attn, plain, x[cond], context[cond], images, mode)
        n = n.clone()
        n[cond] = shaded.to(n.dtype)
        return n
