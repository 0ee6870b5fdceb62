"""What both hosts' hooks share: the job's lifetime checks, which layers to hook, the pending error, and
what a mode hands to the step-level hook points (:class:`StepHooksBase`)."""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn

from ..core.hook_points import BlendFn, DenoiseFn, SamplerInputFn
from ..core.patching import ForwardPatches
from ..core.unet_layers import layer_sort_key


class HooksBase:
    """``session``: the attn2 processor of the pass (the job's attention session, or a chain of processors,
    :mod:`lib_migc.core.attention_chain`); ``on_error`` runs before a pending error is raised;
    ``is_current`` tells whether the job that installed the hooks is still running (hooks left behind by a
    failed job then step aside)."""

    def __init__(
        self,
        session: Any,
        on_error: Callable[[], None] | None = None,
        is_current: Callable[[], bool] = lambda: True,
    ) -> None:
        self.session = session
        self.on_error = on_error
        self.is_current = is_current

    def remove(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def layers_to_hook(self, layers: Mapping[str, nn.Module]) -> list[str]:
        """The session's layers in UNet order; with a pending error, the first layer is enough to raise it."""
        names = sorted(self.session.hooked_layers(list(layers)), key=layer_sort_key)
        if not names and self.session.pending_error is not None:
            names = sorted(layers, key=layer_sort_key)[:1]
        return names

    def release(self) -> None:
        """Take every hook of the job away and let the job go (its session and tensors with it)."""
        self.remove()
        if self.on_error is not None:
            self.on_error()

    def raise_pending_error(self) -> None:
        """Stop the job with the error found before sampling, after taking every hook away."""
        error = self.session.pending_error
        if error is None:
            return
        self.release()
        raise error

    def guarded(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook`` that releases the job when it raises (an error, out of memory, an interrupt), so a
        failed job leaves nothing installed or held until the next one."""
        @functools.wraps(hook)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return hook(*args, **kwargs)
            except BaseException:
                self.release()
                raise

        return call


def weak_patch(owner: Any, method: Callable[..., Any], inert: Callable[..., Any]) -> Callable[..., Any]:
    """A patch function for a host object that outlives the job: it calls ``method(owner, ...)`` through a
    weak reference, and ``inert(...)`` once the owner is gone or removed.

    Why: Forge keeps the UnetPatcher clones it sampled (``current_loaded_models``, emptied only when it
    needs memory, on a CPU host never), and a clone keeps its patch functions. A patch that held its
    hooks strongly would keep the job's session, the MIGC weights and model B alive after the job.
    ``owner`` offers ``live()`` (installed and its job still current); its ``release``, if any, runs when
    the method raises, so a failed job leaves nothing held.
    """
    ref = weakref.ref(owner)

    def call(*args: Any, **kwargs: Any) -> Any:
        hooks = ref()
        if hooks is None or not hooks.live():
            return inert(*args, **kwargs)
        try:
            return method(hooks, *args, **kwargs)
        except BaseException:
            release = getattr(hooks, "release", None)
            if release is not None:
                release()
            raise

    return call


def pass_size(p: Any, hr_pass: bool) -> tuple[int, int]:
    """(width, height) in pixels of a job's first pass or of its hires pass (both hosts name them alike)."""
    return (p.hr_upscale_to_x, p.hr_upscale_to_y) if hr_pass else (p.width, p.height)


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


class ClonePatches:
    """What a Forge pass's patches share: installed on a clone of the job's UnetPatcher, made inert by
    :meth:`remove` (Forge drops the clone itself), ``live`` only while their job is the current one."""

    def __init__(self, is_current: Callable[[], bool] = lambda: True) -> None:
        self.is_current = is_current
        self._active = False

    @property
    def installed(self) -> bool:
        return self._active

    def live(self) -> bool:
        return self._active and self.is_current()

    def remove(self) -> None:
        self._active = False


class StepHooksBase:
    """One mode's functions at the step-level hook points of one pass (:mod:`lib_migc.core.hook_points`):
    ``denoise`` at the denoiser's model call, ``blend`` at the CFG blend step (either may be None),
    ``modules`` that must sit beside the main UNet during sampling (MagicFusion's model B). ``title``
    names the mode in messages; ``raise_pending`` raises the job's pending error at the first call;
    ``runtime`` is the mode's per-pass object, kept here only so tests and tools can reach it.

    Each host subclasses it once (``hosts/<host>.StepHooks``) and does the row bookkeeping there; a mode
    builds it through the host module it is handed (``job.host.StepHooks(...)``) and never sees a host object.
    """

    def __init__(
        self,
        title: str,
        denoise: DenoiseFn | None = None,
        blend: BlendFn | None = None,
        modules: Sequence[nn.Module] = (),
        is_current: Callable[[], bool] = lambda: True,
        raise_pending: Callable[[], None] = lambda: None,
        runtime: Any = None,
    ) -> None:
        self.title, self.denoise, self.blend, self.modules = title, denoise, blend, tuple(modules)
        self.runtime = runtime
        self.is_current, self.raise_pending = is_current, raise_pending
        self.step = 0

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """The CFG-denoiser callback: the step that the next model calls and the next blend belong to."""
        self.step = step

    def on_cfg_denoised(self, params: Any) -> None:
        """A1111's CFG-denoised callback (the blend step there); Forge blends in its post-CFG function."""


class SamplerInputHooks:
    """The sampler's latent before each evaluation of the CFG denoiser, on both hosts.

    Why the CFG denoiser's ``forward`` (``p.sampler.model_wrap_cfg``, an instance attribute like the
    other overrides): the samplers call it with their own latent tensor, and everything they do after
    the call (the derivative, the update) reads that same tensor. Changing it in place therefore changes
    the step's starting point for every sampler, first- or second-order, k-diffusion or timestep, which
    a change of the denoiser's output could only do sampler by sampler. Another extension's override of
    that ``forward`` is chained, and :meth:`remove` puts it back.
    """

    def __init__(self, on_input: SamplerInputFn, is_current: Callable[[], bool] = lambda: True) -> None:
        self.on_input, self.is_current = on_input, is_current
        self._patches = ForwardPatches()

    @property
    def installed(self) -> bool:
        return self._patches.active

    def install(self, p: Any) -> None:
        self.remove()
        denoiser = p.sampler.model_wrap_cfg
        original = denoiser.forward
        hooks = self

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if hooks.installed and hooks.is_current() and getattr(x, "dim", lambda: 0)() == 4:
                try:
                    hooks.on_input(x)
                except BaseException:
                    hooks.remove()
                    raise
            return original(x, *args, **kwargs)

        self._patches.install(denoiser, forward)

    def remove(self) -> None:
        self._patches.remove()

    def on_cfg_step(self, step: int, total_steps: int, params: Any) -> None:
        """Nothing: the hook counts evaluations itself."""
