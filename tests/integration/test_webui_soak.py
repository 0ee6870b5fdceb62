"""Forty jobs of every kind on a real WebUI: the server's memory after each plain job stays where it was
after the first one, and the last plain image is bit-identical to the first.

Reads the server's resident memory from /proc (the WebUI must run on this machine; skipped otherwise).
"""
import threading
import time

import pytest

from .conftest import URL, find_model_b, pixels, server_rss_bytes
from .test_webui_modes import _mask_url, PLUS

SIZE = {"width": 128, "height": 128}
BASE = {"prompt": "a red ball and a gray cat in a room", "negative_prompt": "", "steps": 3, **SIZE,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 99, "batch_size": 1}
BOXES = [{"description": "a red ball", "box": [0.0625, 0.125, 0.5, 0.875]},
         {"description": "a gray cat", "box": [0.5, 0.25, 0.9375, 0.75]}]
ALLOWED_GROWTH = 100 * 1024 * 1024


def _kinds(model_b):
    kinds = {
        "migc": {"weights": "MIGC_SD14.ckpt", "instances": BOXES, "migc_steps": 1.0},
        "migc++ masks": {"weights": PLUS, "instances": [{"description": "a gray cat", "mask": _mask_url(128, 128)}, BOXES[0]],
                         "migc_steps": 1.0},
        "naive": {"mode": "naive", "weights": "none.ckpt", "instances": BOXES},
        "multidiffusion": {"mode": "multidiffusion", "instances": BOXES},
        "structure": {"enabled": False, "instances": BOXES, "structure": {"enabled": True}},
        "failing layout": {"weights": "MIGC_SD14.ckpt", "instances": [{"description": "x", "box": [0.6, 0, 0.2, 1]}]},
        "interrupted": {"weights": "MIGC_SD14.ckpt", "instances": BOXES, "migc_steps": 1.0},
    }
    if model_b:
        kinds["magicfusion"] = {"enabled": False, "magicfusion": {"enabled": True, "model_b": model_b, "switch_t": 0}}
    return kinds


def _interrupted(webui, request):
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("status", "body"), webui.txt2img({**request, "steps": 30}))))
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline and worker.is_alive():
        time.sleep(0.5)
        _, progress = webui.request("/sdapi/v1/progress?skip_current_image=true")
        if progress.get("state", {}).get("sampling_step", 0) >= 1:
            break
    webui.request("/sdapi/v1/interrupt", {})
    worker.join(600)
    return result.get("status")


def test_forty_jobs_leave_memory_and_the_plain_image_as_they_were(webui):
    if server_rss_bytes(URL) is None:
        pytest.skip("the WebUI's process is not on this machine (its memory cannot be read)")
    kinds = _kinds(find_model_b(webui))
    order = list(kinds)
    plain_images, memory, log = [], [], []
    for index in range(40):
        if index % 2 == 0:
            status, body = webui.txt2img(BASE)
            assert status == 200, body
            plain_images.append(pixels(body["images"][0]))
            memory.append(server_rss_bytes(URL))
            log.append(("plain", status))
            continue
        kind = order[(index // 2) % len(order)]
        request = {**BASE, "alwayson_scripts": {"MIGC": {"args": [kinds[kind]]}}}
        if kind == "interrupted":
            status = _interrupted(webui, request)
            assert status == 200
        else:
            status, body = webui.txt2img(request)
            expected = 422 if kind == "failing layout" else 200
            assert status == expected, (kind, status, body)
        log.append((kind, status))
    assert {kind for kind, _ in log} >= set(order) | {"plain"}, log
    growth = [m - memory[0] for m in memory]
    after = [kind for kind, _ in log[1::2]]  # the job before each later plain job
    report = ", ".join(f"{g / 2**20:.0f} MB after {k}" for g, k in zip(growth[1:], after))
    assert max(growth) <= ALLOWED_GROWTH, report
    assert (plain_images[-1] == plain_images[0]).all()
    print("RSS after each plain job (MB):", [round(m / 2**20) for m in memory])
