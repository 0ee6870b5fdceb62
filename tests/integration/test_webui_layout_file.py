"""*MIGC layouts from file* in a real running WebUI (A1111 v1.10 or Forge), through the API's script_name."""
import json

from test_layout_file import COCO_MIG as YAML  # two entries in the COCO-MIG benchmark's format

from .conftest import migc_entry

BASE = {"prompt": "ignored", "negative_prompt": "", "steps": 3, "width": 256, "height": 256,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 500, "batch_size": 1}


def test_a_coco_mig_yaml_runs_with_two_seeds_per_layout(webui):
    status, body = webui.txt2img({**BASE, "script_name": "migc layouts from file", "script_args": [YAML, 2]})
    assert status == 200, body
    info = json.loads(body["info"])
    assert len(body["images"]) == 4 and len(info["infotexts"]) == 4
    entries = [migc_entry(text) for text in info["infotexts"]]
    assert [len(e["instances"]) for e in entries] == [3, 3, 1, 1]
    assert [text.split("Seed: ")[1].split(",")[0] for text in info["infotexts"]] == ["500", "501", "500", "501"]
    assert info["infotexts"][0].startswith("a photo of a red cup and a blue cup")


def test_a_bad_line_is_named(webui):
    text = '{"prompt": "x", "layout": {"instances": [{"description": "a", "box": [0.1, 0.1, 0.5, 0.5]}]}}\n{"prompt": 3}'
    status, body = webui.txt2img({**BASE, "script_name": "migc layouts from file", "script_args": [text, 1]})
    assert status >= 400 and "line 2" in json.dumps(body), (status, body)
