"""What a mode sees at the step-level hook points each host implements once (``hosts/<host>.py``).

The attn2 processor slot is described in :mod:`lib_migc.core.attention_chain`. Two more, for
Consistent-MIG: the sampler's latent at each model evaluation (:data:`SamplerInputFn`, the same on both
hosts: ``hosts/base.SamplerInputHooks``) and the self-attention (attn1) of chosen layers
(:data:`SelfAttentionFn`, ``hosts/<host>.SelfAttentionHooks``).

* **The denoiser's model call** (:class:`ModelRows`): every call the CFG denoiser makes to the model
  with its rows (cond and uncond, one image each), before the host combines them. A mode that wraps it
  returns the output for exactly these rows and may run the host's model (or another UNet, with the
  host's own input scaling) on any rows it builds: MultiDiffusion turns each row into region rows and
  fuses them back; MagicFusion runs model B beside model A.
* **The CFG blend step** (:class:`CfgRows`): the denoiser's output rows of one step, all calls
  together, before the host's own CFG combine. A mode changes them in place; the host keeps what other
  extensions made of the step (on Forge only the *change* is added to the post-CFG result).

Why these types and not the hosts' own objects: A1111 hands condition dicts and k-diffusion wrappers,
Forge hands compiled conditions and ``cond_or_uncond`` marks; the row bookkeeping (which row is cond,
which image, which step, which space) is done once per host, and a mode is written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

#: ``call(x, levels, contexts, vectors, source_rows)`` -> the host model's output for these rows;
#: ``source_rows`` says which row of the original call each new row stands for (the host gathers every
#: other per-row input, e.g. an inpainting model's concat channels, from it).
ModelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]

#: ``call_unet(unet, x, levels, contexts, vectors, source_rows)``: the same with another UNet in place of
#: the main one (``None``: the main one), the host's input scaling and output conversion unchanged.
UnetCall = Callable[[Optional[nn.Module], torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor],
                    torch.Tensor]


@dataclass
class ModelRows:
    """One call of the CFG denoiser's model.

    ``space``: "k" when ``x`` is k-diffusion's input, ``levels`` are sigmas and the output is the
    denoised prediction; "vp" when ``x`` is the VP latent, ``levels`` are DDPM timesteps and the output
    is ε (A1111's timestep samplers). ``timestep``: the DDPM timestep the UNet sees in this call.
    ``plain()``: the call exactly as the host made it (what it returns without the mode).
    ``has_control``: the rows carry per-row inputs the host cannot gather for new rows (Forge's
    ControlNet hints), so a mode that builds new rows must refuse.
    """

    x: torch.Tensor
    levels: torch.Tensor
    contexts: torch.Tensor
    vectors: torch.Tensor | None
    is_cond: list[bool]
    images: list[int]
    step: int
    space: str
    timestep: float
    plain: Callable[[], torch.Tensor]
    call: ModelCall
    call_unet: UnetCall
    has_control: bool = False


@dataclass
class CfgRows:
    """The denoiser's outputs of one step before the host's CFG combine: ``out`` holds ``images`` cond
    rows then ``images`` uncond rows (one cond row per image), changed in place by the blend.

    ``x``: the model's input rows in the same order; ``sigma``: their sigmas when ``out`` holds denoised
    predictions (k-diffusion, Forge), None when it holds ε (A1111's timestep samplers); ``guidance``:
    the CFG scale of this step, after the host's own changes to it."""

    out: torch.Tensor
    x: torch.Tensor
    sigma: torch.Tensor | None
    images: int
    guidance: float
    step: int


#: A mode's function at the model call: the output for ``rows`` (``rows.plain()`` when it leaves them).
DenoiseFn = Callable[[ModelRows], torch.Tensor]
#: A mode's function at the CFG blend step: changes ``rows.out`` in place; True when it changed anything.
BlendFn = Callable[[CfgRows], bool]

#: Called with the sampler's own latent tensor before each evaluation of the CFG denoiser; may change it
#: in place (the sampler then continues from the changed latent, whatever the sampler).
SamplerInputFn = Callable[[torch.Tensor], None]
#: ``source(layer, x)``: for one self-attention call of ``layer`` with input rows ``x`` (all rows of the
#: UNet call, in the host's order), the tensor its keys and values are computed from, or None for the
#: plain self-attention. Queries always come from ``x``.
SelfAttentionFn = Callable[[str, torch.Tensor], Optional[torch.Tensor]]


class HookGroup:
    """Several hooks of one mode and pass, installed, removed and told the step together."""

    def __init__(self, *parts: object) -> None:
        self.parts = parts

    @property
    def installed(self) -> bool:
        return any(part.installed for part in self.parts)

    def install(self, p: object) -> None:
        for part in self.parts:
            part.install(p)

    def remove(self) -> None:
        for part in self.parts:
            part.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: object) -> None:
        for part in self.parts:
            part.on_cfg_step(step, total_steps, params)
