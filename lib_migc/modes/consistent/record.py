"""What Consistent-MIG remembers of the last generation of a tab, and the rules for reading it back.

One record per tab (txt2img), held in host memory: the sampler's latent at every model evaluation (in
the sampler's dtype: an edit that changes nothing must reproduce the recorded image bit for bit, and a
512² latent is 64 KB), the final latent, and the input of every up-block self-attention call in fp16
(the bulk: about 27 MB per step at 512²). The tokens are capped (setting *Consistent-MIG record
limit*): past the cap the oldest calls are dropped, and those steps of the next edit run without
sharing. A record is read by the next generation and replaced by it only when that generation's
sampling ends, so an interrupted edit leaves the previous record in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .method import Instance


@dataclass(frozen=True)
class Fingerprint:
    """What must be equal for an edit to line up with the record (else the job records afresh)."""

    seed: int
    subseed: int
    subseed_strength: float
    width: int
    height: int
    sampler: str
    scheduler: str
    steps: int
    checkpoint: str

    @classmethod
    def of(cls, p: Any) -> "Fingerprint":
        model = getattr(p, "sd_model", None)
        info = getattr(model, "sd_checkpoint_info", None)
        checkpoint = (getattr(info, "shorthash", None) or getattr(p, "sd_model_hash", None)
                      or getattr(model, "sd_model_hash", None) or getattr(info, "title", None) or "")
        # ``process`` runs before the WebUI sets the batch's ``seeds``: the job's ``all_seeds`` are set by then.
        seeds = list(getattr(p, "all_seeds", None) or getattr(p, "seeds", None) or [0])
        subseeds = list(getattr(p, "all_subseeds", None) or getattr(p, "subseeds", None) or [0])
        strength = float(getattr(p, "subseed_strength", 0.0) or 0.0)
        subseed = int(subseeds[0]) if strength > 0 else 0  # the WebUI draws a new one per job; unused at strength 0
        return cls(int(seeds[0]), subseed, strength, int(p.width), int(p.height),
                   str(getattr(p, "sampler_name", "") or ""), str(getattr(p, "scheduler", "") or ""), int(getattr(p, "steps", 0) or 0),
                   str(checkpoint))

    def differences(self, recorded: "Fingerprint") -> list[str]:
        """'seed 1 → 2' for each field that differs from the recorded one."""
        out = []
        for f in fields(self):
            old, new = getattr(recorded, f.name), getattr(self, f.name)
            if old != new:
                out.append(f"{f.name} {old} → {new}")
        return out


@dataclass
class Record:
    fingerprint: Fingerprint
    instances: frozenset[Instance]
    cap_bytes: int
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # model evaluation -> sampler latent (pre-blend)
    final: torch.Tensor | None = None
    tokens: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (layer, its n-th call) -> attn1 input
    tokens_bytes: int = 0
    dropped: int = 0  # self-attention calls dropped by the cap

    def keep_latent(self, evaluation: int, x: torch.Tensor) -> None:
        self.latents[evaluation] = x.detach().to("cpu", copy=True)

    def keep_tokens(self, key: tuple[str, int], x: torch.Tensor) -> None:
        """Store one self-attention input in fp16 on the CPU; past the cap, drop the oldest calls."""
        kept = x.detach().to("cpu", torch.float16)
        self.tokens[key] = kept
        self.tokens_bytes += kept.numel() * kept.element_size()
        while self.tokens_bytes > self.cap_bytes and self.tokens:
            oldest = next(iter(self.tokens))  # dicts keep insertion order: the earliest call
            dropped = self.tokens.pop(oldest)
            self.tokens_bytes -= dropped.numel() * dropped.element_size()
            self.dropped += 1

    def size_bytes(self) -> int:
        latents = sum(t.numel() * t.element_size() for t in self.latents.values())
        final = self.final.numel() * self.final.element_size() if self.final is not None else 0
        return self.tokens_bytes + latents + final


_records: dict[str, Record] = {}


def recorded(tab: str) -> Record | None:
    return _records.get(tab)


def commit(tab: str, record: Record) -> None:
    _records[tab] = record


def forget(tab: str | None = None) -> bool:
    """Drop the record of ``tab`` (None: of every tab); True when there was one."""
    if tab is None:
        had = bool(_records)
        _records.clear()
        return had
    return _records.pop(tab, None) is not None
