"""Host-neutral job logic: the sampler step, host detection, prompt convention."""
from types import SimpleNamespace

import pytest

from lib_migc.hosts.base import sampler_step
from lib_migc.params import step_limit, with_descriptions_appended


def params(step, total, evaluation=None, evaluations=None):
    denoiser = SimpleNamespace(step=evaluation, total_steps=evaluations) if evaluation is not None else None
    return SimpleNamespace(sampling_step=step, total_sampling_steps=total, denoiser=denoiser)


def test_one_evaluation_samplers_use_the_denoisers_own_count():
    # The WebUI's progress counter lags one step behind during a model call; the denoiser's does not.
    assert [sampler_step(params(max(i - 1, 0), 20, i, 20))[0] for i in range(20)] == list(range(20))


def test_second_order_samplers_map_two_evaluations_onto_one_step():
    steps = 10
    evaluations = 2 * steps - 1  # Heun: two per step, one for the last
    mapped = [sampler_step(params(0, steps, k, evaluations))[0] for k in range(evaluations)]
    assert mapped[:2] == [0, 0] and mapped[-1] == steps - 1
    assert all(b - a in (0, 1) for a, b in zip(mapped, mapped[1:]))
    assert sorted(set(mapped)) == list(range(steps))


def test_without_a_denoiser_counter_the_progress_step_is_used():
    assert sampler_step(params(7, 20)) == (7, 20)


@pytest.mark.parametrize("fraction,steps,last", [(0.5, 50, 25), (0.5, 20, 10), (1.0, 20, 20), (0.0, 20, -1), (0.04, 20, 1)])
def test_step_limit_matches_the_official_inclusive_convention(fraction, steps, last):
    assert step_limit(fraction, steps) == last


@pytest.mark.parametrize("prompt,expected", [
    ("", "a cat, a dog"),
    ("a room", "a room, a cat, a dog"),
    ("a room,", "a room, a cat, a dog"),
    ("A CAT in a room", "A CAT in a room, a dog"),
])
def test_descriptions_are_appended_only_when_missing(prompt, expected):
    assert with_descriptions_appended(prompt, ["a cat", "a dog"]) == expected


def test_host_detection_defaults_to_a1111_without_forge():
    from lib_migc import hosts

    assert not hosts.is_forge()
    assert hosts.current().__name__.endswith("a1111")
