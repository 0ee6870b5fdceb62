"""Modes written here, in the tests, and registered like any other. One scales the cond rows of one attn2
layer (the attn2 slot); the other shifts the cond rows at the denoiser's model call and halves the uncond
rows at the CFG blend step (the two step-level hook points). Both run on both host adapters through the
modes' interface (``modes/base.py``), with no change to ``job.py`` or the hosts, and their effect equals
the same change written out by hand."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from conftest import INSTANCES
from lib_migc import job
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


def registered(mode):
    """``mode`` in the registry for one test, as an extension would register it."""
    registry.register(mode)
    yield mode
    registry.MODES.remove(mode)


@pytest.fixture()
def toy():
    yield from registered(ScaleOneLayer())


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


# ------------------------------------------------------------------------- the step-level hook points
SHIFT, HALF, GUIDANCE, SIGMA = 0.25, 0.5, 7.5, 2.0


class ShiftAndHalve(Mode):
    """The toy of the step-level hook points: +SHIFT on the cond rows the model returns, ×HALF on the
    uncond rows before the host's CFG combine."""

    name, title = "toy_step", "Toy step"

    def asked(self, params):
        return params.enabled

    def turned_off(self, params):
        return replace(params, enabled=False)

    def begin_pass(self, job_, hr_pass, noise):
        def denoise(rows):
            out = rows.plain().clone()
            cond = [row for row, is_cond in enumerate(rows.is_cond) if is_cond]
            out[cond] = out[cond] + SHIFT
            return out

        def blend(step):
            step.out[step.images:] = step.out[step.images:] * HALF
            return True

        hooks = job_.host.StepHooks(self.title, denoise=denoise, blend=blend, is_current=lambda: job_.is_current(hooks))
        hooks.install(job_.p)
        return hooks


@pytest.fixture()
def toy_step():
    yield from registered(ShiftAndHalve())


class KDenoiser(torch.nn.Module):
    """A1111's CompVisDenoiser around the fake model: k-space x and sigma in, x0 out (every sigma at t = 500)."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model

    def sigma_to_t(self, sigma):
        return torch.full_like(sigma, 500.0)

    def forward(self, input, sigma, **kwargs):
        eps = self.inner_model.apply_model(input / (SIGMA ** 2 + 1) ** 0.5, self.sigma_to_t(sigma), **kwargs)
        return input - SIGMA * eps


def a1111_cfg(p, x, cond, uncond):
    """A1111's CFGDenoiser.forward: the callback, the sampler's inner model on [cond; uncond], the
    denoised callback, then its CFG combine."""
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * x.shape[0],), SIGMA)
    denoiser = SimpleNamespace(p=p, sampler=SimpleNamespace(sampler_extra_args={"cond_scale": GUIDANCE}), cond_scale_miltiplier=1.0)
    job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x_in, None, sigma_in, 0, 4, cond, uncond, denoiser=denoiser))
    with torch.no_grad():
        out = p.sampler.model_wrap_cfg.inner_model(x_in, sigma_in, cond={"c_crossattn": [torch.cat([cond, uncond])]})
    job.on_cfg_denoised(fake_webui.CFGDenoisedParams(out, 0, 4, None))
    n = x.shape[0]
    return out[n:] + GUIDANCE * (out[:n] - out[n:]), out


def forge_cfg(p, x, cond, uncond):
    """Forge's sampling function (conditioning modifiers, the batched model call, CFG, post-CFG functions)."""
    sigma = torch.full((x.shape[0],), SIGMA)
    job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, sigma, 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
    entries = lambda ctx: [{"model_conds": {"c_crossattn": fake_forge.CONDCrossAttn(ctx)}}]  # noqa: E731
    with torch.no_grad():
        return fake_forge.sampling_function_inner(p.sd_model.forge_objects.unet, x, sigma, entries(uncond), entries(cond), GUIDANCE)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_a_mode_at_the_step_hook_points_runs_on_both_hosts(webui_modules, unet, text_model, toy_step, host):
    x, cond, uncond = inputs(2)
    with fake_forge.backend_modules():
        if host == "a1111":
            def make():
                p = a1111_p(unet, text_model)
                p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=KDenoiser(p.sd_model)))
                return p

            run, module = (lambda p: a1111_cfg(p, x, cond, uncond)[0]), a1111
            with torch.no_grad():  # the denoised rows, written out: x - σ·ε of the UNet at A1111's scaling
                eps = unet(torch.cat([x, x]) / (SIGMA ** 2 + 1) ** 0.5, torch.full((4,), 500.0),
                           context=torch.cat([cond, uncond]))
            plain_rows = torch.cat([x, x]) - SIGMA * eps
        else:
            make, run, module = (lambda: forge_p(unet, text_model, batch=2)), (lambda p: forge_cfg(p, x, cond, uncond)), forge
            kmodel = fake_forge.KModel(unet)
            with torch.no_grad():
                plain_rows = torch.cat([kmodel.apply_model(x, torch.full((2,), SIGMA), c_crossattn=ctx) for ctx in (cond, uncond)])
        plain = run(make())
        p = make()
        start_job(p, ARGS, module)
        out = run(p)
        finish_job(p)
        after = run(p)
    n = x.shape[0]
    cond_rows, uncond_rows = plain_rows[:n] + SHIFT, plain_rows[n:] * HALF
    expected = uncond_rows + GUIDANCE * (cond_rows - uncond_rows)
    assert (expected - plain).abs().amax() > 0.1, "the toy changes the step"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, plain_rows[n:] + GUIDANCE * (plain_rows[:n] - plain_rows[n:]), rtol=1e-5, atol=1e-4)
    assert torch.equal(after, plain), "after the job the host's step is its own again, bit for bit"
