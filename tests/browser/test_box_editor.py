"""The box editor in a real browser, against the demo app under A1111's and Forge's gradio.

Every step asserts the hidden layout JSON (what the editor wrote) and, through the demo's "Check
layout" button, what Python receives from gradio, so the sync path itself is tested.
"""
from __future__ import annotations

import json
import re

import pytest

TOL = 0.01  # a box edge may land one CSS pixel off on a ~500 px canvas


class Editor:
    """One tab's MIGC editor on the page."""

    def __init__(self, page, tab: str) -> None:
        self.page, self.tab = page, tab
        self.canvas = page.locator(f"#{tab}_migc_editor_root canvas")

    def open(self) -> "Editor":
        self.page.locator(".tab-nav button, button[role=tab]").filter(has_text=re.compile(rf"^\s*{self.tab}\s*$")).first.click()
        label = self.page.locator(f"#{self.tab}_migc_accordion .label-wrap").first
        label.wait_for(state="visible", timeout=30_000)
        if not self.canvas.is_visible():
            label.click()
        self.canvas.wait_for(state="visible", timeout=30_000)
        self.page.wait_for_timeout(400)  # the ResizeObserver lays the canvas out
        return self

    # ------------------------------------------------------------ reading
    def layout(self) -> list[dict]:
        text = self.page.locator(f"#{self.tab}_migc_layout textarea").input_value()
        return json.loads(text)["instances"] if text.strip() else []

    def boxes(self) -> list[list[float]]:
        return [inst["box"] for inst in self.layout()]

    def python_sees(self) -> str:
        """Click "Check layout" and return the fresh answer (without its [#n] counter)."""
        out = self.page.locator(f"#{self.tab}_migc_parsed textarea, #{self.tab}_migc_parsed input").first
        before = out.input_value()
        self.page.locator(f"#{self.tab}_migc_check").click()
        self.page.wait_for_function(
            "([sel, before]) => { const e = document.querySelector(sel); return e && e.value && e.value !== before; }",
            arg=[f"#{self.tab}_migc_parsed textarea, #{self.tab}_migc_parsed input", before], timeout=30_000)
        return re.sub(r"^\[#\d+\] ", "", out.input_value())

    def python_layout(self) -> list[dict]:
        answer = self.python_sees()
        assert not answer.startswith("ERROR"), answer
        return json.loads(answer.split(" ", 1)[1])["instances"]

    def pixel(self, fx: float, fy: float) -> list[int]:
        return self.canvas.evaluate(
            "(c, [fx, fy]) => Array.from(c.getContext('2d').getImageData(Math.floor(fx * (c.width - 1)), Math.floor(fy * (c.height - 1)), 1, 1).data)",
            [fx, fy])

    # ------------------------------------------------------------ acting
    def point(self, fx: float, fy: float) -> tuple[float, float]:
        box = self.canvas.bounding_box()
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    def drag(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        self.canvas.scroll_into_view_if_needed()
        mouse = self.page.mouse
        mouse.move(*self.point(*start))
        mouse.down()
        mouse.move(*self.point(*end), steps=6)
        mouse.up()
        self.page.wait_for_timeout(100)

    def describe(self, index: int, text: str) -> None:
        self.page.locator(f"#{self.tab}_migc_list .migc-row[data-index='{index}'] .migc-desc").fill(text)

    def set_slider(self, name: str, value: int) -> None:
        box = self.page.locator(f"#{self.tab}_{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        self.page.wait_for_timeout(700)  # the editor polls the sliders


def assert_box(actual, expected, tol=TOL):
    assert len(actual) == 4 and all(abs(a - e) <= tol for a, e in zip(actual, expected)), f"{actual} != {expected}"


@pytest.fixture(scope="module")
def page(demo, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(demo.url, timeout=120_000)
    page.wait_for_selector("#txt2img_migc_editor_root canvas", state="attached", timeout=120_000)
    page.js_errors = errors
    yield page
    context.close()


def test_draw_move_resize_delete_resize_image_undo(page, shots):
    ed = Editor(page, "txt2img").open()
    assert ed.layout() == []

    ed.drag((0.1, 0.2), (0.4, 0.6))
    ed.describe(0, "a red teddy bear")
    ed.drag((0.55, 0.3), (0.9, 0.8))
    ed.describe(1, "a gray cat")
    assert [i["description"] for i in ed.layout()] == ["a red teddy bear", "a gray cat"]
    assert_box(ed.boxes()[0], [0.1, 0.2, 0.4, 0.6])
    assert_box(ed.boxes()[1], [0.55, 0.3, 0.9, 0.8])
    assert ed.python_layout() == ed.layout()
    shots(page, "1-two-boxes", f"#{ed.tab}_migc_editor_root")

    ed.drag((0.25, 0.4), (0.35, 0.3))  # move box 1 by (+0.1, -0.1)
    assert_box(ed.boxes()[0], [0.2, 0.1, 0.5, 0.5])
    assert_box(ed.boxes()[1], [0.55, 0.3, 0.9, 0.8])
    assert ed.python_layout() == ed.layout()

    ed.drag((0.9, 0.8), (0.95, 0.9))  # resize box 2 by its bottom-right corner
    assert_box(ed.boxes()[1], [0.55, 0.3, 0.95, 0.9])
    ed.drag((0.55, 0.6), (0.6, 0.6))  # and by its left edge
    assert_box(ed.boxes()[1], [0.6, 0.3, 0.95, 0.9])
    assert ed.python_layout() == ed.layout()
    shots(page, "2-moved-resized", f"#{ed.tab}_migc_editor_root")

    ed.canvas.click(position=_css(ed, 0.3, 0.3))  # select box 1, delete it with the button
    page.locator(f"#{ed.tab}_migc_delete").click()
    assert [i["description"] for i in ed.layout()] == ["a gray cat"]
    assert_box(ed.boxes()[0], [0.6, 0.3, 0.95, 0.9])
    assert ed.python_layout() == ed.layout()

    before = ed.layout()
    ratio_before = ed.canvas.evaluate("c => c.clientWidth / c.clientHeight")
    ed.set_slider("width", 1024)
    ratio = ed.canvas.evaluate("c => c.clientWidth / c.clientHeight")
    assert abs(ratio_before - 1) < 0.02 and abs(ratio - 2) < 0.03, (ratio_before, ratio)
    assert ed.layout() == before, "changing the image size must not move boxes"
    assert ed.python_sees().startswith("1024x512 ")
    shots(page, "3-wide", f"#{ed.tab}_migc_editor_root")

    ed.canvas.focus()
    page.keyboard.press("Control+z")  # undo the delete
    assert [i["description"] for i in ed.layout()] == ["a red teddy bear", "a gray cat"]
    assert_box(ed.boxes()[0], [0.2, 0.1, 0.5, 0.5])
    assert ed.python_layout() == ed.layout()
    ed.canvas.focus()  # the check button took the focus; the editor's keys work inside the editor
    page.keyboard.press("Control+Shift+z")  # redo it
    assert len(ed.layout()) == 1
    page.keyboard.press("Control+z")
    assert len(ed.layout()) == 2
    ed.set_slider("width", 512)
    assert not page.js_errors, page.js_errors


def _css(ed: Editor, fx: float, fy: float) -> dict:
    box = ed.canvas.bounding_box()
    return {"x": fx * box["width"], "y": fy * box["height"]}


def test_keyboard_nudge_delete_and_snap(page):
    ed = Editor(page, "txt2img").open()
    page.locator(f"#{ed.tab}_migc_clear").click()
    assert ed.layout() == []
    page.locator(f"#{ed.tab}_migc_snap").check()
    ed.drag((0.103, 0.207), (0.498, 0.613))
    box = ed.boxes()[0]
    assert all(abs(v * 512 - round(v * 512 / 8) * 8) < 1e-6 for v in box), box  # 8-px grid at 512x512
    ed.describe(0, "a vase")
    ed.canvas.click(position=_css(ed, 0.3, 0.4))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    moved = ed.boxes()[0]
    assert abs((moved[0] - box[0]) * 512 - 8) < 1e-3 and abs((moved[1] - box[1]) * 512 - 64) < 1e-3, (box, moved)
    page.keyboard.press("Control+z")  # both nudges are one step
    assert ed.boxes()[0] == box
    page.keyboard.press("Delete")
    assert ed.layout() == []
    assert ed.python_sees().endswith('{"instances":[]}')
    page.locator(f"#{ed.tab}_migc_snap").uncheck()


def test_list_edits_scales_reorder_and_warnings(page, shots):
    ed = Editor(page, "txt2img").open()
    page.locator(f"#{ed.tab}_migc_clear").click()
    ed.drag((0.05, 0.05), (0.45, 0.45))
    ed.describe(0, "a red ball")
    ed.drag((0.6, 0.6), (0.65, 0.95))  # 25.6 px wide at 512: under one 32-px cell of the 16x16 grid
    ed.describe(1, "a thin lamp")
    row = page.locator(f"#{ed.tab}_migc_list .migc-row[data-index='0']")
    row.locator("input.migc-scale").nth(1).fill("1.5")  # EA
    assert ed.layout()[0]["ea"] == 1.5
    status = page.locator(f"#{ed.tab}_migc_status").inner_text()
    assert "#2 is" in status and "smaller than one cell" in status, status
    assert "migc-flagged" in page.locator(f"#{ed.tab}_migc_list .migc-row[data-index='1']").get_attribute("class")
    shots(page, "warning", f"#{ed.tab}_migc_editor_root")
    page.locator(f"#{ed.tab}_migc_list .migc-row[data-index='1'] .migc-up").click()
    assert [i["description"] for i in ed.layout()] == ["a thin lamp", "a red ball"]
    assert ed.layout()[1]["ea"] == 1.5
    assert ed.python_layout() == ed.layout()
    # An empty description is what Python rejects, with the instance named.
    ed.describe(0, "")
    answer = ed.python_sees()
    assert answer.startswith("ERROR") and "instances[0] (box #1)" in answer and "description" in answer, answer
    ed.describe(0, "a thin lamp")


def test_infotext_paste_redraws_the_boxes(page):
    ed = Editor(page, "txt2img").open()
    migc = {"weights": "MIGC_SD14.ckpt", "migc_steps": 0.3, "instances": [
        {"description": "a green pear", "box": [0.1, 0.1, 0.4, 0.9]},
        {"description": "a blue cup", "box": [0.6, 0.5, 0.9, 0.9], "sac": 2},
    ]}
    page.locator(f"#{ed.tab}_migc_infotext textarea, #{ed.tab}_migc_infotext input").first.fill(json.dumps(migc))
    page.locator(f"#{ed.tab}_migc_paste").click()
    page.wait_for_function(f"() => document.querySelectorAll('#{ed.tab}_migc_list .migc-row').length === 2 && "
                           f"document.querySelector('#{ed.tab}_migc_list .migc-desc').value === 'a green pear'", timeout=30_000)
    assert ed.layout() == migc["instances"]
    # The canvas shows box 1 in its palette colour (230, 25, 75) blended over the background.
    r, g, b, _ = ed.pixel(0.25, 0.5)
    assert r > g + 40 and r > b + 20, (r, g, b)
    page.keyboard.press("Escape")
    ed.canvas.focus()
    page.keyboard.press("Control+z")  # the paste itself is undoable
    assert ed.layout() != migc["instances"]
    page.keyboard.press("Control+Shift+z")
    assert ed.layout() == migc["instances"]


def test_import_official_yaml_and_our_json(page, tmp_path):
    ed = Editor(page, "txt2img").open()
    yaml_text = ("masterpiece, best quality, two fruits on a table:\n a red apple:\n  - - 0.1\n    - 0.2\n    - 0.4\n    - 0.6\n"
                 " a yellow pear:\n  - - 0.5\n    - 0.3\n    - 0.9\n    - 0.8\n")
    path = tmp_path / "layout.yaml"
    path.write_text(yaml_text)
    page.locator(f"#{ed.tab}_prompt textarea").fill("")
    page.locator(f"#{ed.tab}_migc_import_file").set_input_files(str(path))
    page.wait_for_function(f"() => document.querySelector('#{ed.tab}_migc_layout textarea').value.includes('a yellow pear')", timeout=10_000)
    assert [(i["description"], i["box"]) for i in ed.layout()] == [("a red apple", [0.1, 0.2, 0.4, 0.6]), ("a yellow pear", [0.5, 0.3, 0.9, 0.8])]
    assert page.locator(f"#{ed.tab}_prompt textarea").input_value() == "masterpiece, best quality, two fruits on a table"
    assert ed.python_layout() == ed.layout()

    bad = tmp_path / "bad.yaml"
    bad.write_text("a prompt:\n a cat:\n  - - 0.1\n    - 0.2\n")
    page.locator(f"#{ed.tab}_migc_import_file").set_input_files(str(bad))
    page.wait_for_function(f"() => document.querySelector('#{ed.tab}_migc_status').innerText.includes('Import of bad.yaml failed')", timeout=10_000)
    assert "line 3" in page.locator(f"#{ed.tab}_migc_status").inner_text()
    assert len(ed.layout()) == 2, "a failed import changes nothing"

    # Export, then edit the raw JSON view: the canvas follows.
    with page.expect_download() as download:
        page.locator(f"#{ed.tab}_migc_export").click()
    exported = json.loads(open(download.value.path()).read())
    assert exported["instances"] == ed.layout()
    page.locator(f"#{ed.tab}_migc_json").click()
    raw = page.locator(f"#{ed.tab}_migc_layout textarea")
    assert raw.is_visible()
    raw.fill(json.dumps({"instances": [{"description": "a lone cat", "box": [0.2, 0.2, 0.8, 0.8]}]}))
    page.wait_for_function(f"() => document.querySelectorAll('#{ed.tab}_migc_list .migc-row').length === 1", timeout=10_000)
    assert page.locator(f"#{ed.tab}_migc_list .migc-desc").input_value() == "a lone cat"
    page.locator(f"#{ed.tab}_migc_json").click()
    assert not raw.is_visible()


def test_backdrop_shows_the_last_image(page, shots):
    ed = Editor(page, "txt2img").open()
    page.locator(f"#{ed.tab}_migc_clear").click()
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => Array.from(document.querySelectorAll('#txt2img_gallery img')).some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    plain = ed.pixel(0.05, 0.05)
    page.locator(f"#{ed.tab}_migc_backdrop").check()
    page.wait_for_timeout(600)
    r, g, b, _ = ed.pixel(0.05, 0.05)  # the stand-in image is blue (30, 90, 160) there
    assert b > plain[2] + 40 and b > r + 50, (plain, (r, g, b))
    shots(page, "backdrop", f"#{ed.tab}_migc_editor_root")
    page.locator(f"#{ed.tab}_migc_backdrop").uncheck()
    page.wait_for_timeout(400)
    assert ed.pixel(0.05, 0.05)[:3] == plain[:3]


def test_img2img_editor_is_independent(page):
    txt = Editor(page, "txt2img").open()
    page.locator(f"#{txt.tab}_migc_clear").click()
    txt.drag((0.1, 0.1), (0.3, 0.3))
    txt.describe(0, "only in txt2img")
    img = Editor(page, "img2img").open()
    assert img.layout() == []
    img.set_slider("height", 768)
    ratio = img.canvas.evaluate("c => c.clientWidth / c.clientHeight")
    assert abs(ratio - 512 / 768) < 0.02, ratio
    img.drag((0.5, 0.5), (0.9, 0.9))
    img.describe(0, "only in img2img")
    assert [i["description"] for i in img.layout()] == ["only in img2img"]
    assert img.python_sees().startswith("512x768 ")
    assert [i["description"] for i in txt.layout()] == ["only in txt2img"]


@pytest.mark.parametrize("setup", ["zoom", "narrow"])
def test_zoomed_and_narrow_pages(page, browser, demo, setup, shots):
    """Page zoom (CSS zoom, as a zoomed WebUI) and a phone-width layout still map the pointer correctly."""
    context = browser.new_context(viewport={"width": 390, "height": 900}, device_scale_factor=2, has_touch=True) if setup == "narrow" \
        else browser.new_context(viewport={"width": 1280, "height": 1400})
    p = context.new_page()
    p.goto(demo.url, timeout=120_000)
    p.wait_for_selector("#txt2img_migc_editor_root canvas", state="attached", timeout=120_000)
    if setup == "zoom":
        p.evaluate("document.body.style.zoom = '1.5'")
    ed = Editor(p, "txt2img").open()
    page_width = p.evaluate("document.documentElement.scrollWidth")
    ed.canvas.scroll_into_view_if_needed()
    ed.drag((0.2, 0.25), (0.7, 0.75))
    assert_box(ed.boxes()[0], [0.2, 0.25, 0.7, 0.75], tol=0.02)
    if setup == "narrow":
        assert ed.canvas.bounding_box()["width"] <= 390, "the canvas fits a phone screen"
        assert page_width <= 400, page_width
    shots(p, setup)
    context.close()
