"""One job in the WebUI, for either host and any mode: the lifecycle, never a mode's own logic.

For each mode the job asks for (:mod:`lib_migc.modes.registry`): decline or exclusion (told under the
image), ``start`` (checks, infotext fields), per sampling pass ``begin_pass`` (its hooks); every mode frees
what the job does not use. The WebUI swallows exceptions in Script callbacks, so an error found before
sampling waits on the attention session and the first hooked call raises it (the UI shows it, the API
answers 4xx), after taking every hook away. A job is released after each batch (a pass's hooks; patches that last the
job, like the tiled VAE, at its end), when the WebUI closes its ``p`` (failed and interrupted jobs too), when one of our hooks raises, and at the next job.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .core import host_memory
from .core.draw import draw_layout
from .core.errors import MigcError, argument_error, unexpected_error
from .core.instance_maps import InstanceMaps
from .core.map_image import render_map
from .hosts.base import pass_size, sampler_step
from .modes.registry import MODES, attention_session, begin_passes, effective_params
from .params import INFOTEXT_KEY, MigcParams, asks_for_anything
from .xyz_axes import OVERRIDES, with_overrides

log = logging.getLogger("migc")


@dataclass
class Job:
    """One job: ``p``, parameters, host; the attention session; this pass's hooks (by mode name, and
    ``attention``); what modes keep for the job (``state``) and add to the infotext (``infotext``)."""

    p: Any
    params: MigcParams
    host: ModuleType
    error: Exception | None = None
    infotext: dict[str, Any] = field(default_factory=dict)
    session: Any = None
    hooks: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    lasting: list[Any] = field(default_factory=list)  # patches for the whole job (the VAE's), removed at its end
    maps: InstanceMaps | None = None  # *Show instance maps*: filled by one mode (``maps.owner``)

    def write_infotext(self) -> None:
        self.p.extra_generation_params[INFOTEXT_KEY] = self.params.to_infotext(**self.infotext)

    def maps_for(self, mode_name: str) -> InstanceMaps | None:
        """The job's instance maps when ``mode_name`` is the mode that fills them, else None (it records nothing)."""
        maps = self.maps
        return maps if maps is not None and maps.owner == mode_name else None

    def is_current(self, hooks: Any) -> bool:
        """Whether ``hooks`` still belong to the running job's current pass (hooks left behind step aside)."""
        return _active is self and any(installed is hooks for installed in self.hooks.values())


_active: Job | None = None


def active_job() -> Job | None:
    """The running job (tests and the hooks' owners look at it)."""
    return _active


def _remove_hooks(job: Job) -> None:
    for hooks in job.hooks.values():
        hooks.remove()


def _finish() -> None:
    global _active
    if _active is not None:
        _remove_hooks(_active)
        while _active.lasting:
            _active.lasting.pop().remove()
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

    with contextlib.suppress(AttributeError):  # a ``p`` that takes no attributes: the next job cleans up
        p.close = closing


def on_model_loaded(sd_model: Any) -> None:
    """``script_callbacks.on_model_loaded``: each mode drops what was paired with the previous main model."""
    for mode in MODES:
        mode.on_model_loaded(sd_model)


def process(p: Any, args: tuple, host: ModuleType) -> None:
    """Read the arguments, decline or start each mode, write the infotext. Unreadable arguments (4xx) and
    failures while deciding (500) make a job that only carries its error; each mode frees what it keeps
    when this job does not use it."""
    global _active
    _finish()
    params, error = None, None
    overrides = getattr(p, OVERRIDES, None)
    if asks_for_anything(args) or (overrides or {}).get("enabled"):
        try:
            params = with_overrides(MigcParams.from_ui(*args), overrides)
        except Exception as exc:  # noqa: BLE001 - the WebUI would swallow it and answer 200 without the extension
            error = argument_error(exc)
        else:
            try:
                params = effective_params(p, params, host)
            except Exception as exc:  # noqa: BLE001
                params, error = None, unexpected_error("MIGC could not start", exc)
    for mode in MODES:
        mode.release_unused(params)
    if error is not None:
        log.error("%s", error)
        params = MigcParams(enabled=True)
    if params is None:
        return
    job = _active = Job(p=p, params=params, host=host, error=error)
    _release_when_closed(job)
    if error is not None:
        return
    try:
        for mode in MODES:
            if mode.asked(params):
                mode.start(job)
        job.maps = _maps_collector(p, params)
    except MigcError as exc:
        job.error = exc
    except Exception as exc:  # noqa: BLE001
        job.error = unexpected_error("MIGC could not start", exc)
    job.write_infotext()


def _maps_collector(p: Any, params: MigcParams) -> InstanceMaps | None:
    """*Show instance maps*: one collector, filled by the first running mode that can map (MIGC/naive,
    MultiDiffusion, StructureDiffusion, MagicFusion, in that order), so each image gets one map."""
    if not params.maps:
        return None
    owner = next((mode for mode in MODES if mode.asked(params) and mode.draws_maps), None)
    if owner is None:
        p.comment("MIGC: instance maps need MIGC, MultiDiffusion, StructureDiffusion or MagicFusion to run; none did.")
        return None
    return InstanceMaps(owner=owner.name)


def before_sampling(p: Any, noise: Any = None) -> None:
    """Before each sampling pass (the hires pass too): each mode's hooks for this pass, then the attention
    hooks every job carries. ``noise``: the pass's unit initial noise (``process_before_every_sampling``'s)."""
    job = _active
    if job is None or job.p is not p:
        return
    _remove_hooks(job)
    job.hooks = {}
    hr_pass = bool(getattr(p, "is_hr_pass", False))
    modes = [mode for mode in MODES if mode.asked(job.params)]
    if hr_pass and not any(mode.runs_in_pass(job.params, hr_pass) for mode in modes):
        return
    if job.session is None:
        job.session = attention_session(job)
    from modules import devices

    job.session.begin_pass(*pass_size(p, hr_pass), list(p.seeds), devices.device)
    if job.maps is not None:
        job.maps.begin_pass(len(p.seeds), *pass_size(p, hr_pass))
    job.hooks, processor = begin_passes(job, modes, hr_pass, noise)
    attention = job.hooks["attention"] = job.host.Hooks(processor, on_error=_finish, is_current=lambda: _active is job)
    attention.install(p)


def on_cfg_denoiser(params: Any) -> None:
    """``script_callbacks.on_cfg_denoiser``: the step index and this step's row layout, to every hook."""
    job = _job_of(params)
    step, steps = sampler_step(params)
    for hooks in list(job.hooks.values()) if job is not None else []:
        if hooks.installed:
            hooks.on_cfg_step(step, steps, params)


def on_cfg_denoised(params: Any) -> None:
    """``script_callbacks.on_cfg_denoised``: to every hook that blends the denoiser's output rows."""
    for hooks in list(_active.hooks.values()) if _active is not None else []:
        if hooks.installed and hasattr(hooks, "on_cfg_denoised"):
            hooks.on_cfg_denoised(params)


def _job_of(params: Any) -> Job | None:
    """The active job, if this CFG step is one of its own (not another extension's sampler)."""
    job, denoiser = _active, getattr(params, "denoiser", None)
    if job is None or (denoiser is not None and getattr(denoiser, "p", job.p) is not job.p):
        return None
    return job


def post_sample(p: Any, ps: Any) -> None:
    """The WebUI's ``post_sample`` (after sampling, before decoding): each running mode may change the
    samples (``ps.samples``)."""
    job = _active
    if job is None or job.p is not p:
        return
    for mode in MODES:
        if mode.asked(job.params):
            ps.samples = mode.post_sample(job, ps.samples)


def after_batch(p: Any) -> None:
    if _active is not None and _active.p is p:
        _remove_hooks(_active)
        if _active.maps is not None:
            _active.maps.end_batch()


def postprocess(p: Any, processed: Any) -> None:
    """End of the job: remove everything, then add the boxes image and the instance maps if asked for."""
    job = _active
    _finish()
    if job is None or job.p is not p or not processed.images:
        return
    first = min(getattr(processed, "index_of_first_image", 0), len(processed.images) - 1)
    generated = list(range(first, len(processed.images)))
    if job.params.draw_boxes:
        _append_image(processed, draw_layout(processed.images[first], job.params.layout), first)
    if job.maps is not None:
        maps = [(batch, shares) for batch in job.maps.batches for shares in batch.shares]
        for index, (batch, shares) in zip(generated, maps):
            _append_image(processed, render_map(processed.images[index], shares, batch.labels, batch.source), index)


def _append_image(processed: Any, image: Any, source_index: int) -> None:
    """An extra output image, with the infotext of the generated image it was made from."""
    processed.images.append(image)
    if getattr(processed, "infotexts", None):
        processed.infotexts.append(processed.infotexts[min(source_index, len(processed.infotexts) - 1)])
