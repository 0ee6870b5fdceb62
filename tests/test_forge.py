"""The Forge adapter: same MIGC core through UnetPatcher patches, checked against the A1111 path."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from conftest import INSTANCES
from lib_migc import job
from lib_migc.core.errors import LayoutError
from lib_migc.hosts import a1111, forge



@pytest.fixture()
def webui(webui_modules):
    with fake_forge.backend_modules():
        yield


def args(**overrides):
    data = {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0}
    data.update(overrides)
    return (data,)


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 32, 32), generator=g)
    cond = torch.randn((batch, 77, 768), generator=g)
    uncond = torch.randn((batch, 77, 768), generator=g)
    return x, cond, uncond


def forge_p(unet, text_model, batch=1, family="sd1"):
    model = fake_forge.ForgeSDModel(unet, text_model, family)
    p = fake_webui.FakeProcessing(model, seeds=list(range(100, 100 + batch)), prompts=["a room"] * batch)
    return p


def forge_step(p, x, cond, uncond, step=0, total=4, cond_or_uncond=(1, 0)):
    """Forge's CFG step: the denoiser callback, then one UNet call with uncond rows first."""
    params = fake_webui.CFGDenoiserParams(x, None, torch.ones(x.shape[0]), step, total, cond, uncond, denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    parts = {0: (x, cond), 1: (x, uncond)}
    rows = torch.cat([parts[c][0] for c in cond_or_uncond])
    ctx = torch.cat([parts[c][1] for c in cond_or_uncond])
    out = fake_forge.run_unet(p.sd_model.forge_objects.unet, rows, ctx, cond_or_uncond)
    b = x.shape[0]
    return {c: out[i * b:(i + 1) * b] for i, c in enumerate(cond_or_uncond)}


def a1111_step(p, x, cond, uncond, step=0, total=4):
    params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, step, total, cond, uncond, denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    with torch.no_grad():
        out = p.sd_model.model.diffusion_model(torch.cat([x, x]), torch.full((2 * x.shape[0],), 500.0), context=torch.cat([cond, uncond]))
    return {0: out[:x.shape[0]], 1: out[x.shape[0]:]}


def run_job(host, p, step_fn, data, steps=2, **kw):
    job.before_process(p)
    job.process(p, args(**data), host)
    job.before_sampling(p)
    outs = [step_fn(p, *kw["inputs"], step=s) for s in range(steps)]
    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    return outs


@pytest.mark.parametrize("data", [{}, {"migc_steps": 0.0, "naive_steps": 1.0}], ids=["migc", "naive"])
def test_forge_and_a1111_give_the_same_cond_rows(webui, unet, text_model, data):
    """One attention implementation: the Forge patches produce what the A1111 hooks produce."""
    batch = 2
    x, cond, uncond = inputs(batch)
    p_forge = forge_p(unet, text_model, batch)
    forge_outs = run_job(forge, p_forge, forge_step, data, inputs=(x, cond, uncond))
    p_a1111 = fake_webui.FakeProcessing(fake_webui.FakeSDModel(unet, text_model), seeds=p_forge.seeds, prompts=["a room"] * batch)
    a1111_outs = run_job(a1111, p_a1111, a1111_step, data, inputs=(x, cond, uncond))
    plain_patcher = fake_forge.UnetPatcher(SimpleNamespace(diffusion_model=unet))
    plain_uncond = fake_forge.run_unet(plain_patcher, x, uncond, (1,))
    plain_cond = fake_forge.run_unet(plain_patcher, x, cond, (0,))
    for f, a in zip(forge_outs, a1111_outs):
        torch.testing.assert_close(f[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f[1], plain_uncond, rtol=1e-4, atol=1e-5)
        assert (f[0] - plain_cond).abs().amax() > 1e-3


def test_install_registers_on_a_clone_and_leaves_the_original_patcher_alone(webui, unet, text_model):
    p = forge_p(unet, text_model)
    original = p.sd_model.forge_objects.unet
    job.before_process(p)
    job.process(p, args(), forge)
    job.before_sampling(p)
    clone = p.sd_model.forge_objects.unet
    assert clone is not original and clone.model is original.model
    assert original.model_options == {"transformer_options": {}}
    options = clone.model_options["transformer_options"]
    assert set(options["patches_replace"]["attn2"]) == {("middle", 0, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)}
    assert len(options["patches"]["attn2_patch"]) == 1 and len(options["patches"]["attn2_output_patch"]) == 1
    assert clone.clone().model_options["transformer_options"]["patches"]["attn2_patch"][0] is options["patches"]["attn2_patch"][0]
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def test_cfg1_batches_without_uncond_rows(webui, unet, text_model):
    """Forge's hires pass defaults to CFG 1: only cond rows, cond_or_uncond == [0]."""
    x, cond, uncond = inputs(2)
    p = forge_p(unet, text_model, batch=2)
    outs = run_job(forge, p, lambda p, x, c, u, step: forge_step(p, x, c, u, step=step, cond_or_uncond=(0,)), {}, inputs=(x, cond, uncond))
    plain = fake_forge.run_unet(fake_forge.UnetPatcher(SimpleNamespace(diffusion_model=unet)), x, cond, (0,))
    assert (outs[0][0] - plain).abs().amax() > 1e-3


def test_vanilla_steps_and_inert_patches_are_exactly_plain(webui, unet, text_model):
    x, cond, uncond = inputs(1)
    p = forge_p(unet, text_model)
    plain = forge_step(p, x, cond, uncond)
    outs = run_job(forge, p, forge_step, {"migc_steps": 0.25}, steps=4, inputs=(x, cond, uncond))
    assert not torch.equal(outs[0][0], plain[0])
    assert torch.equal(outs[2][0], plain[0]) and torch.equal(outs[3][0], plain[0])
    # The clone stays on p after the job (Forge resets it next job); its patches are inert now.
    after = forge_step(p, x, cond, uncond)
    assert torch.equal(after[0], plain[0]) and torch.equal(after[1], plain[1])


def test_layout_error_is_raised_at_the_first_unet_call(webui, unet, text_model):
    x, cond, uncond = inputs(1)
    p = forge_p(unet, text_model)
    job.before_process(p)
    job.process(p, args(instances=[{"description": "x", "box": [0.6, 0, 0.2, 1]}]), forge)
    job.before_sampling(p)
    with pytest.raises(LayoutError, match=r"instances\[0\].*x1"):
        forge_step(p, x, cond, uncond)
    assert job.active_job() is None


def test_sdxl_declines_on_forge_too(webui, unet, text_model):
    p = forge_p(unet, text_model, family="sdxl")
    job.before_process(p)
    job.process(p, args(), forge)
    assert any("needs an SD1.x checkpoint" in c for c in p.comments) and job.active_job() is None


def test_forge_encoding_reads_the_pooled_state_of_its_text_engine(webui, unet, text_model):
    from lib_migc.core.text_encoding import encode_phrases

    model = fake_forge.ForgeSDModel(unet, text_model)
    contexts, pooled = encode_phrases(model, ["a red ball", "a cube"])
    tokens = torch.tensor([model.text_processing_engine.tokenize_chunks(t)[0] for t in ["a red ball", "a cube"]])
    torch.testing.assert_close(pooled, text_model(input_ids=tokens).pooler_output)
    assert contexts.shape == (2, 77, 768)
