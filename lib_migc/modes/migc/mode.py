"""MIGC, MIGC++ and the naive shader as a mode of the job: when they run, what they check and write
before sampling, and when their weights are freed."""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch

from ...core import settings
from ...core.errors import MigcError
from ...core.families import model_family
from ...core.instance_maps import COARSE_LAYERS
from ...core.layout import MAX_MIGC_INSTANCES, fit_masks
from ...core.text_encoding import encode_conditioning, encode_phrases, own_global_context
from ...params import MigcParams, with_descriptions_appended
from .params import MODE_MIGC, MODE_NAIVE
from ..base import Mode
from . import weights_store
from .session import MigcSession
from .shading import InstanceConditioning

log = logging.getLogger("migc")


def fit_layout_masks(job: Any) -> None:
    """Masks at the image size from here on: the generation and the infotext see the same values."""
    job.params = replace(job.params, layout=fit_masks(job.params.layout, job.p.width, job.p.height))


class MigcMode(Mode):
    """The trained MIGC/MIGC++ layers (``mode: migc``, SD1.x) or the weight-free fuser (``mode: naive``, any family)."""

    name, title = MODE_MIGC, "MIGC"
    draws_maps = True

    def asked(self, params: MigcParams) -> bool:
        return params.enabled and params.mode in (MODE_MIGC, MODE_NAIVE) and len(params.layout) > 0

    def turned_off(self, params: MigcParams) -> MigcParams:
        return replace(params, enabled=False)

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        family = model_family(p.sd_model)
        if params.mode == MODE_NAIVE:
            return unknown_family(p, params.mode) or host.decline_reason(p, f"MIGC ({params.mode} mode)")
        if family != "sd1":
            name = {"sd2": "an SD2.x", "sdxl": "an SDXL"}.get(family, "a non-SD1.x")
            return (f"MIGC was skipped: it needs an SD1.x checkpoint (its weights were trained on SD1.4) and {name} "
                    "model is loaded, so this image was generated without MIGC. The training-free modes work on this "
                    "model with the same boxes: set Mode to 'naive' (cheap) or 'multidiffusion' (stronger, slower) "
                    '(API: "mode": "naive" / "multidiffusion").')
        return host.decline_reason(p)

    def start(self, job: Any) -> None:
        fit_layout_masks(job)
        params, p = job.params, job.p
        if params.mode == MODE_MIGC:
            job.infotext["weights_hash"] = weights_store.short_hash(weights_store.resolve(settings.models_dir(), params.weights))
        if params.append_descriptions:
            for name in ("all_prompts", "all_hr_prompts"):
                prompts = getattr(p, name, None)
                if prompts:
                    setattr(p, name, [with_descriptions_appended(text, params.layout.descriptions) for text in prompts])

    def release_unused(self, params: MigcParams | None) -> None:
        """The weights (219 MB in fp32) go with any job that does not use them, unless the user keeps them
        loaded between jobs (setting ``migc_keep_weights``); the next job that needs them loads them again."""
        uses_weights = params is not None and params.enabled and params.mode == MODE_MIGC
        if not uses_weights and not settings.option("migc_keep_weights"):
            weights_store.unload()

    def on_model_loaded(self, sd_model: Any) -> None:
        if not getattr(sd_model, "is_sd1", False) and not settings.option("migc_keep_weights"):
            weights_store.unload()

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        return not hr_pass or params.hires

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> None:
        """The instances shade this pass (or not: a hires pass without *Also in the hires-fix pass*); thin
        instances are told under the image once. The attention hooks every job installs do the work."""
        session = job.session
        session.migc_off = not self.runs_in_pass(job.params, hr_pass)
        session.maps = maps = job.maps_for(self.name)
        if maps is not None:
            maps.labels, maps.source = list(job.params.layout.descriptions), maps_source(job.params, session)
        if job.params.mode == MODE_MIGC and not hr_pass:
            warn_vanished(job.p, job.params, session.vanished_instances())


def maps_source(params: MigcParams, session: Any) -> str:
    """The legend's last line: which weights the instance maps show."""
    fuser = "the naive fuser's weights"
    where = f"mean over the shaded calls of {COARSE_LAYERS}"
    if params.mode == MODE_NAIVE:
        return f"Shares: {fuser}, {where}"
    sac = "MIGC++'s SAC weights" if session.weights is not None and session.weights.plus else "MIGC's SAC weights"
    naive = f", then {fuser}" if params.naive_steps > params.migc_steps else ""
    return f"Shares: {sac} x instance masks{naive}, {where}"


def unknown_family(p: Any, mode: str) -> str | None:
    """Why a training-free mode declines a model outside SD1.x, SD2.x and SDXL; None inside them."""
    if model_family(p.sd_model) is not None:
        return None
    return (f"MIGC ({mode} mode) was skipped: it supports SD1.x, SD2.x and SDXL checkpoints, and this model has "
            "another architecture, so the image was generated without it.")


def warn_vanished(p: Any, params: MigcParams, indices: list[int]) -> None:
    for i in indices:
        inst = params.layout.instances[i]
        shape = "mask" if inst.mask is not None else "box"
        message = (f"MIGC: instance #{i + 1} ('{inst.description[:40]}') has a {shape} thinner than one cell of the "
                   "16x16/8x8 feature maps MIGC shades (32/64 px at 512x512), so it vanishes there; make it larger.")
        p.comment(message)
        log.warning("%s", message)


def check_capacity(weights: Any, layout: Any) -> None:
    if not weights.plus and len(layout) > MAX_MIGC_INSTANCES:
        raise MigcError(f"MIGC: {len(layout)} instances given; MIGC's aggregation controller has {MAX_MIGC_INSTANCES} "
                        "instance slots (MIGC++ weights have 29). Remove or merge some instances.")


def prepare_session(job: Any) -> MigcSession:
    """The attention state of a job, once per job: MIGC's encoded instances and weights when it asks for
    them (none otherwise). Every job's attention hooks carry it, because its pending error (the job's
    own, or one found here) stops the job at the first hooked call."""
    from modules import devices

    p, params = job.p, job.params
    reference = next(job.host.unet_of(p).parameters())
    conditioning = InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), [])
    weights, global_context, error = None, None, job.error
    migc = MigcMode().asked(params)
    if error is None and migc and params.mode == MODE_NAIVE:
        try:
            return _naive_session(job)
        except MigcError as exc:
            error = exc
    elif error is None and migc:
        try:
            path = weights_store.resolve(settings.models_dir(), params.weights)
            weights = weights_store.load_cached(path, reference.device, reference.dtype)
            layout = params.layout
            check_capacity(weights, layout)
            job.infotext["weights_kind"] = weights.kind
            job.write_infotext()
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


def _naive_session(job: Any) -> MigcSession:
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
