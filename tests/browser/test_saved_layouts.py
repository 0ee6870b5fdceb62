"""Saved layouts and the 📥 importer in the panel, in both gradio versions."""
import json

from .test_box_editor import Editor, page  # noqa: F401 - the shared page fixture

GLIGEN = {"stringProps": {"canvasWidth": 512, "canvasHeight": 512},
          "mapProps": {"boxMap": [[1, {"id": 1, "x1": 64, "y1": 128, "x2": 256, "y2": 384, "caption": "a crab"}]]}}


def layout_box(page):
    return page.locator("#txt2img_migc_layout textarea")


def status(page, text):
    page.wait_for_function(f"() => (document.querySelector('#txt2img_migc_saved_layouts_status') || {{}}).innerText?.includes({json.dumps(text)})",
                           timeout=30_000)


def test_import_save_clear_load_delete(page):
    ed = Editor(page, "txt2img").open()
    layout_box(page).evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", json.dumps(GLIGEN))
    page.wait_for_timeout(300)
    page.locator("#txt2img_migc_layout_import").click()
    status(page, "Imported 1 box(es) from GLIGEN GUI")
    page.wait_for_function("() => document.querySelectorAll('#txt2img_migc_list .migc-row').length === 1", timeout=30_000)
    assert ed.layout() == [{"description": "a crab", "box": [0.125, 0.25, 0.5, 0.75]}]
    name = page.locator("#txt2img_migc_saved_layouts input").first
    name.fill("crab on the left")
    name.press("Enter")
    page.wait_for_timeout(300)
    page.locator("#txt2img_migc_layout_save").click()
    status(page, "Saved as 'crab on the left'")
    page.locator("#txt2img_migc_clear").click()
    page.wait_for_function("() => document.querySelectorAll('#txt2img_migc_list .migc-row').length === 0", timeout=30_000)
    page.locator("#txt2img_migc_layout_load").click()
    status(page, "Loaded 'crab on the left'")
    page.wait_for_function("() => document.querySelectorAll('#txt2img_migc_list .migc-row').length === 1", timeout=30_000)
    assert ed.layout()[0]["description"] == "a crab"
    page.locator("#txt2img_migc_layout_delete").click()
    status(page, "Deleted 'crab on the left'")


def test_the_editors_import_menu_reads_a_tiled_diffusion_config(page, tmp_path):
    ed = Editor(page, "txt2img").open()
    region = {"enable": True, "x": 0.5, "y": 0.25, "w": 0.25, "h": 0.5, "prompt": "a blue kite", "neg_prompt": "",
              "blend_mode": "Background", "feather_ratio": 0.2, "seed": -1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"bbox_controls": [region]}))
    page.locator("#txt2img_migc_import_file").set_input_files(str(path))
    page.wait_for_function("() => document.querySelector('#txt2img_migc_layout textarea').value.includes('a blue kite')", timeout=10_000)
    assert ed.layout() == [{"description": "a blue kite", "box": [0.5, 0.25, 0.75, 0.75]}]
    assert "Not converted" in page.locator("#txt2img_migc_status").inner_text()
