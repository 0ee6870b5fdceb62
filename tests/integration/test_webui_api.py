"""MIGC over the HTTP API of a real running WebUI (A1111 v1.10 or Forge)."""
import json

import pytest

from lib_migc.params import UI_FIELDS

from .conftest import pixels

BASE = {"prompt": "a room", "negative_prompt": "", "steps": 3, "width": 256, "height": 256,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 1234, "batch_size": 1}
INSTANCES = [{"description": "a red ball", "box": [0.05, 0.1, 0.5, 0.9]},
             {"description": "a gray cat", "box": [0.5, 0.2, 0.95, 0.8], "ea": 1.5}]
MIGC = {"enabled": True, "weights": "MIGC_SD14.ckpt", "instances": INSTANCES, "migc_steps": 1.0}


def with_migc(args, **extra):
    return {**BASE, **extra, "alwayson_scripts": {"MIGC": {"args": args}}}


@pytest.fixture(scope="module")
def plain_before(webui):
    status, body = webui.txt2img(BASE)
    assert status == 200, body
    return pixels(body["images"][0])


@pytest.fixture(scope="module")
def migc_result(webui):
    status, body = webui.txt2img(with_migc([MIGC]))
    assert status == 200, body
    return body


def test_script_is_listed_for_txt2img_and_img2img(webui):
    status, body = webui.request("/sdapi/v1/scripts")
    assert status == 200
    assert "migc" in [s.lower() for s in body["txt2img"]] and "migc" in [s.lower() for s in body["img2img"]]
    status, info = webui.request("/sdapi/v1/script-info")
    migc = [s for s in info if s["name"].lower() == "migc" and not s["is_img2img"]]
    assert migc and len(migc[0]["args"]) == len(UI_FIELDS)


def test_dict_form_changes_the_image_and_writes_the_infotext(webui, migc_result, plain_before):
    image = pixels(migc_result["images"][0])
    info = json.loads(migc_result["info"])
    assert "MIGC:" in info["infotexts"][0]
    assert info["prompt"] == "a room, a red ball, a gray cat"
    assert abs(image - plain_before).mean() > 1.0


def test_list_form_gives_the_same_image_as_the_dict_form(webui, migc_result):
    layout = json.dumps({"instances": INSTANCES})
    args = [True, "MIGC_SD14.ckpt", layout, 1.0, 0.0, True, "", True, False, False]
    status, body = webui.txt2img(with_migc(args))
    assert status == 200, body
    assert (pixels(body["images"][0]) == pixels(migc_result["images"][0])).all()


def test_infotext_round_trip_regenerates_the_same_image(webui, migc_result):
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + migc_result["images"][0]})
    assert status == 200, parsed
    params = parsed["parameters"]
    migc = json.loads(params["MIGC"])
    migc.pop("weights_hash")
    assert migc.pop("weights_kind") == "migc"
    payload = with_migc([migc], prompt=params["Prompt"])
    status, body = webui.txt2img(payload)
    assert status == 200, body
    assert (pixels(body["images"][0]) == pixels(migc_result["images"][0])).all()


def test_batch_image_equals_the_single_image_of_its_seed(webui, migc_result):
    status, body = webui.txt2img(with_migc([MIGC], batch_size=2))
    assert status == 200, body
    assert len(body["images"]) == 2
    # Same pixels up to the rounding a larger batch brings to plain SD as well (seen here: max 1 level).
    diff = abs(pixels(body["images"][0]) - pixels(migc_result["images"][0]))
    assert diff.max() <= 2 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_boxes_image_and_naive_fuser_and_hires(webui):
    args = [{**MIGC, "draw_boxes": True, "naive_steps": 0.5, "hires": True}]
    status, body = webui.txt2img(with_migc(args, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                                           denoising_strength=0.5, hr_upscaler="Latent", hr_additional_modules=["Use same choices"]))
    assert status == 200, body
    assert len(body["images"]) == 2  # the image and the boxes overlay


MALFORMED = [
    ({"instances": [{"description": "", "box": [0, 0, 1, 1]}]}, ["instances[0]", "description"]),
    ({"instances": [{"description": "x", "box": [0.5, 0, 0.2, 1]}]}, ["instances[0]", "x1"]),
    ({"instances": [{"description": "x", "box": [0, 0.6, 1, 0.5]}]}, ["instances[0]", "y1"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1.5, 1]}]}, ["instances[0]", "0 to 1"]),
    ({"instances": [{"description": "x", "box": [-0.1, 0, 1, 1]}]}, ["instances[0]", "x0"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1]}]}, ["instances[0]", "4 numbers"]),
    ({"instances": [{"description": "x", "box": "0,0,1,1"}]}, ["instances[0]", "box"]),
    ({"instances": [{"description": "x", "box": [0, 0, "1", 1]}]}, ["instances[0]", "x1"]),
    ({"instances": [{"description": "x"}]}, ["instances[0]", "box"]),
    ({"instances": [{"box": [0, 0, 1, 1]}]}, ["instances[0]", "description"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1], "color": "red"}]}, ["instances[0]", "color"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1], "ca": -1}]}, ["instances[0]", "ca"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1], "ea": 11}]}, ["instances[0]", "ea"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1], "sac": "big"}]}, ["instances[0]", "sac"]),
    ({"instances": [INSTANCES[0], {"description": "y", "box": [0.9, 0.9, 0.1, 0.1]}]}, ["instances[1]", "x1"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1]}] * 29}, ["29 instances", "28 instance slots"]),
    ({"instances": [{"description": "x", "box": [0, 0, 1, 1]}] * 30}, ["30 instances", "at most 29"]),
    ({"instances": [{"description": "x", "mask": "data:image/png;base64,AAAA"}]}, ["instances[0]", "'mask'", "could not be read"]),
    ({"instances": "a cat in a box"}, ["instances", "list"]),
    ({"instances": [3]}, ["instances[0]", "object"]),
    ({"migc_steps": 1.5}, ["migc_steps", "0 to 1"]),
    ({"naive_steps": -0.1}, ["naive_steps"]),
    ({"hires": "yes"}, ["hires", "true or false"]),
    ({"weights": "nope.safetensors"}, ["nope.safetensors", "not found in"]),
    ({"mode": "fast"}, ["mode", "allowed"]),
    ({"use_main_prompt": False, "global_prompt": ""}, ["global prompt is empty"]),
]


@pytest.mark.parametrize("bad,words", MALFORMED, ids=[f"malformed{i}" for i in range(len(MALFORMED))])
def test_malformed_input_is_a_clear_4xx(webui, bad, words):
    status, body = webui.txt2img(with_migc([{**MIGC, **bad}]))
    assert 400 <= status < 500, (status, body)
    message = json.dumps(body)
    for word in words:
        assert word in message, message


def test_plain_generation_after_all_errors_is_bit_identical(webui, plain_before):
    status, body = webui.txt2img(BASE)
    assert status == 200
    assert (pixels(body["images"][0]) == plain_before).all()
