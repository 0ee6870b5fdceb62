"""MIGC survives interrupts, skips, every attention optimisation and img2img on a real WebUI."""
import base64
import io
import threading
import time

import pytest

from .conftest import pixels
from .test_webui_api import BASE, MIGC, with_migc

OPTIMISATIONS = ["InvokeAI", "Doggettx", "sdp-no-mem - scaled dot product without memory efficient attention",
                 "sdp - scaled dot product", "sub-quadratic", "V1 - original v1", "None"]


@pytest.fixture(scope="module")
def plain_before(webui):
    status, body = webui.txt2img(BASE)
    assert status == 200, body
    return pixels(body["images"][0])


@pytest.mark.parametrize("endpoint", ["interrupt", "skip"])
def test_interrupted_or_skipped_job_leaves_nothing_behind(webui, plain_before, endpoint):
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("status", "body"), webui.txt2img(with_migc([MIGC], steps=40)))))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(1)
        _, progress = webui.request("/sdapi/v1/progress?skip_current_image=true")
        if progress.get("state", {}).get("sampling_step", 0) >= 1:
            break
    webui.request(f"/sdapi/v1/{endpoint}", {})
    worker.join(600)
    assert result.get("status") == 200, result
    status, body = webui.txt2img(BASE)
    assert status == 200 and (pixels(body["images"][0]) == plain_before).all()


def test_every_attention_optimisation_runs_migc_and_restores_plain(webui, plain_before):
    status, options = webui.request("/sdapi/v1/options")
    if "cross_attention_optimization" not in options:
        pytest.skip("this WebUI has no cross-attention optimisation setting (Forge picks its attention itself)")
    original = options["cross_attention_optimization"]
    try:
        for name in OPTIMISATIONS:
            assert webui.request("/sdapi/v1/options", {"cross_attention_optimization": name})[0] == 200
            status, body = webui.txt2img(with_migc([MIGC], steps=2))
            assert status == 200, (name, body)
    finally:
        webui.request("/sdapi/v1/options", {"cross_attention_optimization": original})
    status, body = webui.txt2img(BASE)
    assert (pixels(body["images"][0]) == plain_before).all()


def test_img2img_with_migc(webui, plain_before):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(plain_before.astype("uint8")).save(buffer, format="PNG")
    payload = {**with_migc([MIGC], steps=4), "init_images": [base64.b64encode(buffer.getvalue()).decode()], "denoising_strength": 0.75}
    status, body = webui.request("/sdapi/v1/img2img", payload)
    assert status == 200, body
    assert "MIGC:" in body["info"]
