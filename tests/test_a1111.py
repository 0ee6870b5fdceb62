"""The A1111 adapter on the real ldm UNet, under every CFG batch layout AUTOMATIC1111 produces."""
from types import SimpleNamespace

import pytest
import torch

import fake_webui
from conftest import INSTANCES
from lib_migc.core.errors import CheckpointError, LayoutError, MigcError
from lib_migc.params import MigcParams



@pytest.fixture()
def webui(webui_modules):
    from lib_migc import job
    from lib_migc.hosts import a1111

    return SimpleNamespace(before_process=job.before_process, process=lambda p, args: job.process(p, args, a1111),
                           before_sampling=job.before_sampling, after_batch=job.after_batch, postprocess=job.postprocess,
                           on_cfg_denoiser=job.on_cfg_denoiser)


def make_p(unet, text_model, batch=1, seeds=None, family="sd1", width=256, height=256):
    model = fake_webui.FakeSDModel(unet, text_model, family)
    seeds = seeds or list(range(100, 100 + batch))
    return fake_webui.FakeProcessing(model, width, height, seeds=seeds, prompts=["a room"] * len(seeds))


def migc_args(**overrides):
    data = {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0}
    data.update(overrides)
    return (data,)


def cfg_step(job, p, x, conds, uncond, step=0, total=4, layout="batched"):
    """One CFGDenoiser.forward of A1111 v1.10 as far as rows go: cond rows (per image, per AND
    sub-prompt) first, uncond rows last; optionally uncond skipped, or the rows split into calls."""
    batch = x.shape[0]
    repeats = [len(c) for c in conds]
    x_in = torch.cat([x[i:i + 1].repeat(n, 1, 1, 1) for i, n in enumerate(repeats)] + [x])
    tensor = torch.cat([torch.stack(c) for c in conds])
    params = fake_webui.CFGDenoiserParams(x_in, None, torch.full((x_in.shape[0],), 500.0), step, total, tensor, uncond,
                                          denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    unet = p.sd_model.model.diffusion_model
    run = lambda rows, ctx: unet(rows, torch.full((rows.shape[0],), 500.0), context=ctx)  # noqa: E731
    skip_uncond = layout == "skip_uncond"
    if skip_uncond:
        x_in = x_in[:-batch]
    with torch.no_grad():
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if layout != "unbatched":
                return run(x_in, cond_in)
            return torch.cat([run(x_in[a:a + batch], cond_in[a:a + batch]) for a in range(0, x_in.shape[0], batch)])
        out = torch.zeros_like(x_in)
        size = batch * 2
        for a in range(0, tensor.shape[0], size):
            b = min(a + size, tensor.shape[0])
            out[a:b] = run(x_in[a:b], tensor[a:b])
        out[-uncond.shape[0]:] = run(x_in[-uncond.shape[0]:], uncond)
        return out


def start(job, p, args):
    job.before_process(p)
    job.process(p, args)
    job.before_sampling(p)


def finish(job, p):
    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def inputs(batch, and_prompts=1, uncond_len=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 32, 32), generator=g)
    conds = [[torch.randn((77, 768), generator=g) for _ in range(and_prompts)] for _ in range(batch)]
    uncond = torch.randn((batch, uncond_len, 768), generator=g)
    return x, conds, uncond


def no_overrides(unet):
    return not any("forward" in m.__dict__ for m in unet.modules())


@pytest.mark.parametrize("layout,and_prompts,uncond_len", [
    ("batched", 1, 77), ("unbatched", 1, 77), ("batched", 1, 154), ("skip_uncond", 1, 77), ("batched", 2, 77),
])
def test_naive_fuser_reaches_exactly_the_cond_rows(webui, unet, text_model, layout, and_prompts, uncond_len):
    """Every cond row equals a run where all rows are cond; every uncond row equals the plain UNet."""
    batch = 2
    x, conds, uncond = inputs(batch, and_prompts, uncond_len)
    p = make_p(unet, text_model, batch=batch)
    args = migc_args(migc_steps=0.0, naive_steps=1.0)
    start(webui, p, args)
    out = cfg_step(webui, p, x, conds, uncond, layout=layout)
    finish(webui, p)
    n_cond = batch * and_prompts
    # Reference for cond rows: the same job with only cond rows (skip_uncond), one image at a time.
    for i in range(batch):
        q = make_p(unet, text_model, batch=1, seeds=[p.seeds[i]])
        start(webui, q, args)
        ref = cfg_step(webui, q, x[i:i + 1], conds[i:i + 1], uncond[i:i + 1], layout="skip_uncond")
        finish(webui, q)
        torch.testing.assert_close(out[i * and_prompts:(i + 1) * and_prompts], ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = unet(x, torch.full((batch,), 500.0), context=uncond)
    if layout != "skip_uncond":
        torch.testing.assert_close(out[n_cond:], plain, rtol=1e-4, atol=1e-5)
    assert no_overrides(unet)


@pytest.mark.parametrize("layout", ["batched", "unbatched", "skip_uncond"])
def test_migc_image_in_a_batch_equals_the_single_image_of_its_seed(webui, unet, text_model, layout):
    x, conds, uncond = inputs(3)
    p = make_p(unet, text_model, batch=3)
    start(webui, p, migc_args())
    outs = [cfg_step(webui, p, x, conds, uncond, step=s, layout=layout) for s in range(2)]
    finish(webui, p)
    for i in (0, 2):
        q = make_p(unet, text_model, batch=1, seeds=[p.seeds[i]])
        start(webui, q, migc_args())
        singles = [cfg_step(webui, q, x[i:i + 1], conds[i:i + 1], uncond[i:i + 1], step=s, layout="skip_uncond") for s in range(2)]
        finish(webui, q)
        for out, single in zip(outs, singles):
            torch.testing.assert_close(out[i:i + 1], single, rtol=1e-4, atol=1e-5)


def test_migc_changes_cond_rows_and_seed_reproduces(webui, unet, text_model):
    x, conds, uncond = inputs(1)
    results = []
    for seed in (7, 7, 8):
        p = make_p(unet, text_model, seeds=[seed])
        start(webui, p, migc_args())
        results.append(cfg_step(webui, p, x, conds, uncond))
        finish(webui, p)
    with torch.no_grad():
        plain = unet(torch.cat([x, x]), torch.full((2,), 500.0), context=torch.cat([conds[0][0][None], uncond]))
    assert torch.equal(results[0], results[1])
    assert not torch.allclose(results[0][:1], results[2][:1])  # the SAC shuffle follows the seed
    assert (results[0][:1] - plain[:1]).abs().amax() > 1e-3
    torch.testing.assert_close(results[0][1:], plain[1:], rtol=1e-4, atol=1e-5)


def test_steps_after_the_migc_fraction_are_vanilla(webui, unet, text_model):
    x, conds, uncond = inputs(1)
    p = make_p(unet, text_model)
    start(webui, p, migc_args(migc_steps=0.25))  # 4 steps: MIGC at steps 0 and 1 (index <= round(0.25 * 4))
    outs = [cfg_step(webui, p, x, conds, uncond, step=s, total=4) for s in range(4)]
    finish(webui, p)
    with torch.no_grad():
        plain = unet(torch.cat([x, x]), torch.full((2,), 500.0), context=torch.cat([conds[0][0][None], uncond]))
    assert not torch.allclose(outs[1], plain)
    assert torch.equal(outs[2], plain) and torch.equal(outs[3], plain)


def test_a_plain_generation_after_migc_is_bit_identical(webui, unet, text_model):
    x, conds, uncond = inputs(1)
    p = make_p(unet, text_model)
    before = cfg_step(webui, p, x, conds, uncond)
    start(webui, p, migc_args())
    cfg_step(webui, p, x, conds, uncond)
    finish(webui, p)
    q = make_p(unet, text_model)
    start(webui, q, (False,))
    after = cfg_step(webui, q, x, conds, uncond)
    finish(webui, q)
    assert torch.equal(before, after) and no_overrides(unet)


def test_hooks_follow_an_optimisation_swapped_on_the_class(webui, unet, text_model):
    """A1111 assigns CrossAttention.forward for its optimisations; hooks must use whatever is current."""
    from ldm.modules.attention import CrossAttention

    original = CrossAttention.forward
    calls = []

    def optimised(self, x, context=None, mask=None, **kwargs):
        calls.append(1)
        return original(self, x, context=context, mask=mask)

    x, conds, uncond = inputs(1)
    p = make_p(unet, text_model)
    start(webui, p, migc_args(migc_steps=0.0, naive_steps=1.0))
    try:
        CrossAttention.forward = optimised
        cfg_step(webui, p, x, conds, uncond)
        assert calls  # the vanilla rows went through the optimisation applied after the hooks
        finish(webui, p)
        calls.clear()
        with torch.no_grad():
            unet(x, torch.full((1,), 500.0), context=uncond)
        assert len(calls) == 32  # every attn1/attn2 back on the class method
    finally:
        CrossAttention.forward = original


@pytest.mark.parametrize("bad,error_type,words", [
    ({"instances": [{"description": "", "box": [0, 0, 1, 1]}]}, LayoutError, ["instances[0]", "'description'"]),
    ({"instances": [{"description": "a", "box": [0.5, 0, 0.2, 1]}]}, LayoutError, ["instances[0]", "x1"]),
    ({"migc_steps": 2}, MigcError, ["'migc_steps'", "0 to 1"]),
    ({"weights": "missing.ckpt"}, CheckpointError, ["missing.ckpt", "not found in"]),
    ({"colour": "red"}, MigcError, ["'colour'", "allowed"]),
])
def test_bad_input_stops_the_job_at_the_first_unet_call_and_leaves_nothing_installed(webui, unet, text_model, bad, error_type, words):
    x, conds, uncond = inputs(1)
    p = make_p(unet, text_model)
    plain = cfg_step(webui, p, x, conds, uncond)
    start(webui, p, migc_args(**bad))
    with pytest.raises(error_type) as info:
        cfg_step(webui, p, x, conds, uncond)
    for word in words:
        assert word in str(info.value)
    assert 400 <= info.value.status_code < 500 and info.value.detail == str(info.value)
    assert no_overrides(unet)
    q = make_p(unet, text_model)
    start(webui, q, (False,))
    assert torch.equal(cfg_step(webui, q, x, conds, uncond), plain)
    finish(webui, q)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_non_sd1_models_decline_with_a_visible_message(webui, unet, text_model, family):
    x, conds, uncond = inputs(1)
    p = make_p(unet, text_model, family=family)
    plain = cfg_step(webui, p, x, conds, uncond)
    start(webui, p, migc_args())
    assert any("needs an SD1.x checkpoint" in c for c in p.comments)
    assert no_overrides(unet)
    assert torch.equal(cfg_step(webui, p, x, conds, uncond), plain)
    finish(webui, p)


def test_infotext_records_the_job_and_restores_it(webui, unet, text_model):
    p = make_p(unet, text_model)
    args = migc_args(naive_steps=0.25, draw_boxes=True)
    start(webui, p, args)
    finish(webui, p)
    text = p.extra_generation_params["MIGC"]
    assert '"weights_hash":"' in text
    restored = MigcParams.from_infotext(text)
    assert restored == MigcParams.from_api(args[0])
    assert MigcParams.from_ui(*restored.ui_values()) == restored


def test_descriptions_are_added_to_the_prompts_once(webui, unet, text_model):
    p = make_p(unet, text_model, batch=2)
    p.all_prompts = ["a room with a red ball", "a room"]
    start(webui, p, migc_args())
    finish(webui, p)
    assert p.all_prompts == ["a room with a red ball, a blue cube", "a room, a red ball, a blue cube"]


def test_hires_pass_is_plain_unless_asked_and_then_uses_its_own_size(webui, unet, text_model):
    x, conds, uncond = inputs(1)
    big = torch.nn.functional.interpolate(x, scale_factor=2)
    for hires in (False, True):
        p = make_p(unet, text_model)
        start(webui, p, migc_args(hires=hires))
        cfg_step(webui, p, x, conds, uncond)
        p.is_hr_pass = True
        webui.before_sampling(p)
        out = cfg_step(webui, p, big, conds, uncond)
        finish(webui, p)
        with torch.no_grad():
            plain = unet(torch.cat([big, big]), torch.full((2,), 500.0), context=torch.cat([conds[0][0][None], uncond]))
        assert torch.equal(out, plain) is (not hires)


def test_instance_encoding_uses_the_webui_path_and_the_first_eos_pooled_state(webui, unet, text_model):
    from lib_migc.core.text_encoding import encode_phrases

    model = fake_webui.FakeSDModel(unet, text_model)
    phrases = ["a red ball", "a very small blue cube on a table"]
    contexts, pooled = encode_phrases(model, phrases)
    assert torch.equal(contexts, model.get_learned_conditioning(phrases))
    tokens = torch.tensor([model.cond_stage_model.tokenize_chunks(t)[0] for t in phrases])
    expected = text_model(input_ids=tokens).pooler_output  # CLIP's own pooled output (first EOS)
    torch.testing.assert_close(pooled, expected)
    assert "forward" not in text_model.__dict__


def test_boxes_image_is_added_when_asked(webui, unet, text_model):
    from PIL import Image

    p = make_p(unet, text_model)
    start(webui, p, migc_args(draw_boxes=True))
    processed = SimpleNamespace(images=[Image.new("RGB", (256, 256))], infotexts=["info"], index_of_first_image=0)
    webui.after_batch(p)
    webui.postprocess(p, processed)
    assert len(processed.images) == 2 and processed.infotexts == ["info", "info"]
    assert processed.images[1].getpixel((int(0.05 * 256) + 1, 128)) != (0, 0, 0)
