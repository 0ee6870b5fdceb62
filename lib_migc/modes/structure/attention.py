"""StructureDiffusion's cross-attention (Feng et al., ICLR 2023), as the official code computes it.

The method changes only how the *cond* rows attend to the prompt: each noun phrase is also encoded on
its own, and its token states are pasted into a copy of the full prompt's encoding ``E`` at the
phrase's span (an "aligned" copy ``A_i``; BOS, the other words, EOS and padding stay ``E``'s).

* default mode ("one key, many values"): ``softmax(q K(E)^T) · mean_i V(A_i)`` over ``A_0 = E`` and
  the aligned copies. ``to_v`` has no bias, so this is plain attention with keys from ``E`` and values
  from the average embedding ``Ē`` — built once per prompt, free at every step.
* conjunction ("many keys, one value"), as the official code *runs* it: key sets
  ``[A_all, A_1 .. A_N]`` (its first set aliases ``A_all``, not ``E``), one value ``A_all`` = ``E`` with
  every span pasted in phrase order (inner phrases win on overlap); the softmax maps are averaged.

Positions are 0-based rows of the UNet context (BOS included), so a span ``(s, e)`` over BPE tokens
without BOS in chunk ``c`` is the rows ``77c+1+s .. 77c+1+e``. Everything here is pure torch; hosts
hand in the context rows they already have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_TOKENS = 77
MODES = ("default", "conjunction")


@dataclass(frozen=True)
class Overlay:
    """One phrase's token states and where they go in the prompt's context: rows ``start .. start+len``."""

    start: int
    rows: torch.Tensor  # (L, D): the same for every row of the context; (B, L, D): each row its own
    text: str = ""  # the phrase, for the instance maps' legend

    @property
    def end(self) -> int:
        return self.start + self.rows.shape[-2]


def overlays_from_spans(phrases: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]], chunk: int = 0) -> list[Overlay]:
    """Overlays of phrases encoded alone for BPE spans ``(s, e)`` without BOS: a ``(77, D)`` encoding serves
    every row of the context, a ``(B, 77, D)`` one gives each row (image) its own phrase encoding."""
    out = []
    for encoding, (start, end) in zip(phrases, spans):
        if encoding.dim() not in (2, 3):
            raise ValueError(f"a phrase encoding must be (77, D) or (B, 77, D), got {tuple(encoding.shape)}")
        rows = encoding[..., 1:1 + end - start, :]
        out.append(Overlay(CHUNK_TOKENS * chunk + 1 + start, rows))
    return out


def _fits(overlay: Overlay, full: torch.Tensor) -> bool:
    return overlay.end <= full.shape[1]


def mean_value_context(full: torch.Tensor, overlays: Sequence[Overlay]) -> torch.Tensor:
    """``Ē = mean(E, A_1 .. A_N)``: ``E`` plus 1/(N+1) of each phrase's difference on its span.

    Built in at least float32 (the differences are small) and returned in ``full``'s dtype. Overlays that do not
    fit the context (a different chunk count) are left out, and N counts only the overlays used, so Ē is
    the mean of the value sets that are actually there.
    """
    fitting = [o for o in overlays if _fits(o, full)]
    if not fitting:
        return full
    work = torch.promote_types(full.dtype, torch.float32)
    base = full.to(work)
    mean = base.clone()
    share = 1.0 / (len(fitting) + 1)
    for o in fitting:
        mean[:, o.start:o.end] += share * (o.rows.to(device=full.device, dtype=work) - base[:, o.start:o.end])
    return mean.to(full.dtype)


def aligned(full: torch.Tensor, overlays: Sequence[Overlay]) -> torch.Tensor:
    """``E`` with the overlays pasted in order (a later overlay wins where they overlap)."""
    out = full.clone()
    for o in overlays:
        if _fits(o, full):
            out[:, o.start:o.end] = o.rows.to(device=full.device, dtype=full.dtype)
    return out


def conjunction_sets(full: torch.Tensor, overlays: Sequence[Overlay]) -> tuple[torch.Tensor, torch.Tensor]:
    """(key sets (n, B, L, D) = ``[A_all, A_1 .. A_N]``, value context ``A_all``) as the official code runs."""
    a_all = aligned(full, overlays)
    keys = [a_all] + [aligned(full, [o]) for o in overlays]
    return torch.stack(keys), a_all


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def structured_heads(
    attn: nn.Module, q: torch.Tensor, full: torch.Tensor, overlays: Sequence[Overlay], mode: str, heads: int,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head attention output (B, h, HW, d) of query heads ``q`` against the structured prompt.

    The same result :class:`lib_migc.modes.migc.shading.LayerShader` needs for MIGC's global branch and the plain
    layers need before ``to_out``; softmax runs in SDPA (fp32 accumulation for half inputs).
    ``value``: ``Ē`` already built for ``full`` (default mode), so the layers of one UNet call share it.
    """
    if mode == "conjunction":
        key_sets, value = conjunction_sets(full, overlays)
        n = key_sets.shape[0]
        k = _heads(attn.to_k(key_sets), heads)  # (n, B, h, L, d)
        v = _heads(attn.to_v(value), heads)  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q.expand(n, *q.shape), k, v.expand(n, *v.shape))
        return out.mean(0)
    value = mean_value_context(full, overlays) if value is None else value
    return F.scaled_dot_product_attention(q, _heads(attn.to_k(full), heads), _heads(attn.to_v(value), heads))


def span_shares(attn: nn.Module, q: torch.Tensor, full: torch.Tensor, overlays: Sequence[Overlay],
                content: torch.Tensor) -> torch.Tensor:
    """(B, S, HW): each phrase span's share of the attention that query heads ``q`` (B, h, HW, d) give the
    prompt's words (``content``: (L,) bool, the rows of real tokens; BOS, EOS and padding are left out), averaged
    over heads, with the prompt's own keys. What *Show instance maps* shows for StructureDiffusion."""
    k = _heads(attn.to_k(full), q.shape[1])
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1).mean(1)  # (B, HW, L)
    words = probs[..., content[:probs.shape[-1]]].sum(-1).clamp(min=1e-8)
    spans = torch.stack([probs[..., o.start:o.end].sum(-1) for o in overlays], dim=1)
    return spans / words[:, None]


def structured_forward(attn: nn.Module, x: torch.Tensor, full: torch.Tensor, overlays: Sequence[Overlay], mode: str,
                       value: torch.Tensor | None = None) -> torch.Tensor:
    """The whole attn2 output (after ``to_out``) for cond rows ``x`` whose prompt encoding is ``full``."""
    heads = attn.heads
    q = _heads(attn.to_q(x), heads)
    out = structured_heads(attn, q, full, overlays, mode, heads, value)
    return attn.to_out(out.transpose(1, 2).flatten(-2))


class _Projections(nn.Module):
    """to_q/to_k/to_v/to_out of an ldm ``CrossAttention`` built from its state dict (test seam only)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner, query_dim = weights["to_q.weight"].shape
        context_dim = weights["to_k.weight"].shape[1]
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.load_state_dict(dict(weights))


@torch.no_grad()
def structure_attention(
    x_cond: torch.Tensor,
    full: torch.Tensor,
    phrases: Sequence[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    weights: Mapping[str, torch.Tensor],
    heads: int,
    conjunction: bool = False,
) -> torch.Tensor:
    """The spec's test seam: one structured attn2 call on cond rows (single 77-token chunk).

    ``phrases``: each phrase encoded alone, ``(B, 77, D)`` (row b is image b's encoding) or ``(77, D)`` (the
    same for every row)."""
    attn = _Projections(weights, heads).to(device=x_cond.device, dtype=x_cond.dtype)
    overlays = overlays_from_spans(list(phrases), spans)
    return structured_forward(attn, x_cond, full, overlays, "conjunction" if conjunction else "default")
