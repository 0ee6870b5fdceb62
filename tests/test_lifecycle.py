"""What a job leaves behind: nothing it no longer needs. Model B goes with any job that does not use it and
with a change of the main model; a failed job lets go of its session and hooks; any unreadable argument
stops the job instead of quietly generating without MIGC."""
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from conftest import INSTANCES
from helpers import finish_job, start_job
from lib_migc import job
from lib_migc.core import settings
from lib_migc.core.errors import MigcError
from lib_migc.hosts import a1111, forge
from lib_migc.modes.magicfusion.runtime import MODEL_B
from lib_migc.modes.migc import weights_store
from lib_migc.params import MigcParams


def migc_args(**overrides):
    data = {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0}
    data.update(overrides)
    return (data,)


def a1111_p(unet, text_model, family="sd1"):
    model = fake_webui.FakeSDModel(unet, text_model, family)
    return fake_webui.FakeProcessing(model, prompts=["a room"])


def cfg_step(p, step=0, total=4, seed=0):
    """One A1111 CFG step (cond row, uncond row) through the hooked UNet; its output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 32, 32), generator=g)
    cond, uncond = torch.randn((1, 77, 768), generator=g), torch.randn((1, 77, 768), generator=g)
    params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, step, total, cond, uncond,
                                          denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    with torch.no_grad():
        return p.sd_model.model.diffusion_model(torch.cat([x, x]), torch.full((2,), 500.0), context=torch.cat([cond, uncond]))


def instance_forwards(unet):
    return [name for name, module in unet.named_modules() if "forward" in module.__dict__]


def _hold_model_b():
    """Put a stand-in model B in the cache; a weak reference to it tells when it is really freed."""
    held = MODEL_B.get(("b.safetensors", 0, 1), lambda: torch.nn.Linear(4, 4))
    return weakref.ref(held)


# ------------------------------------------------------------------------------------------ model B
@pytest.mark.parametrize("args", [(), (False,), ({"enabled": False},), migc_args()], ids=["no-args", "panel-off", "dict-off", "migc-only"])
def test_model_b_is_freed_by_any_job_without_magicfusion(webui_modules, unet, text_model, args):
    ref = _hold_model_b()
    p = a1111_p(unet, text_model)
    start_job(p, args)
    finish_job(p)
    gc.collect()
    assert not MODEL_B.loaded and ref() is None


def test_model_b_is_freed_when_magicfusion_is_declined_for_the_model(webui_modules, unet, text_model):
    ref = _hold_model_b()
    p = a1111_p(unet, text_model, family="sdxl")
    start_job(p, ({"enabled": False, "magicfusion": {"enabled": True, "model_b": "b"}},))
    assert any("MagicFusion was skipped" in c for c in p.comments)
    finish_job(p)
    gc.collect()
    assert ref() is None


def test_a_new_main_model_frees_model_b_and_frees_the_weights_only_when_migc_cannot_use_it(webui_modules, unet, text_model):
    path = weights_store.resolve(settings.models_dir(), "tiny.safetensors")
    ref = _hold_model_b()
    weights_store.load_cached(path, torch.device("cpu"), torch.float32)
    job.on_model_loaded(fake_webui.FakeSDModel(unet, text_model, "sd1"))
    gc.collect()
    assert ref() is None and weights_store.loaded(), "another SD1 model: MIGC's weights still apply"
    job.on_model_loaded(fake_webui.FakeSDModel(unet, text_model, "sdxl"))
    assert not weights_store.loaded()
    weights_store.load_cached(path, torch.device("cpu"), torch.float32)
    import modules.shared

    modules.shared.opts.migc_keep_weights = True
    job.on_model_loaded(fake_webui.FakeSDModel(unet, text_model, "sdxl"))
    assert weights_store.loaded(), "the setting keeps them"
    weights_store.unload()


def test_the_script_registers_the_model_change_callback(webui_modules):
    import importlib.util
    import sys

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("migc_script_under_test", str(REPO / "scripts" / "migc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop(spec.name, None)
    registered = sys.modules["modules.script_callbacks"].registered
    assert job.on_model_loaded in registered["model_loaded"]
    from lib_migc import xyz_axes

    assert xyz_axes.register in registered["before_ui"] and len(registered["app_started"]) == 1


# ------------------------------------------------------------------------------------------ failures
def test_a_job_that_fails_outside_our_hooks_is_released_when_the_webui_closes_it(webui_modules, unet, text_model):
    p = a1111_p(unet, text_model)
    start_job(p, migc_args())
    cfg_step(p)
    session = weakref.ref(job.active_job().session)
    assert instance_forwards(unet)
    # ... an error elsewhere (VAE out of memory, another extension): no postprocess, but the WebUI closes p
    p.close()
    gc.collect()
    assert job.active_job() is None and session() is None
    assert instance_forwards(unet) == []


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_an_error_inside_a_hook_releases_the_job_and_the_next_image_is_plain(webui_modules, unet, text_model, monkeypatch, host):
    from lib_migc.modes.migc.session import MigcSession

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    x, cond, uncond = torch.randn((1, 4, 32, 32)), torch.randn((1, 77, 768)), torch.randn((1, 77, 768))
    if host == "a1111":
        reference = cfg_step(a1111_p(unet, text_model))
        p = a1111_p(unet, text_model)
        start_job(p, migc_args())
        monkeypatch.setattr(MigcSession, "shade", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            cfg_step(p)
        assert instance_forwards(unet) == []
        monkeypatch.undo()
        assert torch.equal(cfg_step(a1111_p(unet, text_model)), reference)
    else:
        with fake_forge.backend_modules():
            plain_p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet, text_model), prompts=["a room"])
            reference = fake_forge.run_unet(plain_p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
            p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet, text_model), prompts=["a room"])
            start_job(p, migc_args(), forge)
            job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, torch.ones(1), 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
            monkeypatch.setattr(MigcSession, "shade", broken)
            with pytest.raises(RuntimeError, match="simulated"):
                fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
            monkeypatch.undo()
            # the job's patched clone stays on this p; the hooks in it are inert now
            again = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
            assert torch.equal(again, reference)
    assert job.active_job() is None


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("args,needle", [
    (("true",), "'enabled' must be true or false"),
    ((1, "tiny.safetensors"), "'enabled' must be true or false"),
    (({"enabled": True, "structure": "yes"},), "structure"),
    ((True, "tiny.safetensors", '{"instances": []}', "half"), "migc_steps"),
])
def test_arguments_that_ask_for_migc_in_a_wrong_form_stop_the_job(webui_modules, unet, text_model, args, needle):
    p = a1111_p(unet, text_model)
    start_job(p, args)
    with pytest.raises(MigcError) as info:
        cfg_step(p)
    assert info.value.status_code == 422 and needle in str(info.value)
    assert job.active_job() is None and instance_forwards(unet) == []


def test_any_exception_while_reading_the_arguments_is_a_4xx_not_a_silent_plain_image(webui_modules, unet, text_model, monkeypatch):
    def crash(*args):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(MigcParams, "from_ui", classmethod(lambda cls, *args: crash(*args)))
    p = a1111_p(unet, text_model)
    start_job(p, migc_args())
    with pytest.raises(MigcError) as info:
        cfg_step(p)
    assert info.value.status_code == 422
    assert "could not be read" in str(info.value) and "TypeError" in str(info.value)
    assert job.active_job() is None


def test_an_unexpected_failure_while_starting_is_reported_as_500(webui_modules, unet, text_model, monkeypatch):
    monkeypatch.setattr(job, "effective_params", lambda *a: (_ for _ in ()).throw(KeyError("sd_checkpoint_info")))
    p = a1111_p(unet, text_model)
    start_job(p, migc_args())
    with pytest.raises(MigcError) as info:
        cfg_step(p)
    assert info.value.status_code == 500 and "KeyError" in str(info.value)


def test_the_migc_weights_go_with_a_job_that_does_not_use_them_unless_kept(webui_modules, unet, text_model):
    p = a1111_p(unet, text_model)
    start_job(p, migc_args())
    cfg_step(p)
    finish_job(p)
    assert weights_store.loaded(), "cached for the next MIGC job"
    start_job(a1111_p(unet, text_model), migc_args())
    assert weights_store.loaded()
    start_job(a1111_p(unet, text_model), migc_args(mode="naive"))
    assert not weights_store.loaded(), "a naive job needs no weights"
    import modules.shared

    modules.shared.opts.migc_keep_weights = True
    p = a1111_p(unet, text_model)
    start_job(p, migc_args())
    cfg_step(p)
    start_job(a1111_p(unet, text_model), (False,))
    assert weights_store.loaded(), "the setting keeps them"
    weights_store.unload()


# ------------------------------------------------------------------ Forge keeps the clones it sampled
@pytest.mark.parametrize("data", [{}, {"mode": "naive", "migc_steps": 0.0, "naive_steps": 1.0},
                                  {"mode": "multidiffusion", "md_bootstrap": 0.0}], ids=["migc", "naive", "multidiffusion"])
def test_forges_kept_clones_hold_nothing_of_a_finished_job(webui_modules, unet, text_model, data):
    """Forge's memory manager keeps the UnetPatcher clone it sampled (and so our patches) in
    ``current_loaded_models`` after the job; on a CPU host it never lets it go. What the job held (its
    session, the MIGC weights, the region runtime) must still be freed by the next job."""
    import sys

    with fake_forge.backend_modules():
        p = fake_forge_p(unet, text_model)
        start_job(p, migc_args(**data), forge)
        fake_forge.sampling_prepare(p.sd_model.forge_objects.unet)
        active = job.active_job()
        regions = active.hooks.get("multidiffusion")
        held = [weakref.ref(active.session)] + ([weakref.ref(regions.runtime)] if regions else [])
        del regions
        del active
        finish_job(p)
        sampled = p.sd_model.forge_objects.unet
        loaded = sys.modules["backend.memory_management"].current_loaded_models
        del p
        start_job(fake_forge_p(unet, text_model), (False,), forge)
        gc.collect()
        assert any(entry.model is sampled for entry in loaded), "Forge still holds the sampled clone"
        assert [ref() for ref in held] == [None] * len(held)


def fake_forge_p(unet, text_model):
    p = fake_webui.FakeProcessing(fake_forge.ForgeSDModel(unet, text_model), seeds=[100], prompts=["a room"])
    p.steps = 4
    return p


# ------------------------------------------------------------------ the user's random state
def test_loading_the_weights_or_model_b_leaves_the_global_rng_where_it_was(webui_modules):
    """Both WebUIs draw from the global RNG (img2img samples the VAE posterior with it), so an image must
    not depend on whether the MIGC weights or model B were already cached when its job started."""
    weights_store.unload()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    weights_store.load_cached(str(webui_modules / "tiny.safetensors"), torch.device("cpu"), torch.float32)
    assert weights_store.loaded()
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(123)
    MODEL_B.get(("b.safetensors", 0, 2), lambda: torch.nn.Linear(64, 64))
    assert torch.equal(torch.rand(4), expected)
    MODEL_B.clear()
    weights_store.unload()
