"""Consistent-MIG (keep unchanged instances): the method against the spec, and whole generations on the
real ldm UNet through both hosts' hooks (a sampling loop that calls the CFG denoiser with its own
latent, as k-diffusion does)."""
from types import SimpleNamespace

import pytest
import torch

import fake_forge
from test_migcplus_hosts import plus_models  # noqa: F401 - the MIGC++ weights fixture
import fake_webui
from conftest import INSTANCES
from helpers import finish_job
from lib_migc import job
from lib_migc.hosts import a1111, forge
from lib_migc.modes.consistent import record as records
from lib_migc.modes.consistent.method import (blend_latent, changed_instances, changed_region, instance_set,
                                              preservation_map, shared_keys_source)
from lib_migc.params import INFOTEXT_KEY, MigcParams

PROMPT = "a red ball and a blue cube in a room"
SIGMAS = torch.tensor([3.0, 2.0, 1.2, 0.6, 0.0])


@pytest.fixture(autouse=True)
def _no_record():
    records.forget()
    yield
    records.forget()


# ------------------------------------------------------------------------------------------ the method
def _literal_map(changed, width, height):
    """G written out from migc-official-notes §5.5 with Python loops (independent of the module): 0 in each
    changed box grown by 5 latent pixels, then a 5x5 mean with the border mirrored edge-inclusively."""
    h, w = height // 8, width // 8
    region = [[1.0] * w for _ in range(h)]
    for (x0, y0, x1, y1), _ in changed:
        for r in range(max(0, int(height * y0 // 8) - 5), min(h, int(height * y1 // 8) + 5)):
            for c in range(max(0, int(width * x0 // 8) - 5), min(w, int(width * x1 // 8) + 5)):
                region[r][c] = 0.0

    def mirror(i, n):
        return -i - 1 if i < 0 else (2 * n - i - 1 if i >= n else i)

    return torch.tensor([[sum(region[mirror(r + dr, h)][mirror(c + dc, w)] for dr in range(-2, 3) for dc in range(-2, 3)) / 25
                          for c in range(w)] for r in range(h)], dtype=torch.float64)


def test_changed_instances_are_the_symmetric_difference():
    cat, hat = ((0.1, 0.2, 0.5, 0.9), "a gray cat"), ((0.6, 0.1, 0.9, 0.4), "a brown hat")
    before = instance_set([cat[0], hat[0]], [cat[1], hat[1]])
    assert changed_instances(before, before) == frozenset()
    dog = (cat[0], "a yellow dog")
    assert changed_instances(before, {dog, hat}) == {cat, dog}, "an edited description: the old and the new one"
    assert changed_instances(before, {cat}) == {hat}, "a removed instance"
    ball = ((0.0, 0.0, 0.2, 0.2), "a ball")
    assert changed_instances(before, {cat, hat, ball}) == {ball}, "an added instance"
    moved = ((0.2, 0.2, 0.6, 0.9), "a gray cat")
    assert changed_instances(before, {moved, hat}) == {cat, moved}, "a moved box: both places"


@pytest.mark.parametrize("boxes", [[(0.25, 0.25, 0.5, 0.75)], [(0.0, 0.0, 0.3, 1.0), (0.9, 0.1, 1.0, 0.2)], []])
def test_preservation_map_matches_the_spec(boxes):
    changed = {(box, f"thing {i}") for i, box in enumerate(boxes)}
    got = preservation_map(changed, 512, 384)
    assert got.shape == (48, 64) and got.dtype == torch.float64
    assert torch.allclose(got, _literal_map(changed, 512, 384), atol=1e-12)
    if not boxes:
        assert torch.equal(got, torch.ones_like(got)), "nothing changed: everything is kept exactly"


def test_changed_region_grows_boxes_by_five_latent_pixels():
    region = changed_region({((0.25, 0.5, 0.5, 0.75), "x")}, 512, 512)  # latent box rows 32..48, cols 16..32
    zero_rows = torch.nonzero(region[:, 24] == 0).flatten()
    zero_cols = torch.nonzero(region[40] == 0).flatten()
    assert (zero_rows.min().item(), zero_rows.max().item()) == (27, 52)
    assert (zero_cols.min().item(), zero_cols.max().item()) == (11, 36)


def test_blend_is_exact_where_the_map_is_one():
    g = torch.Generator().manual_seed(0)
    x, recorded = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
    keep = torch.ones((8, 8), dtype=torch.float64)
    keep[2:5, 2:5] = 0.0
    keep[5, 5] = 0.25
    out = blend_latent(x, recorded, keep)
    assert torch.equal(out[..., 0, 0], recorded[..., 0, 0]) and torch.equal(out[..., 2:5, 2:5], x[..., 2:5, 2:5])
    assert torch.allclose(out[..., 5, 5], 0.75 * x[..., 5, 5] + 0.25 * recorded[..., 5, 5], atol=1e-6)


def _literal_attention(attn, x, source):
    """softmax(q kᵀ/√d) v per head in float64 from the layer's own weights; q from x, k and v from ``source``."""
    d = lambda t: t.double()  # noqa: E731
    q = d(x) @ d(attn.to_q.weight).T
    k = d(source) @ d(attn.to_k.weight).T
    v = d(source) @ d(attn.to_v.weight).T
    heads = attn.heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).flatten(-2)
    return out @ d(attn.to_out[0].weight).T + d(attn.to_out[0].bias)


def test_shared_self_attention_on_the_real_ldm_layer_equals_a_float64_computation(unet):
    """The A1111 hook on a real ldm attn1: keys and values from [current; recorded] tokens, queries current."""
    name, attn = "output_blocks.4.1", unet.output_blocks[4][1].transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 64, attn.to_q.in_features), generator=g)
    recorded = torch.randn((2, 64, attn.to_q.in_features), generator=g).half()  # the record keeps fp16
    calls = []

    def source(layer, tokens):
        calls.append(layer)
        return shared_keys_source(tokens, recorded)

    hooks = a1111.SelfAttentionHooks(source, lambda layer: layer == name)
    p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
    assert hooks.install(p) == [name]
    try:
        with torch.no_grad():
            out = attn(x)
    finally:
        hooks.remove()
    assert calls == [name]
    expected = _literal_attention(attn, x, torch.cat([x.double(), recorded.double()], dim=1))
    assert torch.allclose(out.double(), expected, atol=1e-5), (out.double() - expected).abs().max()
    with torch.no_grad():
        plain = attn(x)
    assert "forward" not in attn.__dict__ and not torch.allclose(plain, out, atol=1e-3)


# ------------------------------------------------------------------------------------------ whole generations
class CFGDenoiser(torch.nn.Module):
    """A1111's CFGDenoiser as a txt2img step goes: called by the sampler with its own latent, it stacks
    [cond, uncond] rows, runs the CFG-denoiser callback and the inner model (k-space: x0 out), then CFG.
    ``host`` "forge" runs the UNet as Forge's transformer blocks do (uncond first, its patches)."""

    def __init__(self, p, cond, uncond, host="a1111", scale=5.0):
        super().__init__()
        self.p, self.cond, self.uncond, self.host, self.scale = p, cond, uncond, host, scale
        self.step, self.total_steps = 0, len(SIGMAS) - 1

    def forward(self, x, sigma, uncond=None, cond=None, cond_scale=None, s_min_uncond=None, image_cond=None):
        sigma_in = torch.cat([sigma, sigma])
        params = fake_webui.CFGDenoiserParams(torch.cat([x, x]), None, sigma_in, self.step, self.total_steps,
                                              self.cond, self.uncond, denoiser=self)
        job.on_cfg_denoiser(params)
        c_in, t = (sigma ** 2 + 1) ** -0.5, float(sigma[0]) * 250.0
        if self.host == "forge":
            eps = fake_forge.run_unet(self.p.sd_model.forge_objects.unet, torch.cat([x, x]) * c_in, torch.cat([self.uncond, self.cond]),
                                      [1, 0], t=t)
            eps_uncond, eps_cond = eps.chunk(2)
        else:
            with torch.no_grad():
                eps = self.p.sd_model.apply_model(params.x * c_in, torch.full((2,), t), {"c_crossattn": [torch.cat([self.cond, self.uncond])]})
            eps_cond, eps_uncond = eps.chunk(2)
        self.step += 1
        x0_cond, x0_uncond = x - sigma * eps_cond, x - sigma * eps_uncond
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


def _model(host, unet, text_model):
    return fake_forge.ForgeSDModel(unet, text_model) if host == "forge" else fake_webui.FakeSDModel(unet, text_model)


def generate(unet, text_model, args, host="a1111", seed=100, extension=True):
    """One txt2img job: the WebUI's script calls around an Euler loop; returns (final latent, p)."""
    model = _model(host, unet, text_model)
    p = fake_webui.FakeProcessing(model, seeds=[seed], prompts=[PROMPT])
    p.prompts, p.steps, p.sampler_name, p.n_iter, p.batch_size = [PROMPT], len(SIGMAS) - 1, "Euler", 1, 1
    p.all_seeds, p.all_subseeds, p.seeds = [seed], [0], None
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([""])
    p.sampler = SimpleNamespace(model_wrap_cfg=CFGDenoiser(p, cond, uncond, host))
    host_module = forge if host == "forge" else a1111
    if extension:  # the WebUI's order: process, then the batch's seeds, then sampling
        job.before_process(p)
        job.process(p, args, host_module)
        p.seeds, p.subseeds = [seed], [0]
        job.before_sampling(p)
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]
    with torch.no_grad():
        for i in range(len(SIGMAS) - 1):
            denoised = p.sampler.model_wrap_cfg(x, SIGMAS[i:i + 1])
            x = x + (x - denoised) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    if extension:
        ps = SimpleNamespace(samples=x)
        job.post_sample(p, ps)
        x = ps.samples
        finish_job(p)
    return x, p


def payload(instances=INSTANCES, consistent=True):
    return {"enabled": True, "weights": "tiny.safetensors", "instances": instances, "migc_steps": 1.0, "consistent": consistent}


def _edited(description="a green pyramid"):
    return [{**INSTANCES[0], "description": description}, INSTANCES[1]]


@pytest.fixture()
def backend():
    with fake_forge.backend_modules():
        yield


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_an_edit_that_changes_nothing_reproduces_the_recorded_image_bit_for_bit(webui_modules, unet, text_model, host, request):
    if host == "forge":
        request.getfixturevalue("backend")
    first, p1 = generate(unet, text_model, [payload()], host)
    assert '"consistent":"record"' in p1.extra_generation_params[INFOTEXT_KEY]
    kept = records.recorded("txt2img")
    assert kept is not None and len(kept.latents) == len(SIGMAS) - 1 and kept.final is not None
    assert {layer for layer, _ in kept.tokens} == {f"output_blocks.{i}.1" for i in range(3, 12)}, "every up-block attn1"
    again, p2 = generate(unet, text_model, [payload()], host)
    assert '"consistent":"edit"' in p2.extra_generation_params[INFOTEXT_KEY]
    assert torch.equal(again, first)
    unet_module = a1111.unet_of(p2) if host == "a1111" else forge.unet_of(p2)
    assert not any("forward" in m.__dict__ for m in unet_module.modules()), "no attention override left behind"
    assert "forward" not in p2.sampler.model_wrap_cfg.__dict__, "the sampler hook is gone after the job"


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_editing_one_instance_keeps_the_latents_outside_its_grown_box(webui_modules, unet, text_model, host, request):
    if host == "forge":
        request.getfixturevalue("backend")
    first, _ = generate(unet, text_model, [payload()], host)
    edited, p = generate(unet, text_model, [payload(_edited())], host)
    keep = preservation_map({(tuple(INSTANCES[0]["box"]), "x")}, p.width, p.height)
    outside, inside = keep == 1.0, keep == 0.0
    # Where G is exactly 1 the final blend returns the recorded latent itself: the tolerance is zero.
    assert torch.equal(edited[..., outside], first[..., outside])
    plain, _ = generate(unet, text_model, [payload(_edited(), consistent=False)], host)
    change = lambda a, where: (a[..., where] - first[..., where]).abs().mean().item()  # noqa: E731
    assert change(plain, outside) > 0, "without the option the edit changes the whole image"
    # Inside the box the edit moves about as far from the recorded image as the same edit without the option.
    assert change(edited, inside) > 0.5 * change(plain, inside) > 0


def test_self_attention_shares_the_recorded_tokens_in_an_edit(webui_modules, unet, text_model, monkeypatch):
    from lib_migc.modes.consistent.runtime import ConsistentRun

    seen = []
    original = ConsistentRun.self_attention_source

    def spy(self, layer, x):
        source = original(self, layer, x)
        seen.append(None if source is None else source.shape[1] / x.shape[1])
        return source

    monkeypatch.setattr(ConsistentRun, "self_attention_source", spy)
    generate(unet, text_model, [payload()])
    assert seen and all(s is None for s in seen), "recording: plain self-attention"
    seen.clear()
    generate(unet, text_model, [payload(_edited())])
    assert len(seen) == 9 * (len(SIGMAS) - 1) and all(s == 2.0 for s in seen), "an edit: keys from 2x the tokens"


def test_a_new_subseed_counts_only_with_a_variation_strength():
    from lib_migc.modes.consistent.record import Fingerprint

    def p(subseed, strength):
        return SimpleNamespace(all_seeds=[5], all_subseeds=[subseed], subseed_strength=strength, width=64, height=64,
                               sampler_name="Euler", steps=4, sd_model=None)

    assert Fingerprint.of(p(11, 0.0)) == Fingerprint.of(p(12, 0.0)), "the WebUI draws a subseed per job even when unused"
    assert Fingerprint.of(p(11, 0.3)) != Fingerprint.of(p(12, 0.3))


def test_a_different_seed_records_afresh_and_says_why(webui_modules, unet, text_model):
    generate(unet, text_model, [payload()], seed=100)
    _, p = generate(unet, text_model, [payload(_edited())], seed=101)
    assert '"consistent":"record"' in p.extra_generation_params[INFOTEXT_KEY]
    assert any("seed 100 → 101" in c and "recorded afresh" in c for c in p.comments)
    assert records.recorded("txt2img").fingerprint.seed == 101


def test_reset_forgets_the_record(webui_modules, unet, text_model):
    generate(unet, text_model, [payload()])
    _, p = generate(unet, text_model, [payload(_edited(), consistent="reset")])
    assert '"consistent":"record"' in p.extra_generation_params[INFOTEXT_KEY]
    from lib_migc.modes.consistent.panel import FORGET_DONE, FORGET_NONE, forget_record

    assert forget_record() == FORGET_DONE and forget_record() == FORGET_NONE


def test_a_job_without_the_option_frees_the_record_and_is_plain(webui_modules, unet, text_model):
    generate(unet, text_model, [payload()])
    plain_with_args, _ = generate(unet, text_model, [{"enabled": False}])
    assert records.recorded("txt2img") is None
    without_extension, _ = generate(unet, text_model, [], extension=False)
    assert torch.equal(plain_with_args, without_extension)


def test_batches_and_other_modes_are_declined_with_a_message(webui_modules, unet, text_model):
    model = fake_webui.FakeSDModel(unet, text_model)
    p = fake_webui.FakeProcessing(model, seeds=[1, 2], prompts=[PROMPT, PROMPT])
    p.n_iter, p.batch_size = 1, 2
    job.before_process(p)
    job.process(p, (payload(),), a1111)
    assert any("one image at a time" in c for c in p.comments)
    assert "consistent" not in p.extra_generation_params[INFOTEXT_KEY]
    job._finish()
    p = fake_webui.FakeProcessing(model)
    job.before_process(p)
    job.process(p, ({**payload(), "mode": "naive"},), a1111)
    assert any("migc mode only" in c for c in p.comments)
    job._finish()


def test_the_record_limit_drops_the_earliest_calls_and_the_edit_says_so(webui_modules, unet, text_model):
    fake_webui.install_fake_modules(str(webui_modules))
    from modules import shared

    shared.opts.migc_consistent_max_mb = 1.0  # the tiny UNet records about 0.66 MiB of tokens per step, 2.6 MiB in all
    try:
        generate(unet, text_model, [payload()])
        kept = records.recorded("txt2img")
        assert kept.dropped > 0 and 0 < kept.tokens_bytes <= 2**20
        assert min(n for _, n in kept.tokens) > 0, "the earliest calls went first"
        _, p = generate(unet, text_model, [payload(_edited())])
        assert any("ran without the recorded image's tokens" in c for c in p.comments)
    finally:
        shared.opts.migc_consistent_max_mb = 2048


def test_the_api_field_is_checked():
    assert MigcParams.from_api({"instances": INSTANCES, "consistent": "reset"}).consistent == "reset"
    assert MigcParams.from_infotext('{"consistent":"edit","instances":[]}').consistent is True
    with pytest.raises(Exception, match="'consistent'"):
        MigcParams.from_api({"instances": INSTANCES, "consistent": "sometimes"})


def test_an_interrupted_edit_leaves_the_previous_record(webui_modules, unet, text_model):
    from modules import shared

    generate(unet, text_model, [payload()])
    kept = records.recorded("txt2img")
    shared.state = SimpleNamespace(interrupted=True, skipped=False)  # modules.shared.state as the WebUI has it
    try:
        generate(unet, text_model, [payload(_edited())])
    finally:
        del shared.state
    assert records.recorded("txt2img") is kept


def test_migcplus_weights_with_a_mask_instance_edit_only_its_derived_box(unet, text_model, request):
    """MIGC++: a mask instance's changed region is its derived box (migcplus.md §3.2), as in the official code."""
    from test_migcplus_hosts import _data

    request.getfixturevalue("plus_models")
    data = _data()
    first, _ = generate(unet, text_model, [{**data, "consistent": True}])
    edited_instances = [{**data["instances"][0], "description": "a zebra"}, data["instances"][1]]
    edited, p = generate(unet, text_model, [{**data, "instances": edited_instances, "consistent": True}])
    assert any("edited the previous image; 2 changed" in c for c in p.comments)
    box = MigcParams.from_api({**data, "instances": edited_instances}).layout.instances[0].box
    keep = preservation_map({(tuple(box), "x")}, p.width, p.height)
    assert torch.equal(edited[..., keep == 1.0], first[..., keep == 1.0])
    assert not torch.equal(edited[..., keep == 0.0], first[..., keep == 0.0])
