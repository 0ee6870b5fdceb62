"""A mode written here, in the tests, and registered like any other: it scales the cond rows of one attn2
layer. It runs on both host adapters through the modes' interface (``modes/base.py``), with no change to
``job.py`` or the hosts, and its effect equals the same scaling applied by a plain PyTorch hook."""
from dataclasses import replace

import pytest
import torch

import fake_forge
from conftest import INSTANCES
from helpers import finish_job, start_job
from lib_migc.hosts import a1111, forge
from lib_migc.modes import registry
from lib_migc.modes.base import Mode
from test_forge import a1111_step, forge_p, forge_step, inputs
from test_lifecycle import a1111_p

LAYER, FACTOR = "output_blocks.4.1", 1.5
#: The panel on with a layout whose own shading does nothing (naive fuser for 0 steps): only the toy acts.
ARGS = ({"enabled": True, "mode": "naive", "weights": "none.ckpt", "instances": INSTANCES,
         "migc_steps": 0.0, "naive_steps": 0.0},)


class ScaleCondRows:
    """The toy's attn2 processor: the layer's own output for the cond rows, times ``factor``."""

    pending_error = None

    def __init__(self, layer: str, factor: float) -> None:
        self.layer, self.factor = layer, factor

    def hooked_layers(self, available):
        return [self.layer] if self.layer in available else []

    def set_step(self, step, total_steps):
        pass

    def mode_for(self, layer):
        return layer == self.layer

    def is_shaded(self, token):
        return bool(token)

    def shade(self, layer, attn, plain, x, context, images, token):
        return plain(x, context) * self.factor


class ScaleOneLayer(Mode):
    name, title = "toy", "Toy"

    def asked(self, params):
        return params.enabled

    def turned_off(self, params):
        return replace(params, enabled=False)

    def runs_in_pass(self, params, hr_pass):
        return not hr_pass

    def attention_processor(self, job, hr_pass):
        return ScaleCondRows(LAYER, FACTOR)


@pytest.fixture()
def toy():
    mode = ScaleOneLayer()
    registry.register(mode)
    yield mode
    registry.MODES.remove(mode)


def _scaled_by_hook(unet, cond_rows):
    """The reference: a PyTorch forward hook on the layer's output projection scales the cond rows."""
    to_out = dict(unet.named_modules())[f"{LAYER}.transformer_blocks.0.attn2"].to_out

    def scale(module, inputs, output):
        output = output.clone()
        output[cond_rows] = output[cond_rows] * FACTOR
        return output

    return to_out.register_forward_hook(scale)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_a_mode_registered_from_the_tests_runs_on_both_hosts(webui_modules, unet, text_model, toy, host):
    x, cond, uncond = inputs(1)
    with fake_forge.backend_modules():
        if host == "a1111":
            p, run, module, cond_rows = a1111_p(unet, text_model), a1111_step, a1111, [0]
        else:
            p, run, module, cond_rows = forge_p(unet, text_model), forge_step, forge, [1]  # Forge: uncond rows first
        plain = run(forge_p(unet, text_model) if host == "forge" else a1111_p(unet, text_model), x, cond, uncond)
        handle = _scaled_by_hook(unet, cond_rows)
        try:
            expected = run(forge_p(unet, text_model) if host == "forge" else a1111_p(unet, text_model), x, cond, uncond)
        finally:
            handle.remove()
        start_job(p, ARGS, module)
        out = run(p, x, cond, uncond)
        finish_job(p)
    assert (expected[0] - plain[0]).abs().amax() > 1e-4, "the scaling changes the cond rows' prediction"
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)  # the uncond rows are the layer's own


def test_the_toy_leaves_when_it_is_unregistered(webui_modules, unet, text_model):
    x, cond, uncond = inputs(1)
    plain = a1111_step(a1111_p(unet, text_model), x, cond, uncond)
    p = a1111_p(unet, text_model)
    start_job(p, ARGS, a1111)
    out = a1111_step(p, x, cond, uncond)
    finish_job(p)
    assert all(mode.name != "toy" for mode in registry.MODES)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
