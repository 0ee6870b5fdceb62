"""The tiled VAE (lib_migc/core/tiled_vae.py) on ldm's real Encoder and Decoder with random weights: its
image against the untiled one, the overlap and the shared GroupNorm statistics that make it so, and
the job's patch of the host's VAE (installed for a MultiDiffusion job, put back after it)."""
import sys
from types import SimpleNamespace

import pytest
import torch
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder

import fake_forge
import fake_webui
from lib_migc import job
from lib_migc.core import tiled_vae
from lib_migc.hosts import a1111, forge
from test_multidiffusion_hosts import _finish, _model, _start, unets  # noqa: F401

#: SD1's first-stage ddconfig (v1-inference.yaml); the tiny one keeps its depth (4 levels, 2 blocks) and
#: so its receptive field, with fewer channels.
SD1_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4),
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
TINY_VAE = dict(SD1_VAE, ch=32, ch_mult=(1, 1, 2, 2))


def _vae(config, seed=0):
    torch.manual_seed(seed)
    return Encoder(**config).eval(), Decoder(**config).eval()


@pytest.fixture(scope="module")
def tiny():
    return _vae(TINY_VAE)


def grey_levels(image: torch.Tensor) -> torch.Tensor:
    """What the WebUI saves: [-1, 1] -> 0..255."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round()


def _latent(h, w, seed=1):
    return torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed))


def _smooth_image(h, w, seed=2):
    """A random image with structure at several scales, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.nn.functional.interpolate(torch.randn((1, 3, h // s, w // s), generator=g), size=(h, w), mode="bilinear")
             for s in (1, 8, 64)]
    return torch.tanh(sum(parts))


# ---------------------------------------------------------------------------------------------- the plan
def test_tiles_cover_the_canvas_once_with_their_cores_and_stay_inside_it():
    tiles = tiled_vae.plan_tiles(40, 72, tile=16, pad=16)
    count = torch.zeros((40, 72))
    for tile in tiles:
        h0, h1, w0, w1 = tile.core
        count[h0:h1, w0:w1] += 1
        s0, s1, s2, s3 = tile.span
        assert 0 <= s0 <= h0 and h1 <= s1 <= 40 and 0 <= s2 <= w0 and w1 <= s3 <= 72
        assert h0 - s0 == min(16, h0) and s1 - h1 == min(16, 40 - h1), "the overlap, clipped at the canvas edge"
        assert w0 - s2 == min(16, w0) and s3 - w1 == min(16, 72 - w1)
    assert torch.equal(count, torch.ones_like(count)) and len(tiles) == 3 * 5


def test_statistics_combined_from_tiles_are_the_whole_images():
    x = torch.randn((2, 8, 30, 50), dtype=torch.float64) * 3 + 1
    tiles = tiled_vae.plan_tiles(30, 50, tile=12, pad=4)
    stats = [tiled_vae._core_stats(tile.of(x, 1), 4, tile, 1) for tile in tiles]
    mean, var = tiled_vae.combine_stats(stats)
    expected_var, expected_mean = torch.var_mean(x.reshape(2, 4, -1), dim=-1, unbiased=False)
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, expected_var, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- the image
def _decoded(decoder, z, **tiling):
    """(untiled image, tiled image, largest difference in grey levels)."""
    with torch.no_grad():
        whole, tiled = decoder(z), tiled_vae.decode_tiled(decoder, z, **tiling)
    return whole, tiled, float((grey_levels(tiled) - grey_levels(whole)).abs().max())


def test_a_tiled_decode_is_the_untiled_image(tiny):
    whole, tiled, grey = _decoded(tiny[1], _latent(24, 48), tile=12, pad=16)
    assert whole.std() > 0.2, "a random VAE that draws something, or the comparison proves nothing"
    assert len(tiled_vae.plan_tiles(24, 48, 12, 16)) == 8
    assert grey <= 1
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)


def test_without_overlap_the_seams_show(tiny):
    """Why the overlap: tiles that see no neighbours differ by far more than a few grey levels."""
    assert _decoded(tiny[1], _latent(24, 48), tile=12, pad=0)[2] > 10


def test_without_shared_statistics_the_tiles_differ(tiny, monkeypatch):
    """Why the lockstep: each tile normalised with its own core's statistics differs visibly."""
    monkeypatch.setattr(tiled_vae, "run_in_lockstep", _each_on_its_own)
    z = _latent(24, 48) + torch.linspace(-2, 2, 48)  # a canvas whose halves have different statistics
    assert _decoded(tiny[1], z, tile=12, pad=16)[2] > 10


def _each_on_its_own(programs):
    results = []
    for program in programs:
        request = next(program)
        try:
            while True:
                request = program.send(tiled_vae.combine_stats([request]))
        except StopIteration as done:
            results.append(done.value)
    return results


def test_a_tiled_encode_is_the_untiled_latent(tiny):
    encoder, _ = tiny
    image = _smooth_image(192, 384)
    with torch.no_grad():
        whole = encoder(image)
        tiled = tiled_vae.encode_tiled(encoder, image, tile=12, pad=16)
    assert len(tiled_vae.plan_tiles(24, 48, 12, 16)) == 8
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4 * float(whole.abs().max()))


def test_the_global_attention_is_ldms_attention_block_in_query_chunks(monkeypatch):
    torch.manual_seed(3)
    block = AttnBlock(64).eval()
    x = torch.randn((2, 64, 12, 20))
    monkeypatch.setattr(tiled_vae, "ATTENTION_SCORES", 2 * 240 * 7)  # 7 queries per chunk, the last one shorter
    with torch.no_grad():
        torch.testing.assert_close(tiled_vae.global_attention(block, x), block(x), rtol=1e-5, atol=1e-5)


def test_the_sd1_vae_at_full_size_decodes_the_same_image_in_tiles():
    """SD1's own channel counts (shapes where they matter): three tiles of a 192x576 canvas."""
    whole, tiled, grey = _decoded(_vae(SD1_VAE)[1], _latent(24, 72), tile=24)
    assert grey <= 1
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- when it tiles
def test_auto_tiles_above_a_megapixel_and_the_setting_overrides():
    assert not tiled_vae.wants_tiles("Auto", 1024 * 1024)
    assert tiled_vae.wants_tiles("Auto", 1024 * 1032)
    assert tiled_vae.wants_tiles("Always", 64 * 64) and not tiled_vae.wants_tiles("Never", 4096 * 4096)


def test_only_ldm_structured_parts_are_tiled(tiny):
    encoder, decoder = tiny
    assert tiled_vae.tileable(encoder) and tiled_vae.tileable(decoder)
    assert not tiled_vae.tileable(torch.nn.Conv2d(4, 4, 3))
    with_attention = Decoder(**dict(TINY_VAE, attn_resolutions=[64]))
    assert not tiled_vae.tileable(with_attention), "attention outside the middle block is not local"


# ---------------------------------------------------------------------------------------------- the job's patch
def _with_vae(model, encoder, decoder, host):
    vae = torch.nn.Module()
    vae.encoder, vae.decoder = encoder, decoder
    if host is forge:
        model.forge_objects.vae.first_stage_model = vae
    else:
        model.first_stage_model = vae
    return vae


@pytest.mark.parametrize("host", [a1111, forge], ids=["a1111", "forge"])
def test_a_multidiffusion_job_tiles_the_hosts_vae_and_puts_it_back(webui_modules, unets, text_model, tiny, monkeypatch, host):
    encoder, decoder = _vae(TINY_VAE)
    model = _model(unets, text_model, "sd1") if host is a1111 else fake_forge.ForgeSDModel(unets["sd1"], text_model)
    vae = _with_vae(model, encoder, decoder, host)
    assert host.vae_of(SimpleNamespace(sd_model=model)) is vae
    monkeypatch.setattr(sys.modules["modules.shared"].opts, "migc_tiled_vae", "Always", raising=False)
    z, image = _latent(16, 24), _smooth_image(128, 192)
    with torch.no_grad():
        plain = decoder(z), encoder(image)
    p = fake_webui.FakeProcessing(model, 192, 128, seeds=[1], prompts=["a room"])
    p.steps, p.negative_prompt = 4, ""
    data = {"enabled": True, "mode": "multidiffusion", "md_bootstrap": 0.0, "weights": "absent.ckpt",
            "instances": [{"description": "a cat", "box": [0, 0, 0.5, 1]}]}
    job.before_process(p)
    job.process(p, (data,), host)
    assert job.active_job() is not None and job.active_job().error is None
    assert "forward" in decoder.__dict__ and "forward" in encoder.__dict__
    calls = []
    monkeypatch.setattr(tiled_vae, "run_in_lockstep", lambda programs: calls.append(len(programs)) or _lockstep(programs))
    with torch.no_grad():
        tiled = decoder(z), encoder(image)
    assert calls == [1, 1], "each part went through the tiled path (one 512-px tile here)"
    for got, expected in zip(tiled, plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    _finish(p)
    assert "forward" not in decoder.__dict__ and "forward" not in encoder.__dict__, "the job puts the VAE back"


_lockstep = tiled_vae.run_in_lockstep


def test_another_extensions_vae_patch_is_left_to_it_and_never_is_never(webui_modules, unets, text_model, monkeypatch):
    encoder, decoder = _vae(TINY_VAE)
    model = _model(unets, text_model, "sd1")
    _with_vae(model, encoder, decoder, a1111)
    theirs = lambda z: torch.zeros(1)  # noqa: E731 - another tiling extension's replacement
    decoder.forward = theirs
    data = {"enabled": True, "mode": "multidiffusion", "md_bootstrap": 0.0, "weights": "absent.ckpt",
            "instances": [{"description": "a cat", "box": [0, 0, 0.5, 1]}]}
    for policy in ("Always", "Never"):
        monkeypatch.setattr(sys.modules["modules.shared"].opts, "migc_tiled_vae", policy, raising=False)
        p = fake_webui.FakeProcessing(model, 192, 128, seeds=[1], prompts=["a room"])
        p.steps, p.negative_prompt = 4, ""
        job.before_process(p)
        job.process(p, (data,), a1111)
        assert decoder.__dict__["forward"] is theirs
        assert ("forward" in encoder.__dict__) == (policy == "Always")
        _finish(p)
        assert decoder.__dict__["forward"] is theirs and "forward" not in encoder.__dict__
