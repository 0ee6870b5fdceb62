"""What every mode tells the job, so that :mod:`lib_migc.job` never names a mode.

A mode reads its own section of :class:`~lib_migc.params.MigcParams`, says whether the job asks for it,
why it cannot run on this model (a message for the user), which other modes it does not run beside (one
line, declared here instead of pairwise rules in the job), what it checks before sampling, and what it
frees when a job does not use it. The registry in :mod:`lib_migc.modes.registry` lists the modes in the
order their messages appear under the image.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

from ..params import MigcParams


class Mode:
    """The interface of one mode; defaults do nothing, so a mode overrides only what it needs."""

    #: Short name, as in the API (``mode`` value or section name).
    name: ClassVar[str] = ""
    #: How messages under the image call it.
    title: ClassVar[str] = ""
    #: Modes that do not run beside this one: when both are asked for, they are skipped with ``exclusion_reason``.
    excludes: ClassVar[tuple[str, ...]] = ()
    exclusion_reason: ClassVar[str] = ""
    #: Whether it fills *Show instance maps* when it is the first running mode that can (``job.maps_for``).
    draws_maps: ClassVar[bool] = False

    def asked(self, params: MigcParams) -> bool:
        """Whether the job's parameters ask for this mode."""
        raise NotImplementedError

    def turned_off(self, params: MigcParams) -> MigcParams:
        """The parameters with this mode off (it was declined or excluded); the others untouched."""
        raise NotImplementedError

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        """Why this mode cannot run on the job's model or host, for the user; None when it can."""
        return None

    def start(self, job: Any) -> None:
        """Checks and per-job values before sampling (the job's infotext fields, its prompts). Raises
        :class:`~lib_migc.core.errors.MigcError` to stop the job at its first UNet call."""

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        """Whether it acts in this sampling pass (``hr_pass``: the hires-fix pass)."""
        return not hr_pass

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> Any:
        """Prepare this pass and install the mode's own hooks on the job's ``p``; returns them (``install``,
        ``remove``, ``installed``, ``on_cfg_step(step, steps, params)``, and ``on_cfg_denoised(params)``
        where it blends after the model call), or None when the attention hooks every job installs are
        enough (the mode then sets its part on ``job.session``). Raising stops the job at its first UNet call."""
        return None

    def attention_processor(self, job: Any, hr_pass: bool) -> Any:
        """A processor for the attn2 slot of this pass, chained after the job's attention session
        (:mod:`lib_migc.core.attention_chain` says what it provides); None: the mode needs none."""
        return None

    def post_sample(self, job: Any, samples: Any) -> Any:
        """The sampler's result before the VAE decodes it (the WebUI's ``post_sample``); returns the samples
        to decode (the same object when the mode leaves them)."""
        return samples

    def release_unused(self, params: MigcParams | None) -> None:
        """Free what this mode keeps between jobs when the job (``params``; None: no extension job) does not use it."""

    def on_model_loaded(self, sd_model: Any) -> None:
        """The main model changed: drop what was paired with the previous one."""
