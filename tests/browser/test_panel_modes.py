"""The panel shows each mode's controls only in that mode, in both gradio versions, pasted infotexts included."""
import json

import pytest

from .test_box_editor import Editor

SHOWN = {  # element -> the modes it acts in
    "txt2img_migc_md_bootstrap": {"multidiffusion"},
    "txt2img_migc_md_section": {"multidiffusion"},
    "txt2img_migc_weights_row": {"migc"},
    "txt2img_migc_steps_row": {"migc", "naive"},
    "txt2img_migc_consistent_row": {"migc"},
}


@pytest.fixture(scope="module")
def page(demo, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(demo.url, timeout=120_000)
    page.wait_for_selector("#txt2img_migc_editor_root canvas", state="attached", timeout=120_000)
    yield page
    context.close()


def visible(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").first.is_visible()


def expect_mode(page, mode: str) -> None:
    expected = {elem_id: mode in modes for elem_id, modes in SHOWN.items()}
    page.wait_for_function(
        "expected => Object.entries(expected).every(([id, shown]) => {"
        " const el = document.getElementById(id); const seen = !!el && el.offsetParent !== null; return seen === shown; })",
        arg=expected, timeout=30_000)
    assert {elem_id: visible(page, elem_id) for elem_id in SHOWN} == expected


def test_each_mode_shows_its_own_controls(page):
    Editor(page, "txt2img").open()
    expect_mode(page, "migc")
    for mode in ("multidiffusion", "naive", "migc"):
        page.locator("#txt2img_migc_mode label").filter(has_text=mode).first.click()
        expect_mode(page, mode)


def test_a_pasted_infotext_sets_the_mode_and_what_is_shown(page):
    Editor(page, "txt2img").open()
    migc = {"mode": "multidiffusion", "md_bootstrap": 0.2, "instances": [{"description": "a cat", "box": [0.1, 0.1, 0.5, 0.9]}]}
    page.locator("#txt2img_migc_infotext textarea, #txt2img_migc_infotext input").first.fill(json.dumps(migc))
    page.locator("#txt2img_migc_paste").click()
    expect_mode(page, "multidiffusion")
    page.locator("#txt2img_migc_infotext textarea, #txt2img_migc_infotext input").first.fill(json.dumps({**migc, "mode": "migc"}))
    page.locator("#txt2img_migc_paste").click()
    expect_mode(page, "migc")


def test_add_on_sections_open_when_ticked_and_say_on_in_their_title(page):
    Editor(page, "txt2img").open()
    for name, title in (("structure", "StructureDiffusion"), ("fusion", "MagicFusion")):
        options = page.locator(f"#txt2img_migc_{name}_options")
        inner = f"#txt2img_migc_{name}_{'custom' if name == 'structure' else 'prompt_b'}"
        assert not page.locator(inner).first.is_visible(), "collapsed until ticked"
        page.locator(f"#txt2img_migc_{name}_enabled input").check()
        page.locator(inner).first.wait_for(state="visible", timeout=30_000)
        assert f"{title} options — on" in options.inner_text()
        page.locator(f"#txt2img_migc_{name}_enabled input").uncheck()
        page.locator(inner).first.wait_for(state="hidden", timeout=30_000)
        assert "— on" not in options.inner_text()


def _paste(page, entry: dict) -> None:
    page.locator("#txt2img_migc_infotext textarea, #txt2img_migc_infotext input").first.fill(json.dumps(entry))
    page.locator("#txt2img_migc_paste").click()


def test_instance_maps_and_the_global_prompt_follow_a_paste(page):
    """*Show instance maps* is in view in every mode and restored by a paste; the global prompt box shows only
    while *Use main prompt* is off."""
    Editor(page, "txt2img").open()
    maps = page.locator("#txt2img_migc_maps input")
    global_prompt = page.locator("#txt2img_migc_global_prompt")
    instances = [{"description": "a cat", "box": [0.1, 0.1, 0.5, 0.9]}]
    _paste(page, {"maps": True, "use_main_prompt": False, "global_prompt": "a park", "instances": instances})
    page.wait_for_function("() => document.querySelector('#txt2img_migc_maps input').checked", timeout=30_000)
    global_prompt.first.wait_for(state="visible", timeout=30_000)
    assert global_prompt.locator("textarea, input").first.input_value() == "a park"
    for mode in ("multidiffusion", "naive", "migc"):
        page.locator("#txt2img_migc_mode label").filter(has_text=mode).first.click()
        expect_mode(page, mode)
        assert maps.is_visible()
    _paste(page, {"instances": instances})
    page.wait_for_function("() => !document.querySelector('#txt2img_migc_maps input').checked", timeout=30_000)
    global_prompt.first.wait_for(state="hidden", timeout=30_000)
    page.locator("#txt2img_migc_use_main_prompt input").uncheck()
    global_prompt.first.wait_for(state="visible", timeout=30_000)
    page.locator("#txt2img_migc_use_main_prompt input").check()
    global_prompt.first.wait_for(state="hidden", timeout=30_000)
