"""*Show instance maps*: every mode records where its instances acted, from the tensors it already computes,
without changing the image; one map image per generated image, with its infotext.

Whole jobs run through the A1111 adapter on the real tiny ldm UNet, driven the way A1111's CFGDenoiser
drives it (the CFG callback, the sampler's inner model, ``on_cfg_denoised``), so every mode's own hooks run.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fake_webui
from conftest import INSTANCES
from helpers import start_job
from lib_migc import job
from lib_migc.core.draw import instance_colour
from lib_migc.core.instance_maps import InstanceMaps
from lib_migc.core.map_image import render_map, winners
from lib_migc.core.masks import MaskCache
from lib_migc.modes.migc.shading import NAIVE_INSTANCE_WEIGHT
from lib_migc.modes.multidiffusion.runtime import layout_region_masks
from lib_migc.params import MigcParams
from test_magicfusion_a1111 import CFGDenoiserKDiffusion, cfg_step, fusion, make_p  # noqa: F401 - fusion is a fixture

PROMPT = "a red ball and a blue cube in a room"
SEEDS = [100, 101]
SIZE = 256


# ------------------------------------------------------------------------------------------ the collector
def test_shares_are_averaged_per_call_over_resolutions():
    maps = InstanceMaps(owner="migc", labels=["a"])
    maps.begin_pass(2, 64, 64)  # latent 8x8
    small = torch.full((1, 1, 2, 2), 0.2)
    big = torch.full((2, 1, 4, 4), 0.5)
    maps.add([0], small)
    maps.add([0, 1], big)
    maps.add([1], big[:1] * 0 + 0.9)
    maps.end_batch()
    first, second = maps.batches[0].shares
    # image 0: one call at 2x2 (0.2, upsampled: still 0.2) and one at 4x4 (0.5) -> mean 0.35 over two calls
    assert first.shape == (1, 4, 4) and torch.allclose(first, torch.full((1, 4, 4), 0.35))
    assert torch.allclose(second, torch.full((1, 4, 4), (0.5 + 0.9) / 2))


def test_an_image_with_nothing_recorded_gets_none_and_a_map_that_says_so():
    maps = InstanceMaps(owner="migc", labels=["a"])
    maps.begin_pass(2, 64, 64)
    maps.add([1], torch.ones((1, 1, 2, 2)))
    maps.end_batch()
    assert maps.batches[0].shares[0] is None and maps.batches[0].shares[1] is not None
    picture = render_map(Image.new("RGB", (32, 32), (200, 200, 200)), None, ["a"], "Shares: test")
    assert picture.size[0] == 32 and picture.size[1] > 32
    assert np.allclose(np.asarray(picture)[:32, :32], round(200 * 0.35), atol=1)  # only dimmed


def test_only_the_coarse_attention_layers_are_recorded():
    maps = InstanceMaps(owner="migc")
    maps.begin_pass(1, 512, 512)
    assert [t for t in (4096, 1024, 256, 64) if maps.wants(t)] == [256, 64]
    assert maps.size_of(256) == (16, 16)


# ------------------------------------------------------------------------------------------ the picture
def test_the_winner_is_the_largest_share_when_it_beats_the_rest():
    shares = torch.zeros((2, 2, 2))
    shares[0, 0, 0] = 0.7  # instance 1 wins: 0.7 > rest 0.3
    shares[0, 0, 1], shares[1, 0, 1] = 0.3, 0.2  # rest 0.5 wins
    shares[1, 1, 0] = 0.6  # instance 2 wins
    index, best = winners(shares, 2, 2)
    assert index.tolist() == [[0, -1], [1, -1]]
    assert best[0, 0] == pytest.approx(0.7)


def test_the_map_paints_each_winner_in_the_editors_colour_over_the_dimmed_result():
    image = Image.new("RGB", (16, 16), (100, 100, 100))
    shares = torch.zeros((2, 16, 16))
    shares[0, :, :8] = 1.0
    shares[1, :, 8:] = 1.0
    picture = np.asarray(render_map(image, shares, ["left", "right"], "Shares: test")).astype(float)
    for i, column in ((0, 2), (1, 12)):
        colour = np.asarray(instance_colour(i), dtype=float)
        expected = 100 * 0.35 * (1 - 0.8) + colour * 0.8
        assert np.allclose(picture[5, column], expected, atol=1)


# ------------------------------------------------------------------------------------------ whole jobs
def _payload(name, fusion_title=None):
    base = {"instances": INSTANCES, "weights": "tiny.safetensors", "migc_steps": 1.0, "append_descriptions": False}
    return {
        "migc": {**base},
        "naive": {**base, "mode": "naive"},
        "multidiffusion": {**base, "mode": "multidiffusion", "md_bootstrap": 0.0},
        "structure": {"enabled": False, "structure": {"enabled": True, "phrases": ["a red ball", "a blue cube"]}},
        "magicfusion": {"enabled": False, "magicfusion": {"enabled": True, "model_b": fusion_title, "switch_t": 0}},
    }[name]


def _p(model):
    p = make_p(model, seeds=SEEDS, prompts=[PROMPT] * len(SEEDS), width=SIZE, height=SIZE)
    p.prompts, p.steps, p.cfg_scale = [PROMPT] * len(SEEDS), 4, 7.5
    return p


def _generate(model, data, steps=2):
    """A two-image txt2img job; returns (the denoiser outputs of every step, the processed result)."""
    p = _p(model)
    start_job(p, (data,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(SEEDS), 4, SIZE // 8, SIZE // 8), generator=g) * 3
    with torch.no_grad():
        cond = model.get_learned_conditioning([PROMPT] * len(SEEDS))
        uncond = model.get_learned_conditioning([""] * len(SEEDS))
    outs = []
    for _ in range(steps):
        out = cfg_step(p, x, cond, uncond, CFGDenoiserKDiffusion)
        outs.append(out)
        x = out[:len(SEEDS)]
    job.after_batch(p)
    images = [Image.new("RGB", (SIZE, SIZE), (90 + 40 * i, 90, 90)) for i in range(len(SEEDS))]
    processed = SimpleNamespace(images=images, infotexts=[f"image {i}" for i in range(len(SEEDS))], index_of_first_image=0)
    job.postprocess(p, processed)
    return outs, processed, p


MODE_NAMES = ["migc", "naive", "multidiffusion", "structure", "magicfusion"]


@pytest.mark.parametrize("name", MODE_NAMES)
def test_maps_never_change_the_image_and_add_one_map_per_image(fusion, name):
    model, _, title = fusion
    data = _payload(name, title)
    plain_outs, plain, _ = _generate(model, data)
    outs, processed, p = _generate(model, {**data, "maps": True})
    assert all(torch.equal(a, b) for a, b in zip(plain_outs, outs))  # bit for bit, every step
    assert len(plain.images) == len(SEEDS)
    assert len(processed.images) == 2 * len(SEEDS)
    assert processed.infotexts[len(SEEDS):] == ["image 0", "image 1"]
    assert '"maps":true' in p.extra_generation_params["MIGC"]
    for map_image in processed.images[len(SEEDS):]:
        assert map_image.size[0] == SIZE and map_image.size[1] > SIZE  # the legend under the image


def _shares(model, data):
    p = _p(model)
    start_job(p, ({**data, "maps": True},))
    collector = job.active_job().maps
    x = torch.randn((len(SEEDS), 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        cond = model.get_learned_conditioning([PROMPT] * len(SEEDS))
        uncond = model.get_learned_conditioning([""] * len(SEEDS))
    cfg_step(p, x, cond, uncond, CFGDenoiserKDiffusion)
    # each resolution's mean before end_batch brings them together
    collector.per_resolution = {hw: sums / torch.tensor(collector._counts[hw])[:, None, None, None]
                                for hw, sums in collector._sums.items()}
    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    return collector


@pytest.mark.parametrize("name", ["migc", "naive"])
def test_migc_and_naive_maps_are_the_shares_inside_each_box(fusion, name):
    """MIGC: SAC weights x masks, so nothing outside a box and a positive share inside it; naive: exactly
    the fuser's weight 10 m_i / (1 + Σ 10 m_j), computed here from the masks the layers get."""
    model, _, _ = fusion
    maps = _shares(model, _payload(name))
    assert maps.labels == ["a red ball", "a blue cube"]
    assert maps.batches[0].shares[0].shape == (2, 8, 8)  # 256 px: the 8x8 maps are the largest recorded
    assert set(maps.per_resolution) == {(8, 8), (4, 4)}
    shares = maps.per_resolution[(8, 8)][0]
    masks = MaskCache.from_boxes([i["box"] for i in INSTANCES], SIZE, SIZE).at((8, 8), torch.device("cpu"), torch.float32)
    inside = masks.instances.reshape(2, 8, 8) > 0
    assert torch.all(shares[~inside] == 0)
    assert torch.all(shares[inside] > 0)
    if name == "naive":
        w = NAIVE_INSTANCE_WEIGHT * masks.instances
        literal = (w / (1 + w.sum(0) + 1e-6)).reshape(2, 8, 8)
        assert torch.allclose(shares, literal)


def test_multidiffusion_maps_are_the_region_masks_it_fused(fusion):
    """One window: each box's share is its mask over the sum of the masks (the background's is 0 inside a box),
    so a cell of one box is all its own and an overlap splits evenly."""
    model, _, _ = fusion
    shares = _shares(model, _payload("multidiffusion")).batches[0].shares[1]
    masks = layout_region_masks(MigcParams.from_api({"instances": INSTANCES}).layout, SIZE, SIZE)[:, 0]
    assert shares.shape == (2, SIZE // 8, SIZE // 8)
    assert torch.equal(shares, masks[1:] / masks.sum(0))
    assert set(shares.unique().tolist()) == {0.0, 0.5, 1.0}


def test_structure_maps_are_the_spans_share_of_the_attention_on_the_words(fusion):
    model, _, _ = fusion
    maps = _shares(model, _payload("structure"))
    assert maps.labels == ["a red ball", "a blue cube"]
    shares = maps.batches[0].shares[0]
    total = shares.sum(0)
    assert torch.all(shares > 0) and torch.all(total < 1)  # "and", "in", "room" keep the rest


def test_magicfusion_maps_are_the_part_of_steps_model_b_won(fusion):
    model, _, title = fusion
    maps = _shares(model, _payload("magicfusion", title))
    shares = maps.batches[0].shares[0]
    assert maps.labels[0].startswith("model B")
    assert shares.shape == (1, SIZE // 8, SIZE // 8)
    assert set(shares.unique().tolist()) <= {0.0, 1.0} and 0 < float(shares.mean()) < 1  # one step: won or not


def test_maps_off_collect_nothing(fusion):
    model, _, _ = fusion
    p = _p(model)
    start_job(p, (_payload("migc"),))
    assert job.active_job().maps is None and job.active_job().session.maps is None
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def test_the_api_field_is_a_switch_and_round_trips_through_the_infotext():
    params = MigcParams.from_api({"instances": INSTANCES, "maps": True})
    assert params.maps and MigcParams.from_infotext(params.to_infotext()).maps
    assert '"maps"' not in MigcParams.from_api({"instances": INSTANCES}).to_infotext()  # old infotexts unchanged
    assert MigcParams.from_ui(*params.ui_values()) == params
    with pytest.raises(Exception, match="maps"):
        MigcParams.from_api({"instances": INSTANCES, "maps": "yes"})


@pytest.mark.parametrize("plus", [False, True])
def test_sac_shares_are_each_instances_part_of_what_the_sac_mixes(plus):
    from lib_migc.modes.migc.shading import sac_instance_shares

    masks = MaskCache.from_boxes([i["box"] for i in INSTANCES], 64, 64).at((4, 4), torch.device("cpu"), torch.float32)
    slots = 3 if plus else 4
    weights = torch.rand((2, slots, 4, 4), generator=torch.Generator().manual_seed(3)).softmax(1)
    shares = sac_instance_shares(weights, masks)
    m = masks.instances.reshape(2, 4, 4)
    for b in range(2):
        for y in range(4):
            for x in range(4):
                inst = [float(weights[b, i + (0 if plus else 1), y, x] * m[i, y, x]) for i in range(2)]
                rest = float(weights[b, -1, y, x]) + (0.0 if plus else float(weights[b, 0, y, x] * masks.background[y * 4 + x]))
                for i in range(2):
                    assert float(shares[b, i, y, x]) == pytest.approx(inst[i] / (sum(inst) + rest), rel=1e-5)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_both_hosts_collect_migc_maps_in_a_whole_generation_without_changing_it(webui_modules, unet, text_model, host,
                                                                                   monkeypatch):
    """An Euler txt2img loop through each host's own attention hooks (Forge: its transformer-block patches)."""
    from test_consistent import generate

    ended = []
    original = InstanceMaps.end_batch
    monkeypatch.setattr(InstanceMaps, "end_batch", lambda self: (ended.append(self), original(self))[1])
    data = {"enabled": True, "weights": "tiny.safetensors", "instances": INSTANCES, "migc_steps": 1.0}
    plain, _ = generate(unet, text_model, (data,), host=host)
    with_maps, _ = generate(unet, text_model, ({**data, "maps": True},), host=host)
    assert torch.equal(plain, with_maps)
    assert len(ended) == 1 and ended[0].owner == "migc"
    shares = ended[0].batches[0].shares[0]
    assert shares is not None and shares.shape[0] == 2 and float(shares.max()) > 0
