"""One MIGC job in the WebUI: what the Script's callbacks ask for, for either host.

The Script stays free of logic: it forwards ``before_process`` / ``process`` /
``process_before_every_sampling`` / ``postprocess_batch`` / ``postprocess`` and the CFG-denoiser
callback here; the host module (``hosts.a1111`` or ``hosts.forge``) only installs its hooks.
Exceptions raised in Script callbacks are swallowed by the WebUI, so errors found before sampling are
kept on the session and raised by the first hooked attention call, which stops the job with the message
in the UI and a 4xx answer over the API; the hooks are removed first. A job's hooks are removed after
each batch, after the job, and at the start of the next job in case a failed job never reached its
own cleanup; hooks left from a job that is no longer current step aside by themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch

from . import settings, weights_store
from .draw import draw_layout
from .errors import MigcError
from .params import INFOTEXT_KEY, UI_FIELDS, MigcParams, with_descriptions_appended
from .session import MigcSession
from .shading import InstanceConditioning
from .structure import build_runtime, skipped_message
from .text_encoding import encode_phrases

log = logging.getLogger("migc")


@dataclass
class Job:
    p: Any
    params: MigcParams
    host: ModuleType
    error: Exception | None = None
    session: MigcSession | None = None
    hooks: Any = None


_active: Job | None = None


def active_job() -> Job | None:
    return _active


def _finish() -> None:
    global _active
    if _active is not None and _active.hooks is not None:
        _active.hooks.remove()
    _active = None


def before_process(p: Any) -> None:
    """Every job, MIGC or not: drop whatever a previous job may have left installed."""
    _finish()


def decline_reason(p: Any, host: ModuleType) -> str | None:
    """Why MIGC cannot run on this job's model, as a message for the user; None when it can."""
    model = p.sd_model
    if not getattr(model, "is_sd1", False):
        family = "an SDXL" if getattr(model, "is_sdxl", False) else "an SD2.x" if getattr(model, "is_sd2", False) else "a non-SD1.x"
        hint = " StructureDiffusion (below MIGC in the panel) works without MIGC on SD1.x and SD2.x." if family != "an SDXL" else ""
        return (f"MIGC was skipped: it needs an SD1.x checkpoint (its weights were trained on SD1.4) and {family} "
                f"model is loaded, so this image was generated without MIGC.{hint}")
    return host.decline_reason(p)


def structure_decline_reason(p: Any, host: ModuleType) -> str | None:
    """StructureDiffusion needs the ldm text-conditioning of SD1.x or SD2.x (one text encoder)."""
    model = p.sd_model
    if not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)):
        return ("StructureDiffusion was skipped: it supports SD1.x and SD2.x checkpoints (one CLIP text encoder); "
                "this model has another text conditioning, so the image was generated without it.")
    return host.decline_reason(p, "StructureDiffusion")


def _asks_for_anything(args: tuple) -> bool:
    """Whether the raw arguments enable MIGC or StructureDiffusion, even when they are otherwise invalid."""
    if not args:
        return False
    first = args[0]
    if isinstance(first, dict):
        structure = first.get("structure")
        return first.get("enabled", True) is not False or (isinstance(structure, dict) and structure.get("enabled", True) is not False)
    index = UI_FIELDS.index("structure_enabled")
    return first is True or (len(args) > index and args[index] is True)


def _effective(p: Any, params: MigcParams, host: ModuleType) -> MigcParams | None:
    """The parts that can run on this model (declines are told under the image); None if nothing can."""
    migc = params.enabled and len(params.layout) > 0
    structure = params.structure.enabled
    if params.enabled and not len(params.layout) and not structure:
        p.comment("MIGC is enabled but the layout has no instances: nothing to do.")
    migc_reason = decline_reason(p, host) if migc else None
    structure_reason = structure_decline_reason(p, host) if structure else None
    for reason in filter(None, (migc_reason, structure_reason)):
        p.comment(reason)
        log.warning("%s", reason)
    migc, structure = migc and migc_reason is None, structure and structure_reason is None
    if not (migc or structure):
        return None
    return replace(params, enabled=migc, structure=replace(params.structure, enabled=structure))


def process(p: Any, args: tuple, host: ModuleType) -> None:
    """Parse the arguments, decline or start the job, write the infotext and adjust the prompts."""
    global _active
    _finish()
    if not _asks_for_anything(args):
        return
    try:
        params = MigcParams.from_ui(*args)
    except MigcError as exc:
        _active = Job(p=p, params=MigcParams(enabled=True), host=host, error=exc)
        log.error("%s", exc)
        return
    params = _effective(p, params, host)
    if params is None:
        return
    job = _active = Job(p=p, params=params, host=host)
    weights_hash = None
    if params.enabled:
        try:
            weights_hash = weights_store.short_hash(weights_store.resolve(settings.models_dir(), params.weights))
        except MigcError as exc:
            job.error = exc
    p.extra_generation_params[INFOTEXT_KEY] = params.to_infotext(weights_hash=weights_hash)
    if params.enabled and params.append_descriptions:
        descriptions = params.layout.descriptions
        for name in ("all_prompts", "all_hr_prompts"):
            prompts = getattr(p, name, None)
            if prompts:
                setattr(p, name, [with_descriptions_appended(text, descriptions) for text in prompts])


def _prepare(job: Job) -> MigcSession:
    """Encode the instances and load the weights once per job; failures become the pending error."""
    from modules import devices

    p, params = job.p, job.params
    reference = next(job.host.unet_of(p).parameters())
    conditioning = InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), [])
    weights, global_context, error = None, None, job.error
    if error is None and params.enabled:
        try:
            path = weights_store.resolve(settings.models_dir(), params.weights)
            weights = weights_store.load_cached(path, reference.device, reference.dtype)
            layout = params.layout
            with devices.autocast():
                contexts, pooled = encode_phrases(p.sd_model, layout.descriptions)
                if not params.use_main_prompt:
                    if not layout.global_prompt:
                        raise MigcError("MIGC: 'Use main prompt as global prompt' is off but the global prompt is empty; "
                                        "type a global prompt or turn the option back on.")
                    global_context = encode_phrases(p.sd_model, [layout.global_prompt])[0]
            conditioning = InstanceConditioning.build(
                contexts, pooled, layout.boxes, layout.scales("ca"), layout.scales("ea"), layout.scales("sac"))
        except MigcError as exc:
            error = exc
    session = MigcSession(job.params, conditioning, weights, global_context)
    session.pending_error = error
    return session


def before_sampling(p: Any) -> None:
    """Before each sampling pass (and again before the hires pass): install the hooks for its size."""
    job = _active
    if job is None or job.p is not p:
        return
    if job.hooks is not None:
        job.hooks.remove()
    hr_pass = bool(getattr(p, "is_hr_pass", False))
    if hr_pass and not job.params.hires:
        return
    if job.session is None:
        job.session = _prepare(job)
    from modules import devices

    width, height = (p.hr_upscale_to_x, p.hr_upscale_to_y) if hr_pass else (p.width, p.height)
    job.session.begin_pass(width, height, list(p.seeds), devices.device)
    if job.params.structure.enabled and job.session.pending_error is None:
        _prepare_structure(job, hr_pass)
    job.hooks = job.host.Hooks(job.session, on_error=_finish, is_current=lambda: _active is job)
    job.hooks.install(p)


def _pass_prompts(p: Any, hr_pass: bool) -> list[str]:
    """The prompts of the images in this sampling pass (A1111 sets ``p.prompts`` per batch)."""
    prompts = getattr(p, "hr_prompts" if hr_pass else "prompts", None)
    if not prompts:
        prompts = (getattr(p, "all_hr_prompts" if hr_pass else "all_prompts", None) or [""])[:max(len(p.seeds), 1)]
    return list(prompts)


def _prepare_structure(job: Job, hr_pass: bool) -> None:
    """Spans and phrase encodings for this pass; skipped phrases are told under the image."""
    from modules import devices

    p = job.p
    steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if hr_pass else int(getattr(p, "steps", 20))
    try:
        with devices.autocast():
            runtime = build_runtime(p.sd_model, job.params.structure, _pass_prompts(p, hr_pass), job.params.layout.descriptions, steps)
    except MigcError as exc:
        job.session.pending_error = exc
        return
    message = skipped_message(runtime.skipped)
    if message:
        p.comment(message)
        log.warning("%s", message)
    if not runtime.phrase_count:
        p.comment("StructureDiffusion found none of its phrases in the prompt, so it changed nothing.")
    job.session.structure = runtime


def sampler_step(params: Any) -> tuple[int, int]:
    """(step index, steps) of the sampler for a CFG-denoiser call.

    ``params.sampling_step`` is the WebUI's progress counter, which the sampler's callback updates only
    after a step: during step i it still says i-1. The denoiser counts its own model evaluations
    (``step``, out of ``total_steps``, twice per step for second-order samplers), which maps onto the
    sampler's step exactly for one-evaluation samplers and proportionally otherwise.
    """
    steps = max(int(params.total_sampling_steps), 1)
    denoiser = getattr(params, "denoiser", None)
    evaluation, evaluations = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if isinstance(evaluation, int) and isinstance(evaluations, int) and evaluations > 0:
        return min(steps - 1, evaluation * steps // evaluations), steps
    return int(params.sampling_step), steps


def on_cfg_denoiser(params: Any) -> None:
    """``script_callbacks.on_cfg_denoiser``: the step index and this step's row layout."""
    job = _active
    if job is None or job.hooks is None or not job.hooks.installed:
        return
    denoiser = getattr(params, "denoiser", None)
    if denoiser is not None and getattr(denoiser, "p", job.p) is not job.p:
        return
    step, steps = sampler_step(params)
    job.hooks.on_cfg_step(step, steps, params)


def after_batch(p: Any) -> None:
    job = _active
    if job is not None and job.p is p and job.hooks is not None:
        job.hooks.remove()


def postprocess(p: Any, processed: Any) -> None:
    """End of the job: remove everything and add the boxes image if asked for."""
    job = _active
    _finish()
    if job is None or job.p is not p or not job.params.draw_boxes or not processed.images:
        return
    first = min(getattr(processed, "index_of_first_image", 0), len(processed.images) - 1)
    processed.images.append(draw_layout(processed.images[first], job.params.layout))
    if getattr(processed, "infotexts", None):
        processed.infotexts.append(processed.infotexts[min(first, len(processed.infotexts) - 1)])
