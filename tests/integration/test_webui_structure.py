"""StructureDiffusion over the HTTP API of a real running WebUI (A1111 v1.10 or Forge)."""
import json

import pytest

from .conftest import generate, payload, pixels
from .test_webui_api import BASE, INSTANCES, MIGC

PROMPT = "a red car and a white sheep on a green meadow"
STRUCTURE = {"enabled": False, "structure": {"enabled": True, "phrases": ["a red car", "a white sheep", "a purple dog"]}}


def changed(a, b) -> bool:
    """Images differ beyond noise. The random-weight SD1.5 reacts weakly to text at 3 steps, so
    StructureDiffusion moves its pixels by a fraction of a grey level on average, but a plain rerun
    is bit-identical (see the 4xx tests), so any broad change is the method's."""
    diff = abs(a - b)
    return diff.mean() > 0.05 and (diff > 0).mean() > 0.05


def request(prompt=PROMPT, args=None):
    return payload(BASE, prompt, args)


@pytest.fixture(scope="module")
def plain(webui):
    return pixels(generate(webui, request())["images"][0])


@pytest.fixture(scope="module")
def structured(webui):
    status, body = webui.txt2img(request(args=[STRUCTURE]))
    assert status == 200, body
    return body


def test_structure_alone_changes_the_image_and_records_it(structured, plain):
    """(The skipped phrase is told under the image in the UI: see test_webui_ui.py.)"""
    info = json.loads(structured["info"])
    migc = json.loads(info["extra_generation_params"]["MIGC"])
    assert migc["enabled"] is False and migc["structure"] == STRUCTURE["structure"] | {"mode": "default"}
    assert info["prompt"] == PROMPT, "StructureDiffusion alone does not add anything to the prompt"
    assert changed(pixels(structured["images"][0]), plain)


def test_conjunction_differs_from_default(webui, structured):
    args = [{**STRUCTURE, "structure": {**STRUCTURE["structure"], "mode": "conjunction"}}]
    status, body = webui.txt2img(request(args=args))
    assert status == 200, body
    assert changed(pixels(body["images"][0]), pixels(structured["images"][0]))


def test_infotext_round_trip_regenerates_the_structured_image(webui, structured):
    status, parsed = webui.request("/sdapi/v1/png-info", {"image": "data:image/png;base64," + structured["images"][0]})
    assert status == 200, parsed
    migc = json.loads(parsed["parameters"]["MIGC"]) if isinstance(parsed["parameters"].get("MIGC"), str) else parsed["parameters"]["MIGC"]
    assert migc["structure"]["phrases"] == ["a red car", "a white sheep", "a purple dog"] and migc["enabled"] is False
    status, body = webui.txt2img(request(args=[migc]))
    assert status == 200, body
    assert (pixels(body["images"][0]) == pixels(structured["images"][0])).all()


def test_structure_with_migc_uses_the_instance_descriptions(webui):
    status, body = webui.txt2img(request(prompt="a room", args=[{**MIGC, "structure": {"enabled": True}}]))
    assert status == 200, body
    status, migc_only = webui.txt2img(request(prompt="a room", args=[MIGC]))
    assert status == 200
    assert changed(pixels(body["images"][0]), pixels(migc_only["images"][0]))
    assert INSTANCES[0]["description"] in json.loads(body["info"])["prompt"]


@pytest.mark.parametrize("bad,words", [
    ({"mode": "fast"}, "field 'mode'"), ({"phrases": []}, "field 'phrases'"), ({"size": 3}, "unknown field"),
])
def test_bad_structure_input_is_a_clear_4xx_and_leaves_nothing_behind(webui, plain, bad, words):
    status, body = webui.txt2img(request(args=[{"enabled": False, "structure": {"enabled": True, **bad}}]))
    assert 400 <= status < 500, (status, body)
    assert words in json.dumps(body), body
    status, again = webui.txt2img(request())
    assert status == 200
    assert (pixels(again["images"][0]) == plain).all()


def test_and_prompts_are_refused_with_a_message(webui, plain):
    status, body = webui.txt2img(request(prompt="a red car AND a white sheep", args=[STRUCTURE]))
    assert 400 <= status < 500 and "AND sub-prompts" in json.dumps(body), (status, body)
    status, again = webui.txt2img(request())
    assert (pixels(again["images"][0]) == plain).all()
