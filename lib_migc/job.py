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
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from . import settings, weights_store
from .draw import draw_layout
from .errors import MigcError
from .params import INFOTEXT_KEY, MigcParams, with_descriptions_appended
from .session import MigcSession
from .shading import InstanceConditioning
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
        return (f"MIGC was skipped: it needs an SD1.x checkpoint (its weights were trained on SD1.4) and {family} "
                "model is loaded, so this image was generated without MIGC.")
    return host.decline_reason(p)


def _asks_for_migc(args: tuple) -> bool:
    """Whether the raw arguments enable MIGC, even when they are otherwise invalid."""
    if not args:
        return False
    first = args[0]
    return first is True or (isinstance(first, dict) and first.get("enabled", True) is not False)


def process(p: Any, args: tuple, host: ModuleType) -> None:
    """Parse the arguments, decline or start the job, write the infotext and adjust the prompts."""
    global _active
    _finish()
    if not _asks_for_migc(args):
        return
    reason = decline_reason(p, host)
    if reason is not None:
        p.comment(reason)
        log.warning("%s", reason)
        return
    try:
        params = MigcParams.from_ui(*args)
    except MigcError as exc:
        _active = Job(p=p, params=MigcParams(enabled=True), host=host, error=exc)
        log.error("%s", exc)
        return
    if not len(params.layout):
        p.comment("MIGC is enabled but the layout has no instances: nothing to do.")
        return
    job = _active = Job(p=p, params=params, host=host)
    weights_hash = None
    try:
        weights_hash = weights_store.short_hash(weights_store.resolve(settings.models_dir(), params.weights))
    except MigcError as exc:
        job.error = exc
    p.extra_generation_params[INFOTEXT_KEY] = params.to_infotext(weights_hash=weights_hash)
    if params.append_descriptions:
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
    if error is None:
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
    job.hooks = job.host.Hooks(job.session, on_error=_finish, is_current=lambda: _active is job)
    job.hooks.install(p)


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
