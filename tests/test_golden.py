"""Golden payloads and infotexts: what users' scripts send and what their images carry keeps working.

``tests/golden/cases.json`` was written once by the version before the one-package-per-mode refactor
(``MIGC_RECORD_GOLDEN=1`` with the file absent; it is never rewritten). Each case keeps the API dict a
script sends, the positional list the panel (and the API's list form) sends, the ``MIGC`` infotext entry
a real job wrote, and the parameters they meant. ``cond_rows.safetensors`` keeps, for the cases whose
image is made inside the UNet's attention, one CFG step's cond rows on the A1111 and Forge fake hosts
(the real ldm UNet, the tiny weights of ``conftest``); for MultiDiffusion the A1111 denoiser's rows.
``fusion_rows.safetensors`` keeps MagicFusion's fused step on both hosts (A1111: the denoiser's rows
after the blend; Forge: the step's result), written by the version before MagicFusion moved to the
hosts' model-call and CFG-blend hook points, the same way (once, when absent).

Every later version must read each of them to the same parameters, accept the positional list in the same
order, and make the same rows from the payload and from the pasted infotext.
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fake_forge
import fake_webui
from conftest import INSTANCES
from helpers import finish_job, start_job
from lib_migc import job
from lib_migc.core.mask_codec import encode_mask
from lib_migc.hosts import a1111, forge
from lib_migc.modes.multidiffusion.params import WINDOW_WHOLE_CANVAS
from lib_migc.params import INFOTEXT_KEY, MigcParams

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES_FILE, ROWS_FILE = GOLDEN / "cases.json", GOLDEN / "cond_rows.safetensors"
FUSION_ROWS_FILE = GOLDEN / "fusion_rows.safetensors"
RECORD = os.environ.get("MIGC_RECORD_GOLDEN") == "1"
PROMPT = "a red ball and a blue cube in a room"


def _disc_mask() -> str:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    return encode_mask((((xx - 20) ** 2 + (yy - 30) ** 2) < 15 ** 2).float())


#: The payloads recorded (only read when recording; afterwards the JSON is the source).
PAYLOADS = {
    "migc": {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0},
    "migc-options": {"enabled": True, "weights": "tiny.safetensors", "migc_steps": 0.6, "naive_steps": 0.8,
                     "use_main_prompt": False, "global_prompt": "a toy room", "append_descriptions": False,
                     "draw_boxes": True, "hires": True,
                     "instances": [{**INSTANCES[0], "negative": "blurry", "ca": 1.2}, {**INSTANCES[1], "ea": 2.0, "sac": 1.5}]},
    "naive": {"enabled": True, "mode": "naive", "weights": "none.ckpt", "instances": INSTANCES},
    "naive-mask": {"enabled": True, "mode": "naive", "weights": "none.ckpt",
                   "instances": [{"description": "a red ball", "mask": _disc_mask()}, INSTANCES[1]]},
    "structure": {"enabled": False, "instances": INSTANCES, "structure": {"enabled": True}},
    "migc+structure": {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0,
                       "structure": {"enabled": True, "phrases": ["a red ball", "a blue cube"]}},
    "multidiffusion": {"enabled": True, "mode": "multidiffusion", "weights": "none.ckpt", "instances": INSTANCES,
                       "md_bootstrap": 0.0},
    "multidiffusion-bootstrap": {"enabled": True, "mode": "multidiffusion", "weights": "none.ckpt", "instances": INSTANCES},
    "magicfusion": {"enabled": False, "magicfusion": {"enabled": True, "model_b": "other.safetensors", "prompt_b": "a photo",
                                                       "k_a": 0.6, "k_b": 0.4, "switch_t": 600}},
    "everything": {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 0.5,
                   "structure": {"enabled": True}, "magicfusion": {"enabled": True, "model_b": "other.safetensors"}},
}
#: Cases whose rows come from the attention hooks (both hosts) or the MultiDiffusion denoiser (A1111).
ATTENTION_CASES = ("migc", "migc-options", "naive", "naive-mask", "structure", "migc+structure")
DENOISER_CASES = ("multidiffusion",)
#: Cases whose rows are MagicFusion's fused step (model B from a checkpoint file named as in the payload).
FUSION_CASES = ("magicfusion",)
FUSION_SIGMA, FUSION_T, FUSION_GUIDANCE = 3.0, 700.0, 7.5  # t = 700 (A1111), σ = 3 (Forge): inside the window (SNB for t > 600)
FUSION_UNET_YAML = """model:
  params:
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 32, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [4, 2, 1],
               num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_heads: 8, use_spatial_transformer: true,
               transformer_depth: 1, context_dim: 768, use_checkpoint: false, legacy: false}
"""


def _inputs(sd_model):
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        return x, sd_model.get_learned_conditioning([PROMPT]), sd_model.get_learned_conditioning([""])


def _a1111_rows(unet, text_model, args):
    model = fake_webui.FakeSDModel(unet, text_model)
    p = fake_webui.FakeProcessing(model, seeds=[100], prompts=[PROMPT])
    p.prompts, p.steps = [PROMPT], 4
    x, cond, uncond = _inputs(model)
    start_job(p, args)
    job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, None, 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
    with torch.no_grad():
        out = unet(torch.cat([x, x]), torch.full((2,), 500.0), context=torch.cat([cond, uncond]))
    finish_job(p)
    return out[:1], p.extra_generation_params.get(INFOTEXT_KEY)


def _forge_rows(unet, text_model, args):
    with fake_forge.backend_modules():
        model = fake_forge.ForgeSDModel(unet, text_model)
        p = fake_webui.FakeProcessing(model, seeds=[100], prompts=[PROMPT])
        p.prompts, p.steps = [PROMPT], 4
        x, cond, uncond = _inputs(model)
        start_job(p, args, forge)
        job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, torch.ones(1), 0, 4, cond, uncond, denoiser=SimpleNamespace(p=p)))
        out = fake_forge.run_unet(p.sd_model.forge_objects.unet, torch.cat([x, x]), torch.cat([uncond, cond]), (1, 0))
        finish_job(p)
    return out[1:], p.extra_generation_params.get(INFOTEXT_KEY)


def _multidiffusion_rows(text_model, args):
    from test_multidiffusion_hosts import KDenoiser, _cfg_call, _model, _p
    from helpers import build_family_unet

    model = _model({"sd1": build_family_unet("sd1", seed=2)}, text_model, "sd1")
    p = _p(model, KDenoiser)
    x, cond, uncond = _inputs(model)
    job.before_process(p)
    job.process(p, args, a1111)
    job.before_sampling(p)
    out = _cfg_call(p, x, torch.full((1,), 2.0), cond, uncond, step=3)
    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    return out[:1], p.extra_generation_params.get(INFOTEXT_KEY)


class _CompVisDenoiser(torch.nn.Module):
    """A1111's k-diffusion wrapper of the loaded model (k-space x and sigma in, x0 out), every sigma at ``FUSION_T``."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model

    def sigma_to_t(self, sigma):
        return torch.full_like(sigma, FUSION_T)

    def forward(self, input, sigma, **kwargs):
        eps = self.inner_model.apply_model(input * (FUSION_SIGMA ** 2 + 1) ** -0.5, self.sigma_to_t(sigma), **kwargs)
        return input - FUSION_SIGMA * eps


def _model_b(folder: Path):
    """Model B's checkpoint (``other.safetensors``, a tiny SD1 UNet of other weights) in the checkpoint list."""
    from safetensors.torch import save_file

    from helpers import build_unet

    path = folder / "other.safetensors"
    if not path.exists():
        state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in build_unet(model_channels=32, seed=7).state_dict().items()}
        save_file(state, str(path))
        (folder / "tiny.yaml").write_text(FUSION_UNET_YAML)
    fake_webui.register_checkpoint(str(path), sha256="0e0e0e0e0e0e")
    return str(folder / "tiny.yaml")


def _fusion_rows(folder, unet, text_model, args):
    """MagicFusion's fused step on A1111 (the denoiser's rows after the blend) and Forge (the step's result)."""
    from lib_migc.modes.magicfusion.runtime import MODEL_B

    config = _model_b(folder)
    model = fake_webui.FakeSDModel(unet, text_model)
    model.used_config = config
    p = fake_webui.FakeProcessing(model, seeds=[100], prompts=[PROMPT])
    p.prompts, p.steps, p.cfg_scale = [PROMPT], 4, FUSION_GUIDANCE
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=_CompVisDenoiser(model)))
    x, cond, uncond = _inputs(model)
    x_in, sigma_in = torch.cat([x, x]), torch.full((2,), FUSION_SIGMA)
    start_job(p, args)
    denoiser = SimpleNamespace(p=p, sampler=SimpleNamespace(sampler_extra_args={"cond_scale": FUSION_GUIDANCE}),
                               cond_scale_miltiplier=1.0)
    job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x_in, None, sigma_in, 0, 4, cond, uncond, denoiser=denoiser))
    with torch.no_grad():
        a1111_rows = p.sampler.model_wrap_cfg.inner_model(x_in, sigma_in, cond={"c_crossattn": [torch.cat([cond, uncond])]})
    job.on_cfg_denoised(fake_webui.CFGDenoisedParams(a1111_rows, 0, 4, None))
    finish_job(p)
    infotext = p.extra_generation_params.get(INFOTEXT_KEY)
    MODEL_B.clear()
    unet.config = yaml_params(FUSION_UNET_YAML)  # Forge builds B from its UNet's constructor config
    try:
        with fake_forge.backend_modules():
            model = fake_forge.ForgeSDModel(unet, text_model)
            p = fake_webui.FakeProcessing(model, seeds=[100], prompts=[PROMPT])
            p.prompts, p.steps = [PROMPT], 4
            start_job(p, args, forge)
            job.on_cfg_denoiser(fake_webui.CFGDenoiserParams(x, None, torch.full((1,), FUSION_SIGMA), 0, 4, cond, uncond,
                                                             denoiser=SimpleNamespace(p=p)))
            entries = lambda ctx: [{"model_conds": {"c_crossattn": fake_forge.CONDCrossAttn(ctx)}}]  # noqa: E731
            with torch.no_grad():
                forge_rows = fake_forge.sampling_function_inner(p.sd_model.forge_objects.unet, x, torch.full((1,), FUSION_SIGMA),
                                                                entries(uncond), entries(cond), FUSION_GUIDANCE)
            finish_job(p)
    finally:
        del unet.config
        MODEL_B.clear()
    return {"a1111": a1111_rows, "forge": forge_rows}, infotext


def yaml_params(text: str) -> dict:
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.create(text))["model"]["params"]["unet_config"]["params"])


def _rows(name, unet, text_model, args):
    """{host: cond rows} of one case, and the infotext entry the (A1111) job wrote."""
    if name in DENOISER_CASES:
        rows, infotext = _multidiffusion_rows(text_model, args)
        return {"a1111": rows}, infotext
    a_rows, infotext = _a1111_rows(unet, text_model, args)
    f_rows, _ = _forge_rows(unet, text_model, args)
    return {"a1111": a_rows, "forge": f_rows}, infotext


def _record(unet, text_model):
    from safetensors.torch import save_file

    if CASES_FILE.exists():
        pytest.fail(f"{CASES_FILE} exists: golden files are written once and never rewritten")
    cases, tensors = {}, {}
    for name, api in PAYLOADS.items():
        params = MigcParams.from_api(api)
        infotext = None
        if name in ATTENTION_CASES + DENOISER_CASES:
            rows, infotext = _rows(name, unet, text_model, (api,))
            tensors.update({f"{name}/{host}": value.contiguous() for host, value in rows.items()})
        cases[name] = {"api": api, "positional": params.ui_values(),
                       "infotext": infotext or params.to_infotext(weights_kind=None), "params": params.to_api()}
    GOLDEN.mkdir(exist_ok=True)
    CASES_FILE.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    save_file(tensors, str(ROWS_FILE))


def _mask_pixels_aside(api: dict) -> dict:
    """The parameters with each mask's pixels replaced by "mask": a job writes the mask it fitted to the
    image size, so the infotext's PNG is not the payload's (the rows test compares what they make)."""
    instances = [{**inst, "mask": "mask"} if "mask" in inst else inst for inst in api.get("instances", [])]
    return {**api, "instances": instances}


def _cases():
    if not CASES_FILE.exists():
        return {}
    return json.loads(CASES_FILE.read_text())


@pytest.mark.skipif(not RECORD, reason="records the golden files (MIGC_RECORD_GOLDEN=1), once")
def test_record_golden_files(webui_modules, unet, text_model):
    _record(unet, text_model)


@pytest.mark.skipif(not RECORD or FUSION_ROWS_FILE.exists(), reason="records MagicFusion's golden rows (MIGC_RECORD_GOLDEN=1), once")
def test_record_golden_fusion_rows(webui_modules, unet, text_model):
    from safetensors.torch import save_file

    tensors = {}
    for name in FUSION_CASES:
        rows, _ = _fusion_rows(webui_modules, unet, text_model, (_cases()[name]["api"],))
        tensors.update({f"{name}/{host}": value.contiguous() for host, value in rows.items()})
    save_file(tensors, str(FUSION_ROWS_FILE))


@pytest.mark.parametrize("name", FUSION_CASES)
def test_a_golden_magicfusion_payload_and_its_infotext_make_the_recorded_step(webui_modules, unet, text_model, name):
    if not FUSION_ROWS_FILE.exists():
        pytest.skip("not recorded yet")
    from safetensors.torch import load_file

    case = _cases()[name]
    recorded = {key.split("/")[1]: value for key, value in load_file(str(FUSION_ROWS_FILE)).items() if key.split("/")[0] == name}
    closed = {**case["api"], "magicfusion": {**case["api"]["magicfusion"], "switch_t": 1000}}  # the window never opens: A alone
    plain, _ = _fusion_rows(webui_modules, unet, text_model, (closed,))
    for host in plain:
        assert (plain[host] - recorded[host]).abs().amax() > 1e-3, f"the recorded step on {host} is a fused one"
    for source in (case["api"], MigcParams.from_infotext(case["infotext"]).to_api()):
        rows, _ = _fusion_rows(webui_modules, unet, text_model, (source,))
        assert set(rows) == set(recorded) == {"a1111", "forge"}
        for host in rows:
            # Denoised rows at sigma 3 are ~5 in size: the absolute tolerance follows that scale (1e-4 of it), as
            # another CPU's kernels round differently (1.2e-4 seen on one machine, 0 on the recording one).
            scale = float(recorded[host].abs().amax())
            torch.testing.assert_close(rows[host], recorded[host], rtol=1e-4, atol=1e-4 * scale, msg=f"{name} on {host}")


#: Fields added after the golden files were recorded, with the values a recorded payload reads to.
ADDED_SINCE_RECORDING = {"md_window": 0, "md_stride": 64, "md_wrap": False}


def test_the_golden_files_are_there():
    assert RECORD or CASES_FILE.exists() and ROWS_FILE.exists(), "tests/golden is missing"
    assert RECORD or set(_cases()) == set(PAYLOADS), "a golden case was added or lost"


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_every_form_of_a_golden_case_reads_to_the_same_parameters(name):
    case = _cases().get(name)
    if case is None:
        pytest.skip("not recorded yet")
    from_api = MigcParams.from_api(case["api"])
    now = from_api.to_api()
    assert {key: value for key, value in now.items() if key in case["params"]} == case["params"]
    added = {key: value for key, value in now.items() if key not in case["params"]}
    assert set(added) <= set(ADDED_SINCE_RECORDING), "only the fields added since the recording are new"
    assert added == {key: ADDED_SINCE_RECORDING[key] for key in added}, "added fields take their defaults"
    assert MigcParams.from_ui(*case["positional"]) == from_api, "the positional order is frozen"
    assert MigcParams.from_ui(case["api"]) == from_api, "the dict form through the Script's argument"
    assert from_api.ui_values()[:len(case["positional"])] == case["positional"], "positional values only grow at the end"
    pasted = MigcParams.from_infotext(case["infotext"])
    legacy = {key: value for key, value in pasted.to_api().items() if key in case["params"] or key == "enabled"}
    assert _mask_pixels_aside(legacy) == _mask_pixels_aside({**case["params"], "enabled": pasted.enabled}), \
        "the infotext keeps every field (masks: fitted to the image; their rows are compared below)"
    if from_api.mode == "multidiffusion":
        assert pasted.md_window == WINDOW_WHOLE_CANVAS, "an infotext from before windows regenerates with one window"
    assert MigcParams.from_infotext(pasted.to_infotext()) == pasted, "today's infotext reads back"


@pytest.mark.parametrize("name", ATTENTION_CASES + DENOISER_CASES)
def test_a_golden_payload_and_its_infotext_make_the_recorded_rows(webui_modules, unet, text_model, name):
    case = _cases().get(name)
    if case is None:
        pytest.skip("not recorded yet")
    from safetensors.torch import load_file

    recorded = {key.split("/")[1]: value for key, value in load_file(str(ROWS_FILE)).items() if key.split("/")[0] == name}
    rows, _ = _rows(name, unet, text_model, (case["api"],))
    assert set(rows) == set(recorded)
    for host in rows:
        torch.testing.assert_close(rows[host], recorded[host], rtol=1e-4, atol=1e-5, msg=f"{name} on {host}")
    pasted = MigcParams.from_infotext(case["infotext"])
    again, _ = _rows(name, unet, text_model, (pasted.to_api(),))
    for host in rows:
        torch.testing.assert_close(again[host], recorded[host], rtol=1e-4, atol=1e-5, msg=f"{name} on {host}, from the infotext")
