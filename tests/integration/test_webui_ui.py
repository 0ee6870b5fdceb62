"""The MIGC panel in the real WebUI page (headless Chromium): it renders, and pasting an infotext restores it."""
import json
import os
import re
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


def test_with_migc_alone_the_panel_fits_one_1000px_screen(page):
    """Issue 19: at 1400 px wide (the fixture's width; the height does not change the layout), MIGC mode with two
    instances, the add-on sections collapsed: the whole panel, editor and rows included, is at most 1000 px tall."""
    acc = page.locator("#txt2img_migc_enabled")
    if not page.locator("#txt2img_migc_editor_root canvas").first.is_visible():
        page.locator("#txt2img_migc_enabled .label-wrap, #txt2img_migc_enabled > .label-wrap").first.click()
    page.locator("#txt2img_migc_editor_root canvas").first.wait_for(state="visible", timeout=30_000)
    page.locator("#txt2img_migc_mode label").filter(has_text="migc").first.click()
    layout = page.locator("#txt2img_migc_layout textarea")
    page.evaluate("([sel, value]) => { const t = document.querySelector(sel); t.value = value;"
                  " t.dispatchEvent(new Event('input', {bubbles: true})); }",
                  ["#txt2img_migc_layout textarea", json.dumps({"instances": INSTANCES})])
    page.wait_for_timeout(800)
    assert "a red ball" in layout.input_value()
    height = acc.bounding_box()["height"]
    shot = os.path.join(os.environ.get("MIGC_SCREENSHOTS", tempfile.gettempdir()), "migc_panel_migc_mode.png")
    acc.screenshot(path=shot)
    page.evaluate("sel => { const t = document.querySelector(sel); t.value = '';"
                  " t.dispatchEvent(new Event('input', {bubbles: true})); }", "#txt2img_migc_layout textarea")
    page.wait_for_timeout(500)  # the next test waits for its paste to fill this box
    assert height <= 1000, f"the MIGC panel is {height:.0f} px tall with MIGC alone (screenshot: {shot})"


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


def _set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_pasted_infotext_redraws_the_box_editor(page):
    """The paste above went through the WebUI's own paste code: the editor's list and canvas follow."""
    page.wait_for_function("() => document.querySelectorAll('#txt2img_migc_list .migc-row').length === 2", timeout=10_000)
    descriptions = page.locator("#txt2img_migc_list .migc-desc").evaluate_all("els => els.map(e => e.value)")
    assert descriptions == ["a red ball", "a gray cat"]


def test_box_editor_drives_a_real_generation(page):
    """Draw two boxes in the real page, generate from the UI, and find them in the image's infotext."""
    for tab in ("txt2img", "img2img"):
        assert page.locator(f"#{tab}_migc_editor_root").count() == 1, f"no box editor in {tab}"
    enabled = page.locator("#txt2img_migc_enabled input[type=checkbox]").first
    if not enabled.is_checked():
        enabled.check()
    page.locator("#txt2img_migc_clear").click()
    _set_number(page, "#txt2img_width", 384)
    _set_number(page, "#txt2img_height", 256)
    _set_number(page, "#txt2img_steps", 3)
    canvas = page.locator("#txt2img_migc_editor_root canvas")
    canvas.scroll_into_view_if_needed()
    page.wait_for_function("() => { const c = document.querySelector('#txt2img_migc_editor_root canvas');"
                           " return Math.abs(c.clientWidth / c.clientHeight - 1.5) < 0.02; }", timeout=10_000)

    def drag(a, b):
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + a[0] * box["width"], box["y"] + a[1] * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + b[0] * box["width"], box["y"] + b[1] * box["height"], steps=6)
        page.mouse.up()

    drag((0.05, 0.2), (0.45, 0.9))
    page.locator("#txt2img_migc_list .migc-row[data-index='0'] .migc-desc").fill("a red ball")
    drag((0.55, 0.3), (0.95, 0.9))
    page.locator("#txt2img_migc_list .migc-row[data-index='1'] .migc-desc").fill("a gray cat")
    layout = json.loads(page.locator("#txt2img_migc_layout textarea").input_value())["instances"]
    assert [i["description"] for i in layout] == ["a red ball", "a gray cat"]
    page.locator("#txt2img_prompt textarea").fill("a room")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => (document.querySelector('#html_info_txt2img') || {}).innerText?.includes('MIGC:')", timeout=600_000)
    info = page.locator("#html_info_txt2img").first.inner_text()
    assert "Size: 384x256" in info and "a red ball" in info and "a gray cat" in info, info
    quoted = re.search(r'MIGC: ("(?:[^"\\]|\\.)*")', info)
    assert quoted, info
    recorded = json.loads(json.loads(quoted.group(1)))
    assert recorded["instances"] == layout, (recorded, layout)
    shot = os.path.join(os.environ.get("MIGC_SCREENSHOTS", tempfile.gettempdir()), "migc_webui_generation.png")
    page.screenshot(path=shot, full_page=True)
    enabled.uncheck()


def test_skipped_structure_phrases_are_told_under_the_image(page):
    """Paste an infotext with StructureDiffusion (one phrase not in the prompt) and generate from the UI."""
    migc = {"enabled": False, "instances": [], "structure": {"enabled": True, "mode": "default",
                                                           "phrases": ["a red car", "a purple dog"]}}
    text = json.dumps(json.dumps(migc, separators=(",", ":")))
    infotext = f"a red car and a white sheep\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 256x256, MIGC: {text}"
    page.locator("#txt2img_prompt textarea").fill(infotext)
    page.locator("#txt2img_tools #paste, #txt2img_actions_column #paste").first.click()
    page.wait_for_function("() => document.querySelector('#txt2img_migc_structure_enabled input').checked", timeout=30_000)
    assert "a purple dog" in page.locator("#txt2img_migc_structure_custom textarea").input_value()
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => Array.from(document.querySelectorAll('#html_log_txt2img, #html_info_txt2img, .comments'))"
                           ".some(e => e.innerText.includes('a purple dog'))", timeout=600_000)
    text = " ".join(page.locator(".comments, #html_log_txt2img").all_inner_texts())
    assert "StructureDiffusion skipped phrase(s): 'a purple dog' (it is not in the prompt)" in text, text
    page.locator("#txt2img_migc_structure_enabled input").uncheck()
