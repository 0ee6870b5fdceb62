"""Different prompts per image in one batch (a prompt list, prompt S/R, dynamic prompts): every mode uses
each image's own prompt, so each image of the batch is the image it would be alone."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from conftest import INSTANCES
from helpers import finish_job, start_job
from lib_migc import job
from lib_migc.hosts import a1111, forge

PROMPTS = ["a red ball and a blue cube in a room", "a red ball and a blue cube on a beach"]
SEEDS = [100, 101]
ARGS = {
    "migc": {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0},
    "naive": {"enabled": True, "mode": "naive", "weights": "none.ckpt", "instances": INSTANCES},
    "structure": {"enabled": False, "instances": INSTANCES, "structure": {"enabled": True, "phrases": ["a red ball", "a blue cube"]}},
    "migc+structure": {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0,
                       "structure": {"enabled": True, "phrases": ["a red ball", "a blue cube"]}},
}


def _inputs(sd_model, prompts, seeds):
    x = torch.stack([torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(list(prompts))
        uncond = sd_model.get_learned_conditioning([""] * len(prompts))
    return x, cond, uncond


def _a1111_cond_rows(unet, text_model, data, prompts, seeds):
    model = fake_webui.FakeSDModel(unet, text_model)
    p = fake_webui.FakeProcessing(model, seeds=seeds, prompts=prompts)
    p.prompts = list(prompts)
    x, cond, uncond = _inputs(model, prompts, seeds)
    start_job(p, (data,))
    job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
    with torch.no_grad():
        out = unet(torch.cat([x, x]), torch.full((2 * len(seeds),), 500.0), context=torch.cat([cond, uncond]))
    finish_job(p)
    return out[:len(seeds)]


def _forge_cond_rows(unet, text_model, data, prompts, seeds):
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet, text_model)
        p = fake_webui.FakeProcessing(model, seeds=seeds, prompts=prompts)
        p.prompts = list(prompts)
        x, cond, uncond = _inputs(model, prompts, seeds)
        start_job(p, (data,), forge)
        job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, torch.ones(len(seeds)), 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
        out = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
        finish_job(p)
    return out[len(seeds):]


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("mode", list(ARGS))
def test_each_image_of_a_batch_uses_its_own_prompt(webui_modules, unet, text_model, mode, host):
    run = _a1111_cond_rows if host == "a1111" else _forge_cond_rows
    batch = run(unet, text_model, ARGS[mode], PROMPTS, SEEDS)
    singles = [run(unet, text_model, ARGS[mode], [prompt], [seed])[0] for prompt, seed in zip(PROMPTS, SEEDS)]
    for image in range(2):
        torch.testing.assert_close(batch[image], singles[image], rtol=1e-4, atol=1e-5)
    swapped = run(unet, text_model, ARGS[mode], PROMPTS[::-1], SEEDS)
    assert (swapped[0] - batch[0]).abs().amax() > 1e-4, "the prompt of image 0 matters"


def test_multidiffusion_uses_each_images_own_prompt_as_its_background(webui_modules, text_model):
    from test_multidiffusion_hosts import KDenoiser, _cfg_call, _model, _p
    from helpers import build_family_unet

    model = _model({"sd1": build_family_unet("sd1", seed=2)}, text_model, "sd1")
    data = {"enabled": True, "mode": "multidiffusion", "instances": INSTANCES, "md_bootstrap": 0.0, "weights": "absent.ckpt"}

    def rows(prompts, seeds):
        p = _p(model, KDenoiser, batch=len(seeds))
        p.seeds, p.all_prompts, p.prompts = list(seeds), list(prompts), list(prompts)
        x, cond, uncond = _inputs(model, prompts, seeds)
        job.before_process(p)
        job.process(p, (data,), a1111)
        job.before_sampling(p)
        out = _cfg_call(p, x, torch.full((len(seeds),), 2.0), cond, uncond, step=3)
        job.after_batch(p)
        job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
        return out[:len(seeds)]

    batch = rows(PROMPTS, SEEDS)
    for image, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        torch.testing.assert_close(batch[image], rows([prompt], [seed])[0], rtol=1e-4, atol=1e-5)
    assert (rows(PROMPTS[::-1], SEEDS)[0] - batch[0]).abs().amax() > 1e-4
