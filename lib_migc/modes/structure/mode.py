"""StructureDiffusion as a mode of the job: it runs beside MIGC or alone, on one-encoder models."""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

from ...core.instance_maps import COARSE_LAYERS
from ...params import MigcParams
from ..base import Mode
from .method import TextEngine, build_runtime, skipped_message

log = logging.getLogger("migc")


class StructureMode(Mode):
    """Noun-phrase encodings mixed into the cross-attention values of every attn2 (SD1.x, SD2.x)."""

    name, title = "structure", "StructureDiffusion"
    draws_maps = True

    def asked(self, params: MigcParams) -> bool:
        return params.structure.enabled

    def turned_off(self, params: MigcParams) -> MigcParams:
        return replace(params, structure=replace(params.structure, enabled=False))

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        model = p.sd_model
        if not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)):
            return ("StructureDiffusion was skipped: it supports SD1.x and SD2.x checkpoints (one CLIP text encoder); "
                    "this model has another text conditioning, so the image was generated without it.")
        return host.decline_reason(p, "StructureDiffusion")

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        return not hr_pass or params.hires

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> None:
        """Spans and phrase encodings for this pass, on the job's attention session (the attention hooks
        every job installs apply them); skipped phrases are told under the image."""
        from modules import devices

        p, session = job.p, job.session
        session.structure = None
        if not self.runs_in_pass(job.params, hr_pass):
            return None
        steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if hr_pass else int(getattr(p, "steps", 20))
        engine = job.state.get(self.name)
        if engine is None:
            engine = job.state[self.name] = TextEngine(p.sd_model)  # phrase encodings cached for the job
        with devices.autocast():
            runtime = build_runtime(engine, job.params.structure, pass_prompts(p, hr_pass), job.params.layout.descriptions, steps)
        message = skipped_message(runtime.skipped)
        if message:
            p.comment(message)
            log.warning("%s", message)
        if not runtime.phrase_count:
            p.comment("StructureDiffusion found none of its phrases in the prompt, so it changed nothing.")
        runtime.maps = maps = job.maps_for(self.name)
        if maps is not None:
            maps.labels = runtime.labels()
            maps.source = f"Shares: each phrase span's part of the attention on the prompt's words, on {COARSE_LAYERS}"
        session.structure = runtime
        return None


def pass_prompts(p: Any, hr_pass: bool) -> list[str]:
    """The prompts of the images in this sampling pass (A1111 sets ``p.prompts`` per batch)."""
    prompts = getattr(p, "hr_prompts" if hr_pass else "prompts", None)
    if not prompts:
        prompts = (getattr(p, "all_hr_prompts" if hr_pass else "all_prompts", None) or [""])[:max(len(p.seeds), 1)]
    return list(prompts)
