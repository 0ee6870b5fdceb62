"""MagicFusion's part of a WebUI job: decline or describe it, load model B, hook the hosts' model call and
CFG blend step, and free model B whenever a job does not need it.

Kept apart from :mod:`lib_migc.job` so the mode is one module: ``job`` calls these at the same points
as its own steps (process, before each sampling pass, the CFG callbacks, cleanup). Failures become
the session's pending error, raised by the first hooked UNet call like MIGC's own.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

from ...core.errors import MigcError
from ...params import MigcParams, has_and_subprompts
from ..base import Mode
from .model_b import load_model_b, model_b_info
from .params import SAME
from .runtime import MODEL_B, FusionRuntime

log = logging.getLogger("migc")


def decline_reason(p: Any, host: Any) -> str | None:
    """MagicFusion blends two SD1.x ε-prediction UNets; anything else is told under the image."""
    model = p.sd_model
    if not getattr(model, "is_sd1", False):
        return ("MagicFusion was skipped: it pairs two SD1.x checkpoints (same latent space and text context), and the "
                "loaded model is not SD1.x.")
    if getattr(host, "empty_unet_like", None) is None:
        return "MagicFusion was skipped: this WebUI is not supported."
    return None


def check_job(p: Any, params: Any) -> None:
    """What must hold before sampling (raised as the job's error): no AND, and 'same' only alone."""
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")]
    if any(has_and_subprompts(text) for text in prompts):
        raise MigcError("MagicFusion does not support AND sub-prompts (its saliency needs one cond row per image); "
                        "remove AND from the prompt or turn MagicFusion off.")
    if params.magicfusion.model_b == SAME and (params.enabled or params.structure.enabled):
        raise MigcError("MagicFusion with model B \"same\" re-runs the loaded UNet, which MIGC/StructureDiffusion are "
                        "hooked into; use it alone, or pick a second checkpoint.")


def model_b_hash(p: Any, host: Any, title: str) -> str | None:
    """The short hash recorded in the infotext ('same': none)."""
    if title == SAME:
        return None
    return model_b_info(title)[1]


def free_model_b() -> None:
    """Free model B's UNet (about 1.7 GB in fp16). :mod:`lib_migc.job` calls it for every job that does not
    run MagicFusion — the panel off included — and when the main model changes."""
    MODEL_B.clear()


def install(job: Any, hr_pass: bool) -> Any:
    """Load model B and encode prompt B for this pass, then hook the host's model call and CFG blend step;
    returns the hooks."""
    from modules import devices

    p, params = job.p, job.params.magicfusion
    unet_b = None
    if params.model_b != SAME:
        unet_b, _, _ = load_model_b(p, job.host, params.model_b)
    prompt_b = None
    if params.prompt_b:
        with devices.autocast():
            cond = p.sd_model.get_learned_conditioning([params.prompt_b])
        prompt_b = (cond["crossattn"] if isinstance(cond, dict) else cond)[0].detach()
    runtime = FusionRuntime(params, unet_b, prompt_b, maps=job.maps_for(MagicFusionMode.name))
    if runtime.maps is not None:
        runtime.maps.labels = [f"model B ({params.model_b})" + (f": {params.prompt_b[:40]}" if params.prompt_b else "")]
        runtime.maps.source = "Shares: the part of the fused steps in which model B won the pixel (the rest: model A)"
    hooks = job.host.StepHooks("MagicFusion", denoise=runtime.denoise_rows, blend=runtime.blend,
                               modules=() if unet_b is None else (unet_b,), runtime=runtime,
                               is_current=lambda: job.is_current(hooks))
    hooks.install(p)
    return hooks


class MagicFusionMode(Mode):
    """A second SD1.x checkpoint's predictions blended in by saliency, beside the other modes or alone."""

    name, title = "magicfusion", "MagicFusion"
    draws_maps = True

    def asked(self, params: MigcParams) -> bool:
        return params.magicfusion.enabled

    def turned_off(self, params: MigcParams) -> MigcParams:
        return replace(params, magicfusion=replace(params.magicfusion, enabled=False))

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        return decline_reason(p, host)

    def start(self, job: Any) -> None:
        check_job(job.p, job.params)
        job.infotext["model_b_hash"] = model_b_hash(job.p, job.host, job.params.magicfusion.model_b)

    def release_unused(self, params: MigcParams | None) -> None:
        if params is None or not params.magicfusion.enabled:
            free_model_b()

    def on_model_loaded(self, sd_model: Any) -> None:
        free_model_b()

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        return not hr_pass or params.magicfusion.hires

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> Any:
        if not self.runs_in_pass(job.params, hr_pass):
            return None
        return install(job, hr_pass)
