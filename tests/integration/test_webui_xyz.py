"""MIGC's X/Y/Z plot axes in a real running WebUI (A1111 v1.10 or Forge), over HTTP."""
import json

import numpy as np

from .conftest import migc_entry, pixels

BASE = {"prompt": "a room", "negative_prompt": "", "steps": 4, "width": 256, "height": 256,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 77, "batch_size": 1}
INSTANCES = [{"description": "a red ball", "box": [0.05, 0.1, 0.5, 0.9]},
             {"description": "a gray cat", "box": [0.5, 0.2, 0.95, 0.8]}]
MIGC = {"enabled": True, "weights": "MIGC_SD14.ckpt", "instances": INSTANCES, "migc_steps": 0.5}


def axis_index(webui, label: str) -> int:
    status, info = webui.request("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_type = next(a for a in xyz["args"] if a["label"] == "X type")
    assert label in x_type["choices"], x_type["choices"]
    return x_type["choices"].index(label)


def test_a_grid_over_two_migc_steps_values_gives_two_reproducible_cells(webui):
    x = axis_index(webui, "MIGC steps")
    # x type, values, dropdown; y and z: Nothing; legend, lone images, sub-grids, no fixed seeds, vary seeds x/y/z, margin, csv mode
    args = [x, "0, 1", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    status, body = webui.txt2img({**BASE, "script_name": "x/y/z plot", "script_args": args,
                                  "alwayson_scripts": {"MIGC": {"args": [MIGC]}}})
    assert status == 200, body
    infotexts = json.loads(body["info"])["infotexts"]
    cells = [(pixels(image), text) for image, text in zip(body["images"], infotexts) if "MIGC: " in text]
    cells = [(image, text) for image, text in cells if image.shape[:2] == (256, 256)]  # the grid is larger
    assert len(cells) == 2
    entries = [migc_entry(text) for _, text in cells]
    assert [e["migc_steps"] for e in entries] == [0.0, 1.0]
    assert {k: v for k, v in entries[0].items() if k != "migc_steps"} == {k: v for k, v in entries[1].items() if k != "migc_steps"}
    # MIGC off (0) against MIGC in every step (1): with random weights the change is small but far from rounding
    assert np.abs(cells[0][0] - cells[1][0]).mean() > 0.1, "the two MIGC-steps values make different images"
    for image, text in cells:  # each cell regenerates from its own MIGC entry
        entry = {k: v for k, v in migc_entry(text).items() if k not in ("weights_hash", "weights_kind")}
        status, again = webui.txt2img({**BASE, "alwayson_scripts": {"MIGC": {"args": [entry]}}})
        assert status == 200, again
        assert (pixels(again["images"][0]) == image).all()


def test_a_bad_axis_value_is_refused(webui):
    x = axis_index(webui, "MIGC steps")
    args = [x, "0.5, 3", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    status, body = webui.txt2img({**BASE, "script_name": "x/y/z plot", "script_args": args,
                                  "alwayson_scripts": {"MIGC": {"args": [MIGC]}}})
    assert status >= 400 and "MIGC steps" in json.dumps(body), (status, body)


def test_saved_layouts_are_listed_over_the_api(webui):
    """The route is registered in the running WebUI; a layout file put in its folder is listed and returned."""
    import os
    import uuid

    status, listed = webui.request("/migc/layouts")
    assert status == 200 and listed["folder"].endswith("migc_layouts"), listed
    name = f"test {uuid.uuid4().hex[:8]}"
    os.makedirs(listed["folder"], exist_ok=True)
    path = os.path.join(listed["folder"], name + ".json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"instances": INSTANCES}, handle)
    try:
        status, listed = webui.request("/migc/layouts")
        assert name in listed["layouts"]
        status, got = webui.request("/migc/layouts/" + name.replace(" ", "%20"))
        assert status == 200 and got["layout"]["instances"][1]["description"] == "a gray cat"
        assert webui.request("/migc/layouts/no%20such%20layout")[0] == 404
    finally:
        os.remove(path)
