"""The mask tools of the box editor (MIGC++) in a real browser: brush, eraser, undo, clear, upload.

The hidden layout JSON holds each mask as a PNG data URL; the test decodes it with the product's own
decoder (lib_migc.core.mask_codec, which Python uses for generation) and checks the painted pixels.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lib_migc.core.mask_codec import decode_mask, mask_to_box

from .test_box_editor import Editor, page  # noqa: F401  (the module-scoped page fixture)

BRUSH = 40  # image pixels


def _mask(ed: Editor, index: int = 0) -> np.ndarray:
    inst = ed.layout()[index]
    assert "mask" in inst, inst
    return np.array(decode_mask(inst["mask"]))


def _set_brush(ed: Editor, tool: str, size: int = BRUSH) -> None:
    ed.page.locator(f"#{ed.tab}_migc_tool_{tool}").click()
    ed.page.locator(f"#{ed.tab}_migc_brush_size").evaluate(
        "(e, v) => { e.value = String(v); e.dispatchEvent(new Event('input', {bubbles: true})); }", size)


def _at(mask: np.ndarray, fx: float, fy: float) -> float:
    h, w = mask.shape
    return float(mask[int(fy * h), int(fx * w)])


def test_brush_eraser_undo_clear_and_upload(page, shots, tmp_path):  # noqa: F811
    ed = Editor(page, "txt2img").open()
    page.locator("#txt2img_migc_clear").click()
    page.keyboard.press("Escape")

    # --- a brush stroke with nothing selected starts a new mask instance
    _set_brush(ed, "brush")
    ed.drag((0.2, 0.5), (0.6, 0.5))
    layout = ed.layout()
    assert len(layout) == 1 and "box" not in layout[0], layout  # the box is derived (by Python too)
    painted = _mask(ed)
    assert painted.shape == (512, 512)
    assert set(np.unique(painted)) == {0.0, 1.0}  # the brush is hard: a compact 1-bit PNG
    for fx in (0.25, 0.4, 0.55):
        assert _at(painted, fx, 0.5) == 1.0
    assert _at(painted, 0.9, 0.1) == 0.0 and _at(painted, 0.4, 0.7) == 0.0
    rows = np.flatnonzero(painted.any(axis=1))
    assert abs((rows[-1] - rows[0] + 1) - BRUSH) <= 3  # the stroke is as thick as the brush
    ed.describe(0, "a gray cat")
    python = ed.python_layout()
    assert np.array_equal(decode_mask(python[0]["mask"]), painted) and python[0]["description"] == "a gray cat"
    shots(page, "stroke", "#txt2img_migc_editor_root")

    # --- the eraser removes part of it; undo brings exactly that part back
    _set_brush(ed, "eraser")
    ed.drag((0.36, 0.5), (0.44, 0.5))
    erased = _mask(ed)
    assert _at(erased, 0.4, 0.5) == 0.0 and _at(erased, 0.25, 0.5) == 1.0 and _at(erased, 0.55, 0.5) == 1.0
    page.locator("#txt2img_migc_undo").click()
    assert np.array_equal(_mask(ed), painted)
    page.locator("#txt2img_migc_redo").click()
    assert np.array_equal(_mask(ed), erased)
    shots(page, "erased", "#txt2img_migc_editor_root")

    # --- clear mask: back to a box, the one derived from the mask
    page.locator("#txt2img_migc_list .migc-row[data-index='0'] .migc-clear-mask").click()
    inst = ed.layout()[0]
    assert "mask" not in inst
    assert np.allclose(inst["box"], mask_to_box(erased), atol=1e-6)

    # --- upload a soft mask of another size: stretched to the image, soft values kept
    source = Image.new("L", (200, 160), 0)
    ImageDraw.Draw(source).ellipse((40, 30, 160, 130), fill=255)
    source = source.filter(ImageFilter.GaussianBlur(6))
    path = tmp_path / "soft.png"
    source.save(path)
    with page.expect_file_chooser() as chooser:
        page.locator("#txt2img_migc_list .migc-row[data-index='0'] .migc-upload-mask").click()
    chooser.value.set_files(str(path))
    page.wait_for_function("() => document.querySelector('#txt2img_migc_layout textarea').value.includes('\"mask\"')",
                           timeout=10_000)
    uploaded = _mask(ed)
    expected = np.asarray(source.resize((512, 512), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    assert uploaded.shape == (512, 512)
    assert np.abs(uploaded - expected).mean() < 0.02
    assert ((uploaded > 0.05) & (uploaded < 0.95)).sum() > 1000  # soft edges survived
    page.locator("#txt2img_migc_tool_box").click()
    shots(page, "uploaded", "#txt2img_migc_editor_root")
    assert not page.js_errors, page.js_errors


def test_a_pasted_mask_layout_is_drawn_in_the_instance_colour(page):  # noqa: F811
    ed = Editor(page, "txt2img").open()
    mask = Image.new("L", (512, 512), 0)
    ImageDraw.Draw(mask).rectangle((256, 256, 511, 511), fill=255)
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    layout = '{"instances":[{"description":"a cat","mask":"%s"}]}' % url
    page.locator("#txt2img_migc_infotext textarea, #txt2img_migc_infotext input").first.fill(layout)
    page.locator("#txt2img_migc_paste").click()
    page.wait_for_function("() => document.querySelectorAll('#txt2img_migc_list .migc-mask-badge').length === 1", timeout=15_000)
    page.wait_for_timeout(400)
    inside, outside = ed.pixel(0.75, 0.75), ed.pixel(0.25, 0.25)
    assert inside[0] > outside[0] + 40  # instance #1's colour (red) tints the masked quarter only
    assert ed.layout()[0]["mask"] == url
