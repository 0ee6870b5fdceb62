"""The MagicFusion settings of a job: which second model, its prompt, the temperatures and the window.

Nested under ``"magicfusion"`` in the API dict and the infotext, and appended to the panel's fields,
like StructureDiffusion. Torch-free (the panel imports it): the blend itself is
:mod:`lib_migc.modes.magicfusion.method`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ...core.errors import MigcError

#: Window modes, by the official ``merge_mode`` number they correspond to.
A_THEN_SNB = "A-then-SNB"  # official mode 1: t > switch_t -> A only; t <= switch_t -> SNB
SNB_THEN_A = "SNB-then-A"  # official mode 2: t > switch_t -> SNB;    t <= switch_t -> A only
WINDOW_MODES = (A_THEN_SNB, SNB_THEN_A)
OFFICIAL_MERGE_MODES = {1: A_THEN_SNB, 2: SNB_THEN_A}

NUM_TRAIN_TIMESTEPS = 1000
K_UI_RANGE = (0.1, 10.0)


def _fail(field: str, allowed: str, value: Any) -> MigcError:
    return MigcError(f"MagicFusion: '{field}' must be {allowed}, got {value!r}.")


def _positive_float(field: str, value: Any) -> float:
    """A finite float > 0; bools and strings are refused rather than coerced."""
    lo, hi = K_UI_RANGE
    allowed = f"a finite number > 0 (the UI offers {lo:g}–{hi:g})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, allowed, value)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise _fail(field, allowed, value)
    return value


def _timestep_threshold(field: str, value: Any) -> int:
    """An integer DDPM timestep 0..1000 (an integral float such as 600.0 is accepted)."""
    allowed = f"an integer DDPM timestep in 0..{NUM_TRAIN_TIMESTEPS}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, allowed, value)
    if isinstance(value, float) and not value.is_integer():
        raise _fail(field, allowed, value)
    value = int(value)
    if not 0 <= value <= NUM_TRAIN_TIMESTEPS:
        raise _fail(field, allowed, value)
    return value


def _window_mode(field: str, value: Any) -> str:
    """A canonical window-mode name; the official ``merge_mode`` numbers 1 and 2 are accepted too."""
    allowed = f"one of {', '.join(repr(m) for m in WINDOW_MODES)} (official merge_mode 1 or 2)"
    if isinstance(value, int) and not isinstance(value, bool) and value in OFFICIAL_MERGE_MODES:
        return OFFICIAL_MERGE_MODES[value]
    if isinstance(value, str):
        for mode in WINDOW_MODES:
            if value.strip().lower() == mode.lower():
                return mode
    raise _fail(field, allowed, value)


@dataclass(frozen=True)
class FusionWindow:
    """When SNB is active, as a DDPM-timestep threshold (the official ``v1``), compared strictly greater.

    ``A-then-SNB`` (official mode 1): A alone while ``t > switch_t`` (A lays out the composition),
    SNB once ``t <= switch_t``. ``SNB-then-A`` (mode 2): SNB while ``t > switch_t``, then A alone refines.
    """

    window_mode: str = SNB_THEN_A
    switch_t: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_mode", _window_mode("window_mode", self.window_mode))
        object.__setattr__(self, "switch_t", _timestep_threshold("switch_t", self.switch_t))


@dataclass(frozen=True)
class MagicFusionParams:
    """The numeric user parameters of the mode (spec parameter table); validated on construction.

    ``k_a``/``k_b`` are the per-model softmax temperatures (the paper's k_g, k_e); the effective
    temperature is ``k·CFG scale``. Model choice, prompt B and the hires switch are host concerns.
    """

    k_a: float = 1.0
    k_b: float = 1.0
    window_mode: str = SNB_THEN_A
    switch_t: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_a", _positive_float("k_a", self.k_a))
        object.__setattr__(self, "k_b", _positive_float("k_b", self.k_b))
        window = FusionWindow(self.window_mode, self.switch_t)
        object.__setattr__(self, "window_mode", window.window_mode)
        object.__setattr__(self, "switch_t", window.switch_t)

    @property
    def window(self) -> FusionWindow:
        return FusionWindow(self.window_mode, self.switch_t)

    @classmethod
    def from_official(cls, fusion_selection: str, merge_mode: int) -> MagicFusionParams:
        """Parameters from the official CLI pair, e.g. ``("600,1,1", 2)`` (``v1,k_a,k_b`` and mode)."""
        parts = [p.strip() for p in str(fusion_selection).split(",")]
        if len(parts) != 3:
            raise _fail("fusion_selection", "three comma-separated numbers 'switch_t,k_a,k_b'", fusion_selection)
        try:
            switch_t, k_a, k_b = (float(p) for p in parts)
        except ValueError:
            raise _fail("fusion_selection", "three comma-separated numbers 'switch_t,k_a,k_b'", fusion_selection) from None
        return cls(k_a=k_a, k_b=k_b, window_mode=merge_mode, switch_t=switch_t)


# ------------------------------------------------------------------------------------ fusion window
def fused_at_timestep(t: float, window: FusionWindow) -> bool:
    """Whether SNB applies at DDPM timestep ``t`` (fractional with k-diffusion/Karras schedules).

    Hosts that know the timestep the UNet actually sees (``sigma_to_t(σ)``) should gate with this.
    """
    if window.window_mode == A_THEN_SNB:
        return t <= window.switch_t
    return t > window.switch_t


def ddim_timestep(step: int, total_steps: int) -> int:
    """The integer DDPM timestep of sampler step ``step`` (0 = first, noisiest) on the official grid.

    The official DDIM (and A1111's timestep samplers with the default 'uniform' discretisation) use
    ``range(0, 1000, 1000 // steps) + 1`` walked backwards: step i sees
    ``t = (steps − 1 − i)·(1000 // steps) + 1`` (991, 981, …, 1 for 100 steps; 981 … 1 for 50).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or not 1 <= total_steps <= NUM_TRAIN_TIMESTEPS:
        raise _fail("steps", f"an integer in 1..{NUM_TRAIN_TIMESTEPS}", total_steps)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total_steps:
        raise _fail("step", f"an integer in 0..{total_steps - 1}", step)
    return (total_steps - 1 - step) * (NUM_TRAIN_TIMESTEPS // total_steps) + 1


def in_fusion_window(step: int, total_steps: int, window: FusionWindow) -> bool:
    """Whether SNB applies at sampler step ``step`` of ``total_steps`` (official DDIM timestep grid).

    Exact for the official run and A1111's uniform timestep samplers. k-diffusion samplers visit other
    timesteps (Karras σ, fractional t), so there a host should gate on the t the UNet actually sees with
    :func:`fused_at_timestep`; this step form is what the UI uses to show "fused steps" for a step count.
    """
    return fused_at_timestep(ddim_timestep(step, total_steps), window)


def fused_step_count(total_steps: int, window: FusionWindow) -> int:
    """How many of ``total_steps`` steps are fused (what the UI shows next to ``switch_t``)."""
    return sum(in_fusion_window(i, total_steps, window) for i in range(total_steps))



SAME = "same"  # model B = the loaded model itself (recontextualisation: only prompt B differs)
KEYS = ("enabled", "model_b", "prompt_b", "k_a", "k_b", "window_mode", "switch_t", "hires", "model_b_hash")


@dataclass(frozen=True)
class FusionParams:
    """``model_b``: a checkpoint title from the WebUI's list, or ``"same"``; ``prompt_b`` empty = the
    main prompt. The loaded checkpoint is always model A (text encoder, VAE, and the noise outside the window)."""

    enabled: bool = False
    model_b: str = ""
    prompt_b: str = ""
    k_a: float = 1.0
    k_b: float = 1.0
    window_mode: str = SNB_THEN_A
    switch_t: int = 600
    hires: bool = False

    @property
    def numbers(self) -> MagicFusionParams:
        return MagicFusionParams(self.k_a, self.k_b, self.window_mode, self.switch_t)

    def to_api(self, model_b_hash: str | None = None) -> dict[str, Any]:
        out = {"enabled": self.enabled, "model_b": self.model_b, "prompt_b": self.prompt_b, "k_a": self.k_a, "k_b": self.k_b,
               "window_mode": self.window_mode, "switch_t": self.switch_t, "hires": self.hires}
        if model_b_hash:
            out["model_b_hash"] = model_b_hash
        return out

    @classmethod
    def from_api(cls, data: Any) -> "FusionParams":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise MigcError('MIGC: field \'magicfusion\' must be an object like {"enabled": true, "model_b": "<checkpoint>"}.')
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise MigcError(f"MagicFusion: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS[:-1])}.")
        for name in ("enabled", "hires"):
            if name in data and not isinstance(data[name], bool):
                raise MigcError(f"MagicFusion: field '{name}' must be true or false, got {data[name]!r}.")
        enabled = data.get("enabled", True)
        model_b, prompt_b = data.get("model_b", ""), data.get("prompt_b", "") or ""
        if not isinstance(model_b, str) or not isinstance(prompt_b, str):
            raise MigcError("MagicFusion: fields 'model_b' and 'prompt_b' must be strings.")
        if enabled and not model_b.strip():
            raise MigcError("MagicFusion: field 'model_b' is empty; pick the second checkpoint (a title from the WebUI's "
                            "checkpoint list) or \"same\" with a prompt B.")
        if enabled and model_b.strip() == SAME and not prompt_b.strip():
            raise MigcError("MagicFusion: model B \"same\" is the loaded model itself, so it needs a 'prompt_b' "
                            "(e.g. the subject without the scene) or there is nothing to fuse.")
        numbers = MagicFusionParams(data.get("k_a", 1.0), data.get("k_b", 1.0), data.get("window_mode", SNB_THEN_A),
                                    data.get("switch_t", 600))
        return cls(enabled=enabled, model_b=model_b.strip(), prompt_b=prompt_b.strip(), k_a=numbers.k_a, k_b=numbers.k_b,
                   window_mode=numbers.window_mode, switch_t=numbers.switch_t, hires=bool(data.get("hires", False)))

    @classmethod
    def from_ui(cls, enabled: Any, model_b: Any, prompt_b: Any, k_a: Any, k_b: Any, window_mode: Any, switch_t: Any,
                hires: Any) -> "FusionParams":
        if not enabled:
            return cls()
        return cls.from_api({"enabled": True, "model_b": model_b or "", "prompt_b": prompt_b or "",
                             "k_a": 1.0 if k_a is None else k_a, "k_b": 1.0 if k_b is None else k_b,
                             "window_mode": window_mode or SNB_THEN_A, "switch_t": 600 if switch_t is None else switch_t,
                             "hires": bool(hires)})

    def ui_values(self) -> list[Any]:
        return [self.enabled, self.model_b, self.prompt_b, self.k_a, self.k_b, self.window_mode, self.switch_t, self.hires]
