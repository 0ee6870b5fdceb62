"""Consistent-MIG as a mode of the job: who may use it, record or edit, and the hooks of its pass."""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

from ...core import settings
from ...core.hook_points import HookGroup
from ...params import MigcParams
from ..base import Mode
from ..migc.params import MODE_MIGC
from . import record as records
from .method import changed_instances, instance_set, preservation_map
from .params import EDITED, RECORDED, RESET, TAB
from .record import Fingerprint, Record
from .runtime import ConsistentRun

log = logging.getLogger("migc")

TITLE = "Keep unchanged instances"


def interrupted() -> bool:
    """Whether the user stopped or skipped the job (the sampler then returns early)."""
    try:
        from modules import shared
    except ImportError:
        return False
    state = getattr(shared, "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "skipped", False))


def is_up_block(layer: str) -> bool:
    """The self-attention layers that share their keys and values: those of the UNet's up blocks."""
    return layer.startswith("output_blocks.")


class ConsistentMode(Mode):
    """``consistent: true``: the first image records, later ones with the same seed, size, sampler, steps
    and checkpoint edit it (only the changed instances' boxes are regenerated)."""

    name, title = "consistent", TITLE

    def asked(self, params: MigcParams) -> bool:
        return params.enabled and bool(params.consistent) and len(params.layout) > 0

    def turned_off(self, params: MigcParams) -> MigcParams:
        return replace(params, consistent=False)

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        if params.mode != MODE_MIGC:
            return f"{TITLE} works in the migc mode only (MIGC or MIGC++ weights); this image was generated without it."
        if getattr(p, "init_images", None) is not None:
            return f"{TITLE} works in txt2img only; this image was generated without it."
        images = int(getattr(p, "n_iter", 1) or 1) * int(getattr(p, "batch_size", 1) or 1)
        if images > 1:
            return (f"{TITLE} edits one image at a time (batch count and batch size 1; this job makes {images}); "
                    "the images were generated without it.")
        return None

    def start(self, job: Any) -> None:
        p, params = job.p, job.params
        if params.consistent == RESET:
            records.forget(TAB)
        fingerprint = Fingerprint.of(p)
        instances = instance_set(params.layout.boxes, params.layout.descriptions)
        cap = int(float(settings.option("migc_consistent_max_mb")) * 2**20)
        current = Record(fingerprint, instances, cap)
        previous = records.recorded(TAB)
        if previous is not None and previous.fingerprint != fingerprint:
            p.comment(f"{TITLE}: {', '.join(fingerprint.differences(previous.fingerprint))} since the recorded image, so "
                      "this image was recorded afresh instead of edited (an edit needs the same seed, size, sampler, "
                      "steps and checkpoint).")
            previous = None
        if previous is None:
            job.state[self.name] = ConsistentRun(TAB, current)
            job.infotext["consistent"] = RECORDED
            return
        changed = changed_instances(previous.instances, instances)
        keep = preservation_map(changed, p.width, p.height)
        job.state[self.name] = ConsistentRun(TAB, current, previous, keep)
        job.infotext["consistent"] = EDITED
        p.comment(f"{TITLE}: edited the previous image; {len(changed)} changed instance box(es) regenerated, "
                  "the rest kept.")

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        return not hr_pass

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> Any:
        """The first pass only: the hires-fix pass upscales the edited image as it would any other."""
        run: ConsistentRun | None = job.state.get(self.name)
        if hr_pass or run is None:
            return None
        hooks = HookGroup()
        current = lambda: job.is_current(hooks)  # noqa: E731
        hooks.parts = (job.host.SamplerInputHooks(run.sampler_input, current),
                       job.host.SelfAttentionHooks(run.self_attention_source, is_up_block, current))
        hooks.install(job.p)
        return hooks

    def post_sample(self, job: Any, samples: Any) -> Any:
        run: ConsistentRun | None = job.state.get(self.name)
        if run is None or not run.evaluations or interrupted():
            return samples  # an interrupted job's record would be partial: the previous one stays
        if getattr(job.p, "enable_hr", False):
            run.commit()  # these are the hires pass's samples: the first pass's result is not blended again
        else:
            samples = run.final_latent(samples)
        if run.editing and run.unshared:
            job.p.comment(f"{TITLE}: {run.unshared} of {run.unshared + run.shared} self-attention calls ran without "
                          "the recorded image's tokens (the record limit in Settings → MIGC dropped the earliest steps).")
        if run.current.dropped:
            log.info("%s: the record keeps %d of %d self-attention calls (limit %d MiB)", TITLE, len(run.current.tokens),
                     len(run.current.tokens) + run.current.dropped, run.current.cap_bytes // 2**20)
        return samples

    def release_unused(self, params: MigcParams | None) -> None:
        """The record (about 1.4 GB of host memory at 512², 50 steps) is kept only while the option is on."""
        if params is None or not params.consistent:
            records.forget()

    def on_model_loaded(self, sd_model: Any) -> None:
        records.forget()
