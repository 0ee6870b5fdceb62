"""StructureDiffusion through the A1111 hooks and the Forge adapter on the real ldm UNet, alone and with
MIGC, plus its parameters (API, panel, infotext)."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from helpers import finish_job, start_job
from conftest import INSTANCES
from lib_migc import job
from lib_migc.core.errors import MigcError
from lib_migc.core.masks import MaskCache
from lib_migc.core.unet_layers import attn2_layers
from lib_migc.hosts import forge
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode
from lib_migc.modes.structure.attention import Overlay, structured_forward
from lib_migc.params import UI_FIELDS, MigcParams

PROMPT = "a room with a red ball and a gray cat"
PHRASES = ["a red ball", "a gray cat"]
WORDS = PROMPT.split()
LAYER = "output_blocks.4.1"  # a MIGC layer of the tiny UNet; every attn2 is structured


def structure_args(mode="default", phrases=PHRASES, **migc):
    data = {"enabled": False, "structure": {"enabled": True, "mode": mode, "phrases": phrases}}
    data.update(migc)
    return (data,)


def make_p(sd_model, batch=1, prompt=PROMPT):
    return fake_webui.FakeProcessing(sd_model, seeds=list(range(100, 100 + batch)), prompts=[prompt] * batch)


def expected_overlays(sd_model, phrases=PHRASES):
    """Spans by hand: the fake tokenizer is one token per word, so a phrase's span is its word position."""
    out = []
    for phrase in phrases:
        words = phrase.split()
        start = next(i for i in range(len(WORDS)) if WORDS[i:i + len(words)] == words)
        encoding = sd_model.get_learned_conditioning([phrase])[0]
        out.append(Overlay(1 + start, encoding[1:1 + len(words)]))
    return out


class Capture:
    """Inputs and outputs of one attn2 module during a UNet call (forward hooks see the overrides too)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(lambda m, args, kwargs, out: self.calls.append((args, kwargs, out)), with_kwargs=True)

    def close(self):
        self.handle.remove()


def a1111_run(p, x, cond, uncond, step=0, total=4):
    params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, step, total, cond, uncond, denoiser=SimpleNamespace(p=p))
    job.on_cfg_denoiser(params)
    with torch.no_grad():
        return p.sd_model.model.diffusion_model(torch.cat([x, x]), torch.full((2 * x.shape[0],), 500.0), context=torch.cat([cond, uncond]))


start, finish = start_job, finish_job


@pytest.mark.parametrize("mode", ["default", "conjunction"])
def test_a1111_cond_rows_follow_the_method_and_uncond_rows_are_untouched(webui_modules, unet, text_model, mode):
    model = fake_webui.FakeSDModel(unet, text_model)
    p = make_p(model, batch=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 4, 32, 32), generator=g)
    cond = model.get_learned_conditioning([PROMPT] * 2)
    uncond = torch.randn((2, 77, 768), generator=g)
    attn = attn2_layers(unet)[LAYER]
    start(p, structure_args(mode))
    capture = Capture(attn)
    try:
        a1111_run(p, x, cond, uncond)
    finally:
        capture.close()
        finish(p)
    (args, kwargs, out), = capture.calls
    layer_in, context = args[0], kwargs["context"]
    overlays = expected_overlays(model)
    with torch.no_grad():
        ref_cond = structured_forward(attn, layer_in[:2], cond, overlays, mode)
        plain = type(attn).forward(attn, layer_in, context=context)
    torch.testing.assert_close(out[:2], ref_cond, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2:], plain[2:]), "uncond rows must be exactly the plain attention"
    assert (out[:2] - plain[:2]).abs().max() > 1e-4, "StructureDiffusion must change the cond rows"
    assert not any("forward" in m.__dict__ for m in unet.modules()), "hooks removed after the job"
    assert '"structure":{"enabled":true,"mode":"' + mode in p.extra_generation_params["MIGC"]


def test_prefix_phrases_change_nothing_and_missing_phrases_are_reported(webui_modules, unet, text_model):
    """CLIP is causal: a phrase that starts the prompt encodes to the prompt's own rows (the spec's §3.1)."""
    model = fake_webui.FakeSDModel(unet, text_model)
    p = make_p(model)
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(4))
    cond = model.get_learned_conditioning([PROMPT])
    uncond = torch.zeros((1, 77, 768))
    start(p, structure_args(phrases=["a room with", "a purple dog"]))
    out = a1111_run(p, x, cond, uncond)
    finish(p)
    plain = a1111_run(make_p(model), x, cond, uncond)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert any("'a purple dog' (it is not in the prompt)" in c for c in p.comments), p.comments


def test_forge_adapter_matches_the_a1111_hooks(webui_modules, unet, text_model):
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet, text_model)
        p = make_p(model)
        g = torch.Generator().manual_seed(5)
        x = torch.randn((1, 4, 32, 32), generator=g)
        cond = model.get_learned_conditioning([PROMPT])
        uncond = torch.randn((1, 77, 768), generator=g)
        start(p, structure_args("conjunction"), forge)
        params = fake_webui.CFGDenoiserParams(x, None, torch.ones(1), 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p))
        job.on_cfg_denoiser(params)
        out = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
        finish(p)
    a_model = fake_webui.FakeSDModel(unet, text_model)
    q = make_p(a_model)
    start(q, structure_args("conjunction"))
    ref = a1111_run(q, x, cond, uncond)
    finish(q)
    torch.testing.assert_close(out[1:], ref[:1], rtol=1e-4, atol=1e-5)  # cond (Forge puts uncond first)
    torch.testing.assert_close(out[:1], ref[1:], rtol=1e-4, atol=1e-5)  # uncond


def test_inside_migc_only_the_global_branch_changes(unet, text_model):
    """Naive fuser: out = (R_0 + sum 10 m_i R_i) / (1 + sum 10 m_i); structure may change R_0 only."""
    attn = attn2_layers(unet)[LAYER]
    model = fake_webui.FakeSDModel(unet, text_model)
    contexts = model.get_learned_conditioning([i["description"] for i in INSTANCES])
    cond = InstanceConditioning.build(contexts, contexts[:, 0], [i["box"] for i in INSTANCES])
    shader = LayerShader(attn, lambda xx, cc: type(attn).forward(attn, xx, context=cc), cond, None)
    x = torch.randn((1, 64, attn.to_q.in_features))
    context = model.get_learned_conditioning([PROMPT])
    masks = MaskCache.from_boxes([i["box"] for i in INSTANCES], 64, 64).for_tokens(64, x.device, x.dtype)
    overlays = expected_overlays(model)
    from lib_migc.modes.structure.attention import structured_heads
    with torch.no_grad():
        plain = shader(x, context, masks, ShadingMode.NAIVE)
        structured = shader(x, context, masks, ShadingMode.NAIVE,
                            global_heads=lambda q: structured_heads(attn, q, context, overlays, "default", attn.heads))
        r0_plain = type(attn).forward(attn, x, context=context)
        r0_struct = structured_forward(attn, x, context, overlays, "default")
    denominator = 1 + 10 * masks.instances.sum(0) + 1e-6
    expected = structured - plain
    torch.testing.assert_close(expected, (r0_struct - r0_plain) / denominator[None, :, None], rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-5


def test_migc_and_structure_run_together_and_migc_layers_keep_their_instances(webui_modules, unet, text_model):
    model = fake_webui.FakeSDModel(unet, text_model)
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(6))
    cond = model.get_learned_conditioning([PROMPT])
    uncond = torch.zeros((1, 77, 768))
    outs = {}
    for name, args in {
        "migc": ({"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0,
                  "append_descriptions": False},),
        "both": ({"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0,
                  "append_descriptions": False, "structure": {"enabled": True}},),
    }.items():
        p = make_p(model)
        start(p, args)
        assert job.active_job().session.pending_error is None
        outs[name] = a1111_run(p, x, cond, uncond)
        finish(p)
    assert (outs["both"][:1] - outs["migc"][:1]).abs().max() > 1e-5
    torch.testing.assert_close(outs["both"][1:], outs["migc"][1:])


def test_structure_declines_on_sdxl_and_runs_on_sd2(webui_modules, unet, text_model):
    for family, runs in (("sdxl", False), ("sd2", True)):
        model = fake_webui.FakeSDModel(unet, text_model, family)
        p = make_p(model)
        start(p, structure_args())
        active = job.active_job()
        assert (active is not None and active.session.structure is not None) == runs, family
        if not runs:
            assert any("StructureDiffusion was skipped" in c for c in p.comments)
        finish(p)


def test_structure_parameters_api_panel_and_infotext():
    params = MigcParams.from_api({"enabled": False, "structure": {"enabled": True, "mode": "conjunction", "phrases": ["a red car"]}})
    assert params.structure.phrases == ("a red car",) and params.structure.mode == "conjunction"
    again = MigcParams.from_infotext(params.to_infotext())
    assert again == params
    values = params.ui_values()
    assert len(values) == len(UI_FIELDS)
    assert MigcParams.from_ui(*values) == params
    def with_structure(*fields):
        out, i = list(values), UI_FIELDS.index("structure_enabled")
        out[i:i + 4] = fields
        return out

    assert MigcParams.from_ui(*with_structure(True, "default", "custom", "a red car\na white sheep")).structure.phrases == ("a red car", "a white sheep")
    for bad, words in [({"mode": "fast"}, "field 'mode' = 'fast'"), ({"phrases": []}, "field 'phrases'"),
                       ({"phrases": "nouns"}, "field 'phrases' = 'nouns'"), ({"colour": 1}, "unknown field(s) 'colour'"),
                       ({"enabled": "yes"}, "field 'enabled' must be true or false")]:
        with pytest.raises(MigcError, match=words.replace("(", r"\(").replace(")", r"\)")):
            MigcParams.from_api({"structure": {"enabled": True, **bad}})
    with pytest.raises(MigcError, match="custom"):
        MigcParams.from_ui(*with_structure(True, "default", "custom", "  "))


def test_and_prompts_stop_the_job_with_a_clear_error(webui_modules, unet, text_model):
    model = fake_webui.FakeSDModel(unet, text_model)
    p = make_p(model, prompt="a red ball AND a gray cat")
    start(p, structure_args())
    with pytest.raises(MigcError, match="AND sub-prompts"):
        a1111_run(p, torch.zeros((1, 4, 32, 32)), model.get_learned_conditioning(["a red ball"]), torch.zeros((1, 77, 768)))
    finish(p)
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_the_value_context_is_built_once_per_unet_call(webui_modules, unet, text_model, monkeypatch):
    from lib_migc.modes.structure import method as structure

    calls = []
    real = structure.mean_value_context
    monkeypatch.setattr(structure, "mean_value_context", lambda full, overlays: calls.append(1) or real(full, overlays))
    model = fake_webui.FakeSDModel(unet, text_model)
    p = make_p(model)
    x = torch.randn((1, 4, 32, 32))
    cond = model.get_learned_conditioning([PROMPT])
    start(p, structure_args())
    for step in range(2):
        a1111_run(p, x, cond.clone(), torch.zeros((1, 77, 768)), step=step)
    finish(p)
    assert len(attn2_layers(unet)) == 16 and len(calls) == 2, len(calls)


def test_structure_runs_under_inference_mode(webui_modules, unet, text_model):
    """Forge samples under torch.inference_mode(): tensors there have no version counter."""
    model = fake_webui.FakeSDModel(unet, text_model)
    p = make_p(model)
    cond = model.get_learned_conditioning([PROMPT])
    start(p, structure_args())
    with torch.inference_mode():
        out = a1111_run(p, torch.randn((1, 4, 32, 32)), cond.clone(), torch.zeros((1, 77, 768)))
    finish(p)
    assert torch.isfinite(out).all()
