"""The MIGC panel in the real WebUI page (headless Chromium): it renders, and pasting an infotext restores it."""
import json
import os
import shutil
import tempfile

import pytest

from .test_webui_api import INSTANCES

CHROMIUM = os.environ.get("MIGC_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def page(webui):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at MIGC_CHROMIUM")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(webui.url, timeout=180_000)
        page.wait_for_selector("#txt2img_migc_layout", state="attached", timeout=180_000)
        yield page
        browser.close()


def test_panel_renders_in_txt2img_and_img2img(page):
    for tab in ("txt2img", "img2img"):
        assert page.locator(f"#{tab}_migc_layout").count() == 1
        assert page.locator(f"#{tab}_migc_weights").count() == 1
    page.locator("#txt2img_migc_enabled .label-wrap, #txt2img_migc_enabled > .label-wrap").first.click()
    page.wait_for_timeout(500)
    shot = os.path.join(os.environ.get("MIGC_SCREENSHOTS", tempfile.gettempdir()), "migc_panel.png")
    page.locator("#txt2img_migc_enabled").screenshot(path=shot)
    assert os.path.getsize(shot) > 0


def test_pasting_an_infotext_restores_the_panel(page):
    migc = {"weights": "MIGC_SD14.ckpt", "migc_steps": 0.3, "naive_steps": 0.1, "use_main_prompt": True,
            "append_descriptions": True, "draw_boxes": True, "hires": False, "instances": INSTANCES, "weights_hash": "0"}
    text = json.dumps(json.dumps(migc, separators=(",", ":")))
    infotext = f"a room, a red ball, a gray cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 256x256, MIGC: {text}"
    page.locator("#txt2img_prompt textarea").fill(infotext)
    page.locator("#txt2img_tools #paste, #txt2img_actions_column #paste").first.click()
    page.wait_for_function("() => document.querySelector('#txt2img_migc_layout textarea').value.includes('a red ball')", timeout=30_000)
    layout = json.loads(page.locator("#txt2img_migc_layout textarea").input_value())
    assert [i["description"] for i in layout["instances"]] == ["a red ball", "a gray cat"]
    assert layout["instances"][1]["ea"] == 1.5
    steps = page.locator("#txt2img_migc_steps input[type=number]").input_value()
    assert abs(float(steps) - 0.3) < 1e-6
    assert page.locator("#txt2img_migc_draw_boxes input").is_checked()
