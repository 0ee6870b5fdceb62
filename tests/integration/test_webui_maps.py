"""*Show instance maps* in a real running WebUI (A1111 v1.10 or Forge), over HTTP: one map image per
generated image, the generated images unchanged, for MIGC and for a training-free mode."""
import json

import numpy as np
import pytest

from .conftest import migc_entry, pixels

BASE = {"prompt": "a room", "negative_prompt": "", "steps": 4, "width": 256, "height": 256,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 91, "batch_size": 2}
INSTANCES = [{"description": "a red ball", "box": [0.05, 0.1, 0.5, 0.9]},
             {"description": "a gray cat", "box": [0.5, 0.2, 0.95, 0.8]}]
MIGC = {"enabled": True, "weights": "MIGC_SD14.ckpt", "instances": INSTANCES, "migc_steps": 1.0}
# the editor's palette for instances 1 and 2 (lib_migc/core/draw.py)
COLOURS = [(230, 25, 75), (60, 180, 75)]


def _run(webui, entry):
    status, body = webui.txt2img({**BASE, "alwayson_scripts": {"MIGC": {"args": [entry]}}})
    assert status == 200, body
    return [pixels(image) for image in body["images"]], json.loads(body["info"])["infotexts"]


@pytest.mark.parametrize("mode", ["migc", "multidiffusion"])
def test_maps_add_one_image_per_image_and_leave_the_images_alone(webui, mode):
    entry = {**MIGC, "mode": mode} if mode != "migc" else MIGC
    plain, _ = _run(webui, entry)
    images, infotexts = _run(webui, {**entry, "maps": True})
    generated = [image for image in images if image.shape[:2] == (256, 256)]
    maps = [image for image in images if image.shape[0] > 256 and image.shape[1] == 256]
    assert len(generated) == 2 and len(maps) == 2, [image.shape for image in images]
    plain_generated = [image for image in plain if image.shape[:2] == (256, 256)]
    for a, b in zip(plain_generated, generated):
        assert (a == b).all(), "the main image is the same with and without maps"
    assert all(migc_entry(text)["maps"] is True for text in infotexts)
    for picture, image in zip(maps, generated):
        assert picture[:256].astype(float).mean() < image.astype(float).mean()  # the result dimmed under the colours
        assert picture[256:].max() > 200  # the legend's text
    if mode == "multidiffusion":  # one box's cells are all its own there: its colour, nearly opaque
        for picture in maps:
            left, right = picture[64:192, 20:100].reshape(-1, 3), picture[80:176, 160:230].reshape(-1, 3)
            for area, i in ((left, 0), (right, 1)):
                distances = [np.abs(area - np.array(c)).sum(1).mean() for c in COLOURS]
                assert int(np.argmin(distances)) == i, (i, distances)
