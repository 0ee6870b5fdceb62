"""MagicFusion over the HTTP API of a real running WebUI (A1111 v1.10 or Forge).

Needs a second SD1.x checkpoint in the WebUI's list besides the loaded one (MIGC_MODEL_B names it;
otherwise the first other checkpoint is used, and the tests are skipped when there is none).
"""
import json
import os

import pytest

from .conftest import generate, payload, pixels
from .test_webui_api import BASE

PROMPT = "a lion with a crown"


@pytest.fixture(scope="module")
def model_b(webui):
    webui.request("/sdapi/v1/refresh-checkpoints", {})
    status, models = webui.request("/sdapi/v1/sd-models")
    status, options = webui.request("/sdapi/v1/options")
    loaded = options.get("sd_model_checkpoint", "")
    wanted = os.environ.get("MIGC_MODEL_B")
    titles = [m["title"] for m in models]
    if wanted:
        match = [t for t in titles if wanted in t]
        assert match, f"MIGC_MODEL_B={wanted!r} is not in the checkpoint list {titles}"
        return match[0]
    others = [t for t in titles if t != loaded and t.split(" [")[0] not in loaded]
    if not others:
        pytest.skip("the WebUI has no second checkpoint for MagicFusion's model B")
    return others[0]


def request(args=None, **extra):
    return payload(BASE, PROMPT, args, **extra)


def fusion(model_b, **extra):
    return [{"enabled": False, "magicfusion": {"enabled": True, "model_b": model_b, "switch_t": 0, **extra}}]


@pytest.fixture(scope="module")
def plain(webui):
    return pixels(generate(webui, request())["images"][0])


@pytest.fixture(scope="module")
def fused(webui, model_b):
    status, body = webui.txt2img(request(fusion(model_b)))
    assert status == 200, body
    return body


def test_fused_image_differs_and_records_model_b(fused, plain, model_b):
    assert abs(pixels(fused["images"][0]) - plain).mean() > 1.0
    info = json.loads(fused["info"])
    migc = json.loads(info["extra_generation_params"]["MIGC"])
    assert migc["magicfusion"]["model_b"] == model_b and migc["magicfusion"]["model_b_hash"]


def test_window_without_steps_runs_a_alone_bit_identically(webui, model_b, plain):
    status, body = webui.txt2img(request(fusion(model_b, window_mode="SNB-then-A", switch_t=1000)))
    assert status == 200, body
    assert (pixels(body["images"][0]) == plain).all()


def test_infotext_round_trip_regenerates_the_fused_image(webui, fused):
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + fused["images"][0]})
    assert status == 200, parsed
    migc = json.loads(parsed["parameters"]["MIGC"])
    status, body = webui.txt2img(request([migc]))
    assert status == 200, body
    assert (pixels(body["images"][0]) == pixels(fused["images"][0])).all()


def test_prompt_b_changes_the_fused_image(webui, model_b, fused):
    status, body = webui.txt2img(request(fusion(model_b, prompt_b="a cartoon lion")))
    assert status == 200, body
    assert abs(pixels(body["images"][0]) - pixels(fused["images"][0])).mean() > 0.5


@pytest.mark.parametrize("bad,code,words", [
    ({"model_b": "no-such-model"}, 404, "not in the checkpoint list"),
    ({"k_a": 0}, 422, "'k_a' must be a finite number > 0"),
    ({"window_mode": "sometimes"}, 422, "'window_mode' must be one of"),
])
def test_bad_fusion_input_is_a_clear_4xx_and_leaves_nothing_behind(webui, model_b, plain, bad, code, words):
    status, body = webui.txt2img(request([{"enabled": False, "magicfusion": {"enabled": True, "model_b": model_b, **bad}}]))
    assert status == code, (status, body)
    assert words in json.dumps(body), body
    status, again = webui.txt2img(request())
    assert (pixels(again["images"][0]) == plain).all()
