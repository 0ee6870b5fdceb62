"""One MIGC job in the WebUI: what the Script's callbacks ask for, for either host.

The Script stays free of logic: it forwards ``before_process`` / ``process`` /
``process_before_every_sampling`` / ``postprocess_batch`` / ``postprocess`` and the CFG-denoiser
callback here; the host module (``hosts.a1111`` or ``hosts.forge``) only installs its hooks.
Exceptions raised in Script callbacks are swallowed by the WebUI, so errors found before sampling are
kept on the session and raised by the first hooked attention call, which stops the job with the message
in the UI and a 4xx answer over the API; the hooks are removed first. Any failure while reading the
arguments becomes such an error too, so a request that asks for MIGC never succeeds without it.

What a job holds is released as soon as it cannot be needed: hooks after each batch; the job (its ``p``,
session and tensors) after the job, when ``p.close()`` runs (the WebUI closes every job, failed ones
included) and when any of our hooks raises; and again at the start of the next job. Model B is freed by
every job that does not use MagicFusion, the panel off included, and when the main model changes; the
MIGC weights by every job that does not use them and when the main model changes to one MIGC cannot use,
unless the user keeps them loaded (setting ``migc_keep_weights``).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch

from .core import host_memory, settings
from .core.draw import draw_layout
from .core.errors import MigcError
from .core.layout import MAX_MIGC_INSTANCES, fit_masks
from .core.text_encoding import encode_conditioning, encode_phrases, own_global_context
from .modes.magicfusion import mode as fusion_job
from .modes.migc import weights_store
from .modes.migc.session import MigcSession
from .modes.migc.shading import InstanceConditioning
from .modes.multidiffusion import mode as multidiffusion_job
from .modes.structure.method import TextEngine, build_runtime, skipped_message
from .params import INFOTEXT_KEY, MODE_MIGC, MODE_MULTIDIFFUSION, MODE_NAIVE, UI_FIELDS, MigcParams, with_descriptions_appended

log = logging.getLogger("migc")


@dataclass
class Job:
    p: Any
    params: MigcParams
    host: ModuleType
    error: Exception | None = None
    weights_hash: str | None = None
    model_b_hash: str | None = None
    session: MigcSession | None = None
    hooks: Any = None
    fusion: Any = None  # MagicFusion's ride-along hooks (hosts.<host>_fusion.FusionHooks)
    regions: Any = None  # MultiDiffusion's denoiser wrapper (hosts.<host>_multidiffusion.RegionHooks)
    region_prompts: Any = None  # MultiDiffusion's encoded box prompts, once per job
    text_engine: TextEngine | None = None  # StructureDiffusion's tokenizer/encoder, phrase encodings cached for the job


_active: Job | None = None


def active_job() -> Job | None:
    return _active


def _remove_hooks(job: Job) -> None:
    for hooks in (job.hooks, job.fusion, job.regions):
        if hooks is not None:
            hooks.remove()


def _finish() -> None:
    global _active
    if _active is not None:
        _remove_hooks(_active)
        _active = None
        host_memory.trim()


def before_process(p: Any) -> None:
    """Every job, MIGC or not: drop whatever a previous job may have left installed."""
    _finish()


def _release_when_closed(job: Job) -> None:
    """Drop the job when the WebUI closes its ``p`` (``with closing(p)``, failed or interrupted jobs
    included), so no session, hook or tensor outlives it; an instance attribute, so only this ``p``."""
    p, ref = job.p, weakref.ref(job)
    close = getattr(p, "close", None)

    def closing(*args: Any, **kwargs: Any) -> Any:
        try:
            return close(*args, **kwargs) if close is not None else None
        finally:
            if _active is not None and _active is ref():
                _finish()

    try:
        p.close = closing
    except AttributeError:  # a processing object that takes no attributes: the next job's start cleans up
        pass


def on_model_loaded(sd_model: Any) -> None:
    """``script_callbacks.on_model_loaded``: model B was paired with the previous main model, so it goes;
    the MIGC weights go when the new model is not SD1.x (setting ``migc_keep_weights`` keeps them)."""
    fusion_job.free_model_b()
    if not getattr(sd_model, "is_sd1", False) and not settings.option("migc_keep_weights"):
        weights_store.unload()


def model_family(model: Any) -> str | None:
    """"sd1", "sd2", "sdxl" or None (another architecture, e.g. Flux on Forge)."""
    for family in ("sd1", "sd2", "sdxl"):
        if getattr(model, f"is_{family}", False):
            return family
    return None


def decline_reason(p: Any, host: ModuleType, mode: str = MODE_MIGC) -> str | None:
    """Why the instance mode cannot run on this job's model, as a message for the user; None when it can."""
    family = model_family(p.sd_model)
    if mode != MODE_MIGC:
        if family is None:
            return (f"MIGC ({mode} mode) was skipped: it supports SD1.x, SD2.x and SDXL checkpoints, and this model "
                    "has another architecture, so the image was generated without it.")
        return host.decline_reason(p, f"MIGC ({mode} mode)") if mode == MODE_NAIVE else None
    if family != "sd1":
        name = {"sd2": "an SD2.x", "sdxl": "an SDXL"}.get(family, "a non-SD1.x")
        return (f"MIGC was skipped: it needs an SD1.x checkpoint (its weights were trained on SD1.4) and {name} "
                "model is loaded, so this image was generated without MIGC. The training-free modes work on this "
                "model with the same boxes: set Mode to 'naive' (cheap) or 'multidiffusion' (stronger, slower) "
                '(API: "mode": "naive" / "multidiffusion").')
    return host.decline_reason(p)


def structure_decline_reason(p: Any, host: ModuleType) -> str | None:
    """StructureDiffusion needs the ldm text-conditioning of SD1.x or SD2.x (one text encoder)."""
    model = p.sd_model
    if not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)):
        return ("StructureDiffusion was skipped: it supports SD1.x and SD2.x checkpoints (one CLIP text encoder); "
                "this model has another text conditioning, so the image was generated without it.")
    return host.decline_reason(p, "StructureDiffusion")


def _asks_for_anything(args: tuple) -> bool:
    """Whether the raw arguments enable MIGC, StructureDiffusion or MagicFusion, even when otherwise invalid."""
    if not args:
        return False
    first = args[0]
    if isinstance(first, dict):
        parts = [first.get(name) for name in ("structure", "magicfusion")]
        return first.get("enabled", True) is not False or any(d is not None and (not isinstance(d, dict) or d.get("enabled", True) is not False) for d in parts)
    # Anything but an explicit off (false/null) counts as asking: a wrong type then gets its 4xx message.
    switches = [UI_FIELDS.index(name) for name in ("structure_enabled", "fusion_enabled")]
    return _switch_on(first) or any(len(args) > i and _switch_on(args[i]) for i in switches)


def _switch_on(value: Any) -> bool:
    return value is not None and value is not False


def _effective(p: Any, params: MigcParams, host: ModuleType) -> MigcParams | None:
    """The parts that can run on this model (declines are told under the image); None if nothing can."""
    migc = params.enabled and len(params.layout) > 0
    structure, fusion = params.structure.enabled, params.magicfusion.enabled
    if params.enabled and not len(params.layout) and not (structure or fusion):
        p.comment("MIGC is enabled but the layout has no instances: nothing to do.")
    reasons = {
        "migc": decline_reason(p, host, params.mode) if migc else None,
        "structure": structure_decline_reason(p, host) if structure else None,
        "fusion": fusion_job.decline_reason(p, host) if fusion else None,
    }
    for reason in filter(None, reasons.values()):
        p.comment(reason)
        log.warning("%s", reason)
    migc, structure, fusion = (on and reasons[k] is None for on, k in ((migc, "migc"), (structure, "structure"), (fusion, "fusion")))
    if migc and params.mode == MODE_MULTIDIFFUSION and (structure or fusion):
        names = " and ".join(name for name, on in (("StructureDiffusion", structure), ("MagicFusion", fusion)) if on)
        p.comment(f"{names} skipped: MultiDiffusion runs each box as its own prompt, which they do not combine with; "
                  "use the migc or naive mode to combine them.")
        structure = fusion = False
    if not (migc or structure or fusion):
        return None
    return replace(params, enabled=migc, structure=replace(params.structure, enabled=structure),
                   magicfusion=replace(params.magicfusion, enabled=fusion))


def process(p: Any, args: tuple, host: ModuleType) -> None:
    """Parse the arguments, decline or start the job, write the infotext and adjust the prompts."""
    global _active
    _finish()
    if not _asks_for_anything(args):
        _free_unused(None)
        return
    try:
        params = MigcParams.from_ui(*args)
    except Exception as exc:  # noqa: BLE001 - the WebUI would swallow it and answer 200 without MIGC
        _free_unused(None)
        _fail_job(p, host, argument_error(exc))
        return
    try:
        effective = _effective(p, params, host)
    except Exception as exc:  # noqa: BLE001
        _free_unused(None)
        _fail_job(p, host, unexpected_error("MIGC could not start", exc))
        return
    _free_unused(effective)
    if effective is None:
        return
    params = effective
    job = _active = Job(p=p, params=params, host=host)
    _release_when_closed(job)
    try:
        if params.enabled:
            # Masks at the image size from here on: the generation and the infotext see the same values.
            job.params = params = replace(params, layout=fit_masks(params.layout, p.width, p.height))
        if params.enabled and params.mode == MODE_MIGC:
            job.weights_hash = weights_store.short_hash(weights_store.resolve(settings.models_dir(), params.weights))
        if params.enabled and params.mode == MODE_MULTIDIFFUSION:
            multidiffusion_job.check_job(p)
        if params.magicfusion.enabled:
            fusion_job.check_job(p, params)
            job.model_b_hash = fusion_job.model_b_hash(p, host, params.magicfusion.model_b)
    except MigcError as exc:
        job.error = exc
    except Exception as exc:  # noqa: BLE001
        job.error = unexpected_error("MIGC could not start", exc)
    _write_infotext(job)
    if params.enabled and params.append_descriptions and params.mode != MODE_MULTIDIFFUSION:
        descriptions = params.layout.descriptions
        for name in ("all_prompts", "all_hr_prompts"):
            prompts = getattr(p, name, None)
            if prompts:
                setattr(p, name, [with_descriptions_appended(text, descriptions) for text in prompts])


def _free_unused(params: MigcParams | None) -> None:
    """What this job will not use goes: model B always, the MIGC weights unless the user keeps them
    loaded between jobs (setting ``migc_keep_weights``); the next job that needs them loads them again."""
    if params is None or not params.magicfusion.enabled:
        fusion_job.free_model_b()
    uses_weights = params is not None and params.enabled and params.mode == MODE_MIGC
    if not uses_weights and not settings.option("migc_keep_weights"):
        weights_store.unload()


def argument_error(exc: Exception) -> MigcError:
    """Any failure to read the script's arguments, as the 4xx error the job stops with."""
    if isinstance(exc, MigcError):
        return exc
    return MigcError(f"MIGC: the script arguments could not be read ({type(exc).__name__}: {str(exc)[:300]}); "
                     "see the README's API section for the dict and list forms.")


def unexpected_error(what: str, exc: Exception) -> MigcError:
    """A failure that is not the user's input: logged with its traceback, reported as a 500 with the message."""
    if isinstance(exc, MigcError):
        return exc
    log.exception("%s", what)
    return MigcError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}", status_code=500)


def _fail_job(p: Any, host: ModuleType, error: MigcError) -> None:
    """A job that only carries ``error``: its first hooked call raises it (and nothing else runs)."""
    global _active
    log.error("%s", error)
    job = _active = Job(p=p, params=MigcParams(enabled=True), host=host, error=error)
    _release_when_closed(job)


def _write_infotext(job: Job, weights_kind: str | None = None) -> None:
    job.p.extra_generation_params[INFOTEXT_KEY] = job.params.to_infotext(
        weights_hash=job.weights_hash, model_b_hash=job.model_b_hash, weights_kind=weights_kind)


def _check_capacity(weights: Any, layout: Any) -> None:
    if not weights.plus and len(layout) > MAX_MIGC_INSTANCES:
        raise MigcError(f"MIGC: {len(layout)} instances given; MIGC's aggregation controller has {MAX_MIGC_INSTANCES} "
                        "instance slots (MIGC++ weights have 29). Remove or merge some instances.")


def _prepare(job: Job) -> MigcSession:
    """Encode the instances and load the weights once per job; failures become the pending error."""
    from modules import devices

    p, params = job.p, job.params
    reference = next(job.host.unet_of(p).parameters())
    conditioning = InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), [])
    weights, global_context, error = None, None, job.error
    if error is None and params.enabled and params.mode == MODE_NAIVE:
        try:
            return _prepare_naive(job)
        except MigcError as exc:
            error = exc
    elif error is None and params.enabled and params.mode == MODE_MIGC:
        try:
            path = weights_store.resolve(settings.models_dir(), params.weights)
            weights = weights_store.load_cached(path, reference.device, reference.dtype)
            layout = params.layout
            _check_capacity(weights, layout)
            _write_infotext(job, weights.kind)
            with devices.autocast():
                contexts, pooled = encode_phrases(p.sd_model, layout.descriptions)
                global_context = own_global_context(params, lambda texts: encode_phrases(p.sd_model, texts)[0])
            conditioning = InstanceConditioning.build(
                contexts, pooled, layout.boxes, layout.scales("ca"), layout.scales("ea"), layout.scales("sac"))
        except MigcError as exc:
            error = exc
    session = MigcSession(job.params, conditioning, weights, global_context)
    session.pending_error = error
    return session


def _prepare_naive(job: Job) -> MigcSession:
    """The weight-free fuser on every attn2 for max(MIGC steps, naive steps) of the steps, any SD family:
    instance contexts come from the model's own text conditioning (SDXL: both encoders)."""
    from modules import devices

    p, params = job.p, job.params
    layout = params.layout
    with devices.autocast():
        contexts, _ = encode_conditioning(p.sd_model, layout.descriptions, p.width, p.height)
        global_context = own_global_context(params, lambda texts: encode_conditioning(p.sd_model, texts, p.width, p.height)[0])
    pooled = torch.zeros((len(layout), contexts.shape[-1]))  # only MIGC's Enhancement Attention reads it
    conditioning = InstanceConditioning.build(contexts, pooled, layout.boxes)
    steps = max(params.migc_steps, params.naive_steps)
    return MigcSession(replace(params, migc_steps=0.0, naive_steps=steps), conditioning, None, global_context)


def before_sampling(p: Any, noise: Any = None) -> None:
    """Before each sampling pass (and again before the hires pass): install the hooks for its size.

    ``noise``: the pass's unit initial noise (``process_before_every_sampling``'s), which MultiDiffusion's
    bootstrapping noises its backgrounds with."""
    job = _active
    if job is None or job.p is not p:
        return
    _remove_hooks(job)
    job.hooks = job.fusion = job.regions = None
    hr_pass = bool(getattr(p, "is_hr_pass", False))
    fusion = job.params.magicfusion
    fusion_here = fusion.enabled and (not hr_pass or fusion.hires)
    if hr_pass and not job.params.hires and not fusion_here:
        return
    if job.session is None:
        job.session = _prepare(job)
    from modules import devices

    session = job.session
    width, height = (p.hr_upscale_to_x, p.hr_upscale_to_y) if hr_pass else (p.width, p.height)
    session.begin_pass(width, height, list(p.seeds), devices.device)
    if job.params.enabled and job.params.mode == MODE_MIGC and not hr_pass:
        _warn_vanished(p, job.params, session.vanished_instances())
    session.structure = None
    if job.params.structure.enabled and session.pending_error is None and (not hr_pass or job.params.hires):
        _prepare_structure(job, hr_pass)
    if fusion_here and session.pending_error is None:
        try:
            job.fusion = fusion_job.install(job, hr_pass)
        except MigcError as exc:
            session.pending_error = exc
        except Exception as exc:  # noqa: BLE001 - the WebUI would swallow it and sample without MagicFusion
            log.exception("MagicFusion could not start")
            session.pending_error = MigcError(f"MagicFusion could not start: {type(exc).__name__}: {exc}", status_code=500)
    if job.params.enabled and job.params.mode == MODE_MULTIDIFFUSION and (not hr_pass or job.params.hires) \
            and session.pending_error is None:
        try:
            with torch.no_grad():
                job.regions = multidiffusion_job.install(job, hr_pass, noise)
        except MigcError as exc:
            session.pending_error = exc
        except Exception as exc:  # noqa: BLE001 - the WebUI would swallow it and sample without the regions
            log.exception("MultiDiffusion could not start")
            session.pending_error = MigcError(f"MultiDiffusion could not start: {type(exc).__name__}: {exc}", status_code=500)
    session.migc_off = hr_pass and not job.params.hires  # a hires pass for MagicFusion only
    job.hooks = job.host.Hooks(session, on_error=_finish, is_current=lambda: _active is job)
    job.hooks.install(p)


def _warn_vanished(p: Any, params: MigcParams, indices: list[int]) -> None:
    for i in indices:
        inst = params.layout.instances[i]
        shape = "mask" if inst.mask is not None else "box"
        message = (f"MIGC: instance #{i + 1} ('{inst.description[:40]}') has a {shape} thinner than one cell of the "
                   "16x16/8x8 feature maps MIGC shades (32/64 px at 512x512), so it vanishes there; make it larger.")
        p.comment(message)
        log.warning("%s", message)


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
    if job.text_engine is None:
        job.text_engine = TextEngine(p.sd_model)
    try:
        with devices.autocast():
            runtime = build_runtime(job.text_engine, job.params.structure, _pass_prompts(p, hr_pass),
                                    job.params.layout.descriptions, steps)
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
    job = _job_of(params)
    if job is None:
        return
    if job.hooks is not None and job.hooks.installed:
        step, steps = sampler_step(params)
        job.hooks.on_cfg_step(step, steps, params)
    if job.fusion is not None and job.fusion.installed:
        job.fusion.on_cfg_step(params, fusion_job.guidance_of(params, job.p))
    if job.regions is not None and job.regions.installed:
        step, steps = sampler_step(params)
        job.regions.on_cfg_step(step, steps, params)


def on_cfg_denoised(params: Any) -> None:
    """``script_callbacks.on_cfg_denoised``: MagicFusion blends model B into the denoiser's output rows."""
    job = _active
    if job is not None and job.fusion is not None and job.fusion.installed:
        job.fusion.on_cfg_denoised(params)


def _job_of(params: Any) -> Job | None:
    """The active job, if this CFG step is one of its own (not another extension's sampler)."""
    job = _active
    if job is None:
        return None
    denoiser = getattr(params, "denoiser", None)
    if denoiser is not None and getattr(denoiser, "p", job.p) is not job.p:
        return None
    return job


def after_batch(p: Any) -> None:
    job = _active
    if job is not None and job.p is p:
        _remove_hooks(job)


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
