"""MIGC++ (mask instances) and the training-free modes over the HTTP API of a real running WebUI.

MIGC++ needs random or real weights named MIGC++_SD14.safetensors (or MIGC_PLUS_WEIGHTS) in the
WebUI's MIGC folder; without them those tests are skipped. The modes need no weights.
"""
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from .conftest import pixels

PLUS = os.environ.get("MIGC_PLUS_WEIGHTS", "MIGC++_SD14.safetensors")
BASE = {"prompt": "a room", "negative_prompt": "", "steps": 4, "width": 256, "height": 256,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 4321, "batch_size": 1}
BOXES = [{"description": "a red ball", "box": [0.0625, 0.125, 0.5, 0.875]},
         {"description": "a gray cat", "box": [0.5, 0.25, 0.9375, 0.75]}]


def _mask_url(width=256, height=256) -> str:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((20, 40, 140, 220), fill=255)
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _migc_entry(webui, body) -> dict:
    """The image's MIGC infotext entry, parsed (the infotext quotes it)."""
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert status == 200, parsed
    return json.loads(parsed["parameters"]["MIGC"])


def _with(args, **extra):
    return {**BASE, **extra, "alwayson_scripts": {"MIGC": {"args": [args]}}}


@pytest.fixture(scope="module")
def plain(webui):
    status, body = webui.txt2img(BASE)
    assert status == 200, body
    return pixels(body["images"][0])


@pytest.fixture(scope="module")
def plus_result(webui):
    instances = [{"description": "a gray cat", "mask": _mask_url()}, BOXES[0]]
    status, body = webui.txt2img(_with({"weights": PLUS, "instances": instances, "migc_steps": 1.0}))
    if status == 404 and PLUS in json.dumps(body):
        pytest.skip(f"no {PLUS} in the WebUI's MIGC folder")
    assert status == 200, body
    return body


def test_migcplus_with_a_mask_instance_records_its_kind_and_mask(webui, plus_result, plain):
    entry = _migc_entry(webui, plus_result)
    assert entry["weights_kind"] == "migc++" and entry["instances"][0]["mask"].startswith("data:image/png;base64,")
    assert abs(pixels(plus_result["images"][0]) - plain).mean() > 1.0


def test_migcplus_infotext_round_trip_regenerates_the_same_image(webui, plus_result):
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + plus_result["images"][0]})
    assert status == 200, parsed
    migc = json.loads(parsed["parameters"]["MIGC"])
    migc.pop("weights_hash"), migc.pop("weights_kind")
    status, body = webui.txt2img(_with(migc, prompt=parsed["parameters"]["Prompt"]))
    assert status == 200, body
    assert (pixels(body["images"][0]) == pixels(plus_result["images"][0])).all()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_naive_mode_needs_no_weights_and_changes_the_image(webui, plain, sampler):
    status, body = webui.txt2img(_with({"mode": "naive", "weights": "none.ckpt", "instances": BOXES}, sampler_name=sampler))
    assert status == 200, body
    assert _migc_entry(webui, body)["mode"] == "naive"
    if sampler == "Euler":
        assert abs(pixels(body["images"][0]) - plain).mean() > 1.0


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M"])
def test_multidiffusion_runs_with_bootstrapping_and_region_negatives(webui, plain, sampler):
    boxes = [dict(BOXES[0], negative="blurry"), {"description": "a gray cat", "mask": _mask_url()}]
    status, body = webui.txt2img(_with({"mode": "multidiffusion", "instances": boxes, "md_bootstrap": 0.5},
                                       sampler_name=sampler))
    assert status == 200, body
    info = json.loads(body["info"])
    assert info["prompt"] == "a room"  # descriptions are region prompts, not added to the background prompt
    assert _migc_entry(webui, body)["mode"] == "multidiffusion"
    if sampler == "Euler a":
        return
    assert abs(pixels(body["images"][0]) - plain).mean() > 1.0


def test_multidiffusion_infotext_round_trip_regenerates_the_same_image(webui):
    status, first = webui.txt2img(_with({"mode": "multidiffusion", "instances": BOXES}))
    assert status == 200, first
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + first["images"][0]})
    migc = json.loads(parsed["parameters"]["MIGC"])
    status, again = webui.txt2img(_with(migc, prompt=parsed["parameters"]["Prompt"]))
    assert status == 200, again
    assert (pixels(again["images"][0]) == pixels(first["images"][0])).all()


@pytest.mark.parametrize("bad,words", [
    ({"mode": "regions"}, ["'mode'", "multidiffusion"]),
    ({"mode": "multidiffusion", "instances": [{"description": "a cat", "mask": "data:image/png;base64,AAAA"}]},
     ["instances[0]", "'mask'"]),
    ({"mode": "naive", "instances": [{"description": "a cat", "mask": _mask_url().replace("iVBOR", "iVBOX")}]},
     ["instances[0]", "'mask'"]),
    ({"mode": "multidiffusion", "md_bootstrap": 2, "instances": BOXES}, ["'md_bootstrap'"]),
])
def test_bad_input_is_a_clear_4xx_and_the_next_plain_image_is_bit_identical(webui, plain, bad, words):
    status, body = webui.txt2img(_with(bad))
    assert 400 <= status < 500, (status, body)
    text = json.dumps(body)
    for word in words:
        assert word in text, text
    status, after = webui.txt2img(BASE)
    assert status == 200 and (pixels(after["images"][0]) == plain).all()


def test_plain_generation_after_the_modes_is_bit_identical(webui, plain):
    status, after = webui.txt2img(BASE)
    assert status == 200 and (pixels(after["images"][0]) == plain).all()


# ---------------------------------------------------------------------------------------------- windows
PANORAMA = {"width": 1024, "height": 512, "steps": 3}
WINDOWS = {"mode": "multidiffusion", "instances": [], "md_stride": 256}  # SD1: 512-px windows, 3 across


@pytest.fixture(scope="module")
def panorama(webui):
    status, body = webui.txt2img(_with(WINDOWS, **PANORAMA))
    assert status == 200, body
    return body


def test_a_512x1024_panorama_is_deterministic_differs_from_plain_and_round_trips(webui, panorama):
    entry = _migc_entry(webui, panorama)
    assert entry["mode"] == "multidiffusion" and entry["md_window"] == 0 and entry["md_stride"] == 256
    status, again = webui.txt2img(_with(WINDOWS, **PANORAMA))
    assert status == 200, again
    image = pixels(panorama["images"][0])
    assert image.shape == (512, 1024, 3) and (pixels(again["images"][0]) == image).all()
    status, plain_wide = webui.txt2img({**BASE, **PANORAMA})
    assert status == 200, plain_wide
    assert abs(pixels(plain_wide["images"][0]) - image).mean() > 1.0
    entry.pop("weights_hash", None)
    status, pasted = webui.txt2img(_with(entry, **PANORAMA))
    assert status == 200, pasted
    assert (pixels(pasted["images"][0]) == image).all()


def test_a_windowed_img2img_upscale_runs_and_differs_from_plain_img2img(webui, plain):
    """The tiled-upscaling workflow, small: a 256² image to 512x384 with 256-px windows, denoising 0.4."""
    buffer = io.BytesIO()
    Image.fromarray(plain.astype("uint8")).resize((512, 384)).save(buffer, format="PNG")
    payload = {**BASE, "width": 512, "height": 384, "steps": 4, "denoising_strength": 0.4,
               "init_images": [base64.b64encode(buffer.getvalue()).decode()]}
    windowed = {**payload, "alwayson_scripts": {"MIGC": {"args": [{**WINDOWS, "md_window": 256, "md_stride": 128,
                                                                   "instances": BOXES}]}}}
    status, body = webui.request("/sdapi/v1/img2img", windowed)
    assert status == 200, body
    assert '"md_window":256' in body["info"].replace("\\", "")
    status, base = webui.request("/sdapi/v1/img2img", payload)
    assert status == 200, base
    assert abs(pixels(body["images"][0]) - pixels(base["images"][0])).mean() > 1.0


def test_the_tiled_vae_gives_the_panorama_the_untiled_image(webui, panorama):
    """``migc_tiled_vae``: Auto leaves a 512x1024 decode untiled; Always tiles it (512-px tiles, shared
    GroupNorm statistics) and the image stays within a few grey levels; the setting is restored after."""
    status, tiled = webui.txt2img({**_with(WINDOWS, **PANORAMA), "override_settings": {"migc_tiled_vae": "Always"}})
    assert status == 200, tiled
    difference = abs(pixels(tiled["images"][0]) - pixels(panorama["images"][0]))
    assert difference.max() <= 3, f"largest difference {difference.max()} grey levels"
