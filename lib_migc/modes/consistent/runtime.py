"""One Consistent-MIG job: what the host's hooks call during sampling (they hold no math of their own).

* :meth:`ConsistentRun.sampler_input`: the sampler's latent at each model evaluation, before the model
  sees it. It is recorded, then blended in place with the recorded latent of the same evaluation. Blending
  the input of step i+1 is blending the output of step i (the official order), and because the sampler's
  own tensor is changed, the step proceeds from the blended latent whatever the sampler.
* :meth:`ConsistentRun.self_attention_source`: the keys/values source of one up-block self-attention
  call: the current tokens followed by the recorded ones (read before this call's own input is recorded).
* :meth:`ConsistentRun.final_latent`: the sampler's result, blended like every step's output, and the
  record committed: the next generation refers to this one.
"""
from __future__ import annotations

from collections import Counter

import torch

from . import record as records
from .method import blend_latent, shared_keys_source
from .record import Record


class ConsistentRun:
    """``previous``: the record an edit reads (None when this job records afresh); ``current``: the one it
    writes; ``keep``: the preservation map G at latent resolution (None when recording)."""

    def __init__(self, tab: str, current: Record, previous: Record | None = None, keep: torch.Tensor | None = None) -> None:
        self.tab, self.current, self.previous, self.keep = tab, current, previous, keep
        self.evaluations = 0
        self.calls: Counter[str] = Counter()
        self.shared = 0
        self.unshared = 0
        self.committed = False

    @property
    def editing(self) -> bool:
        return self.previous is not None

    def sampler_input(self, x: torch.Tensor) -> None:
        evaluation = self.evaluations
        self.evaluations += 1
        self.current.keep_latent(evaluation, x)
        recorded = self.previous.latents.get(evaluation) if self.previous is not None else None
        if recorded is not None and recorded.shape == x.shape:
            if self.keep.device != x.device:
                self.keep = self.keep.to(x.device)  # once per job, not at every evaluation
            x.copy_(blend_latent(x, recorded, self.keep))

    def self_attention_source(self, layer: str, x: torch.Tensor) -> torch.Tensor | None:
        key = (layer, self.calls[layer])
        self.calls[layer] += 1
        recorded = self.previous.tokens.get(key) if self.previous is not None else None
        self.current.keep_tokens(key, x)
        if self.previous is None:
            return None
        if recorded is None or recorded.shape != x.shape:
            self.unshared += 1
            return None
        self.shared += 1
        return shared_keys_source(x, recorded)

    def final_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Blend the sampler's result (same shape as the recorded one) and commit this job's record."""
        self.current.final = samples.detach().to("cpu", copy=True)
        recorded = self.previous.final if self.previous is not None else None
        if recorded is not None and recorded.shape == samples.shape:
            samples = blend_latent(samples, recorded, self.keep)
        self.commit()
        return samples

    def commit(self) -> None:
        if not self.committed and self.evaluations:
            records.commit(self.tab, self.current)
            self.committed = True
