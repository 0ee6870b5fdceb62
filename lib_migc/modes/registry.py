"""The modes the job runs, in the order their messages appear under the image.

Importing this module imports every mode package; the job imports it, the mode packages never do."""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

from ..core.attention_chain import chain
from ..core.errors import MigcError, unexpected_error
from ..params import MigcParams
from .base import Mode
from .consistent.mode import ConsistentMode
from .magicfusion.mode import MagicFusionMode
from .migc.mode import MigcMode, prepare_session
from .multidiffusion.mode import MultiDiffusionMode
from .structure.mode import StructureMode

log = logging.getLogger("migc")

MODES: list[Mode] = [MigcMode(), MultiDiffusionMode(), StructureMode(), MagicFusionMode(), ConsistentMode()]


def register(mode: Mode) -> None:
    """Add a mode after the built-in ones (its messages come last); the job picks it up from its next job."""
    if any(known.name == mode.name for known in MODES):
        raise ValueError(f"a mode named {mode.name!r} is already registered")
    MODES.append(mode)


#: The attention state every job's attention hooks carry (MIGC's instances and weights when asked for,
#: StructureDiffusion's pass runtime, the pending error), built once per job.
attention_session = prepare_session


def effective_params(p: Any, params: MigcParams, host: ModuleType) -> MigcParams | None:
    """``params`` with only the modes that can run on this job's model and beside each other (declines and
    exclusions are told under the image, each mode's own words); None when none can."""
    if params.enabled and not len(params.layout):
        switched_off = replace(params, enabled=False)
        # A mode that runs without instances (a MultiDiffusion panorama) keeps the switch on; the others need them.
        if not any(mode.asked(params) and not mode.asked(switched_off) for mode in MODES):
            if not any(mode.asked(params) for mode in MODES):
                p.comment("MIGC is enabled but the layout has no instances: nothing to do.")
            params = switched_off
    running = []
    for mode in MODES:
        if not mode.asked(params):
            continue
        reason = mode.decline(p, host, params)
        if reason:
            p.comment(reason)
            log.warning("%s", reason)
            params = mode.turned_off(params)
        else:
            running.append(mode)
    for mode in list(running):
        excluded = [other for other in running if other.name in mode.excludes and mode in running]
        if excluded:
            p.comment(f"{' and '.join(other.title for other in excluded)} skipped: {mode.exclusion_reason}")
            for other in excluded:
                params = other.turned_off(params)
                running.remove(other)
    return params if running else None


def begin_passes(job: Any, modes: list[Mode], hr_pass: bool, noise: Any) -> tuple[dict[str, Any], Any]:
    """Each mode prepares this sampling pass and installs its hooks ({mode name: hooks}); with them, the
    attn2 processor of the pass: the job's session, chained with the processors modes add. The first
    failure becomes the session's pending error, and the modes after it do not start."""
    hooks: dict[str, Any] = {}
    processors = [job.session]
    for mode in modes:
        if job.session.pending_error is not None:
            break
        try:
            installed = mode.begin_pass(job, hr_pass, noise)
            processor = mode.attention_processor(job, hr_pass) if mode.runs_in_pass(job.params, hr_pass) else None
        except MigcError as exc:
            job.session.pending_error = exc
        except Exception as exc:  # noqa: BLE001 - the WebUI would swallow it and sample without the mode
            job.session.pending_error = unexpected_error(f"{mode.title} could not start", exc)
        else:
            if installed is not None:
                hooks[mode.name] = installed
            if processor is not None:
                processors.append(processor)
    return hooks, chain(processors)
