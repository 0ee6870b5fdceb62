"""AUTOMATIC1111 adapter: text encoding through the WebUI, attn2 hooks, CFG row bookkeeping.

No MIGC math here: the hooks find which rows of each UNet call are cond rows and hand those to
:meth:`MigcSession.shade`; everything else runs the module's own forward.

Why instance-level ``forward`` overrides: A1111 applies its attention optimisations by replacing
``CrossAttention.forward`` on the class; an instance attribute wins over it, so the hooks work under
every optimisation, and the vanilla path calls the class method *at call time*, so an optimisation
re-applied between (or during) generations is honoured.

Which rows are cond: ``CFGDenoiser.forward`` stacks every image's cond rows (one per AND sub-prompt)
first and the uncond rows (one per image) last, then may drop the uncond rows (NGMS / skip early
CFG) or split the rows into several UNet calls (``batch_cond_uncond`` off, or cond and uncond of
different token lengths) — always in row order. The CFG-denoiser callback gives the row counts of
each step; the first hooked layer of every UNet call advances a row cursor, so each layer knows which
rows of ``x_in`` its call holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.patching import ForwardPatches
from ..core.unet_layers import attn2_layers
from .base import HooksBase, companion

# ---------------------------------------------------------------------------------------- rows
@dataclass
class RowCursor:
    """Where the rows of the current UNet call sit in this step's CFG batch (``x_in``)."""

    cond_rows: int | None = None  # rows of x_in that are cond rows (they come first)
    total_rows: int = 0
    rows_per_image: int = 1
    done: int = 0
    start: int = 0

    def new_step(self, cond_rows: int, total_rows: int, images: int) -> None:
        self.cond_rows, self.total_rows, self.done, self.start = cond_rows, total_rows, 0, 0
        self.rows_per_image = max(cond_rows // max(images, 1), 1) if cond_rows % max(images, 1) == 0 else 0

    def new_call(self, rows: int) -> None:
        self.start = self.done
        self.done += rows

    def from_params(self, params: Any) -> None:
        """This step's rows from the CFG-denoiser callback's ``CFGDenoiserParams`` (SDXL: dict conds)."""
        text_cond, uncond = params.text_cond, params.text_uncond
        if isinstance(text_cond, dict):  # SDXL: {"crossattn", "vector"}
            text_cond, uncond = text_cond.get("crossattn"), uncond.get("crossattn") if isinstance(uncond, dict) else uncond
        if not isinstance(text_cond, torch.Tensor):
            self.cond_rows = None
            return
        images = uncond.shape[0] if isinstance(uncond, torch.Tensor) else text_cond.shape[0]
        self.new_step(text_cond.shape[0], params.x.shape[0], images)

    def kinds(self, rows: int) -> list[tuple[bool, int]] | None:
        """Advance to the next model call of ``rows`` rows; (is cond, image index) of each, or None
        when the call is not one of this step's CFG calls."""
        self.new_call(rows)
        count, images = self.cond_part(rows)
        if self.cond_rows is None or self.start + rows > self.total_rows:
            return None
        uncond = [(False, self.start + j - self.cond_rows) for j in range(count, rows)]
        return [(True, image) for image in images] + uncond

    def cond_part(self, rows: int) -> tuple[int, list[int]]:
        """(number of leading cond rows in this call, image index of each). 0 when the call is not one
        of this step's CFG calls (e.g. another extension running the UNet itself)."""
        if self.cond_rows is None or self.start + rows > self.total_rows:
            return 0, []
        count = max(0, min(self.cond_rows - self.start, rows))
        per = self.rows_per_image
        images = [(self.start + j) // per if per else 0 for j in range(count)]
        return count, images


# ---------------------------------------------------------------------------------------- hooks
def unet_of(p: Any) -> nn.Module:
    """The ldm UNetModel of A1111's loaded SD model."""
    return p.sd_model.model.diffusion_model


def decline_reason(p: Any, feature: str = "MIGC") -> str | None:
    """What A1111 adds to the host-neutral checks: hypernetworks and edit models change attn2."""
    if getattr(p.sd_model, "cond_stage_key", None) == "edit":
        return f"{feature} was skipped: instruct-pix2pix (edit) checkpoints are not supported."
    from modules import shared

    if getattr(shared, "loaded_hypernetworks", None):
        return f"{feature} was skipped: a hypernetwork is active, and hypernetworks change cross-attention in a way {feature} does not support."
    return None


def fusion_adapter() -> ModuleType:
    """MagicFusion's hooks on this host; modes reach host code only through the host module they are handed."""
    return companion(__name__, "fusion")


def region_adapter() -> ModuleType:
    """MultiDiffusion's denoiser wrapper on this host."""
    return companion(__name__, "multidiffusion")


class Hooks(HooksBase):
    """The attn2 overrides of one sampling pass; :meth:`remove` restores the UNet exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = RowCursor()
        self.patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self.patches.active

    def install(self, p: Any) -> list[str]:
        """Hook the layers of ``p``'s UNet that this session can change; returns their names."""
        self.remove()
        layers = attn2_layers(unet_of(p))
        names = self.layers_to_hook(layers)
        for index, name in enumerate(names):
            self.patches.install(layers[name], self._forward_for(name, layers[name], first=index == 0))
        return names

    def remove(self) -> None:
        self.patches.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """From the CFG-denoiser callback: this step's index and row layout (``CFGDenoiserParams``)."""
        self.session.set_step(step, total_steps)
        self.rows.from_params(params)

    def _forward_for(self, name: str, attn: nn.Module, first: bool) -> Callable:
        previous = attn.__dict__.get("forward")  # another extension's override, if any
        session, rows = self.session, self.rows

        def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
            def plain(xx: torch.Tensor, cc: torch.Tensor | None) -> torch.Tensor:
                if previous is not None:
                    return previous(xx, context=cc, mask=mask, **kwargs)
                return type(attn).forward(attn, xx, context=cc, mask=mask, **kwargs)

            if not self.is_current():
                self.remove()
                return plain(x, context)
            self.raise_pending_error()
            if first:
                rows.new_call(x.shape[0])
            mode = session.mode_for(name)
            if not session.is_shaded(mode) or context is None or context.shape[0] != x.shape[0]:
                return plain(x, context)
            count, images = rows.cond_part(x.shape[0])
            if count == 0:
                return plain(x, context)
            cond_out = session.shade(name, attn, plain, x[:count], context[:count], images, mode)
            if count == x.shape[0]:
                return cond_out
            rest = plain(x[count:], context[count:])
            return torch.cat([cond_out.to(rest.dtype), rest])

        return self.guarded(forward)
