"""The MIGC panel (gradio 3.41 in A1111, gradio 4 in Forge): the layout editor and the migc/naive/
MultiDiffusion controls here, each add-on mode's section from its own package (``modes/<mode>/panel.py``).

Components are returned in :data:`lib_migc.params.UI_FIELDS` order, which is also the API's list form.
The layout lives in one textbox holding the layout JSON (``#<tab>_migc_layout``): the box editor in
``javascript/`` mounts above it (``#<tab>_migc_editor``), hides it and edits that same textbox, so
Python only ever reads one format, and the textbox is still there if the script fails to load.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

from . import importers
from . import ui_saved_layouts as saved_layouts
from .core import settings
from .core.widgets import tool_button
from .modes.consistent import panel as consistent_panel
from .modes.magicfusion import panel as fusion_panel
from .modes.migc import weight_files
from .modes.multidiffusion import panel as windows_panel
from .modes.structure import panel as structure_panel
from .params import DEFAULT_BOOTSTRAP, INFOTEXT_KEY, MODES, MigcParams, UI_FIELDS

log = logging.getLogger("migc")

LAYOUT_EXAMPLE = (
    '{"instances": [{"description": "a red teddy bear", "box": [0.05, 0.3, 0.45, 0.95]},\n'
    '               {"description": "a gray cat", "box": [0.55, 0.35, 0.95, 0.95], "ca": 1, "ea": 1, "sac": 1}]}'
)
#: Where javascript/migc_box_editor.js mounts the canvas; the text shows only if the script did not load.
EDITOR_MOUNT = '<div class="migc-editor-mount">The box editor needs JavaScript; edit the layout JSON below instead.</div>'
HELP = (
    "Drag on the canvas to draw a box, drag a box to move it, drag its edges to resize; type each box's description "
    "in the list. In the JSON, boxes are [x0, y0, x1, y1] as fractions of the image (origin top-left). Optional per-instance scales: "
    "ca (cross-attention), ea (enhancement attention), sac (aggregation weight); 1 = trained behaviour. "
    "MIGC needs an SD1.x checkpoint and the MIGC weights in {folder}."
)


def _accordion(gr: Any, tab: str) -> tuple[Any, Any]:
    """(enabled component, context manager): A1111's InputAccordion where the host has it."""
    try:
        from modules.ui_components import InputAccordion

        acc = InputAccordion(False, label="MIGC", elem_id=f"{tab}_migc_enabled")
        return acc, acc
    except ImportError:
        block = gr.Accordion("MIGC", open=False, elem_id=f"{tab}_migc_accordion")
        with block:
            enabled = gr.Checkbox(False, label="Enable MIGC", elem_id=f"{tab}_migc_enabled")
        return enabled, block


def build_panel(is_img2img: bool) -> list[Any]:
    """Create the panel inside the current gradio context; return its input components."""
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    folder = settings.models_dir()
    enabled, container = _accordion(gr, tab)
    with container:
        choices = weight_files.list_weight_files(folder)
        default = settings.option("migc_default_weights")
        with gr.Row():
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id=f"{tab}_migc_mode")
            with gr.Row(elem_id=f"{tab}_migc_weights_row") as weights_row:
                weights = gr.Dropdown(choices=choices or [default], value=default, label="MIGC weights",
                                      elem_id=f"{tab}_migc_weights", allow_custom_value=True)
                refresh = tool_button(gr, "\U0001f504", f"{tab}_migc_refresh")
            bootstrap = gr.Slider(0.0, 1.0, value=DEFAULT_BOOTSTRAP, step=0.01, elem_id=f"{tab}_migc_md_bootstrap",
                                  label="MultiDiffusion bootstrapping (fraction of steps; 0 = off)", visible=False)
        windows, windows_section = windows_panel.build_section(gr, tab)
        gr.Markdown(mode_hint(bool(choices), folder), elem_id=f"{tab}_migc_mode_hint", visible=not choices)
        gr.HTML(value=EDITOR_MOUNT, elem_id=f"{tab}_migc_editor")
        layout = gr.Textbox(value="", label="Instances (layout JSON)", lines=5, placeholder=LAYOUT_EXAMPLE, elem_id=f"{tab}_migc_layout")
        saved_layouts.build_row(gr, tab, layout)
        with gr.Row(elem_id=f"{tab}_migc_steps_row") as steps_row:
            migc_steps = gr.Slider(0.0, 1.0, value=float(settings.option("migc_default_steps")), step=0.01,
                                   label="MIGC steps (fraction)", elem_id=f"{tab}_migc_steps")
            naive_steps = gr.Slider(0.0, 1.0, value=float(settings.option("migc_default_naive_steps")), step=0.01,
                                    label="NaiveFuser steps (fraction, 0 = off)", elem_id=f"{tab}_migc_naive_steps")
        with gr.Row(elem_id=f"{tab}_migc_switches"):
            use_main_prompt = gr.Checkbox(True, label="Use main prompt as global prompt", elem_id=f"{tab}_migc_use_main_prompt")
            append = gr.Checkbox(True, label="Add descriptions to the prompt", elem_id=f"{tab}_migc_append")
            draw_boxes = gr.Checkbox(False, label="Draw boxes (extra image)", elem_id=f"{tab}_migc_draw_boxes")
            hires = gr.Checkbox(bool(settings.option("migc_default_hires")), label="Also in the hires-fix pass", elem_id=f"{tab}_migc_hires")
            maps = gr.Checkbox(False, label="Show instance maps", elem_id=f"{tab}_migc_maps")
            consistent, consistent_row = consistent_panel.build_row(gr, tab, is_img2img)
        global_prompt = gr.Textbox(value="", label="Global prompt (when not using the main prompt)", lines=1,
                                   elem_id=f"{tab}_migc_global_prompt", visible=False)
        use_main_prompt.change(fn=lambda on: gr.update(visible=not on), inputs=[use_main_prompt], outputs=[global_prompt],
                               show_progress=False)

        with gr.Row(elem_id=f"{tab}_migc_add_ons"):  # side by side: two lines while both are collapsed
            structure = structure_panel.build_section(gr, tab)
            fusion = fusion_panel.build_section(gr, tab)
        with gr.Accordion("Help", open=False, elem_id=f"{tab}_migc_help"):
            gr.Markdown("\n\n".join([HELP.format(folder=folder), MODES_HELP, consistent_panel.INFO]))

        def refresh_choices() -> Any:
            found = weight_files.list_weight_files(settings.models_dir())
            return gr.update(choices=found or [settings.option("migc_default_weights")])

        refresh.click(fn=refresh_choices, inputs=[], outputs=[weights])
        shown_by_mode = [bootstrap, windows_section, weights_row, steps_row, consistent_row]
        mode.change(fn=lambda value: [gr.update(visible=shown) for shown in visible_in_mode(value, is_img2img)],
                    inputs=[mode], outputs=shown_by_mode, show_progress=False)
        paste_status = gr.Markdown("", elem_id=f"{tab}_migc_paste_status")
    components = PanelComponents([enabled, weights, layout, migc_steps, naive_steps, use_main_prompt, global_prompt, append,
                                  draw_boxes, hires, *structure, *fusion, mode, bootstrap, *windows, consistent, maps])
    components.paste_status = paste_status
    assert len(components) == len(UI_FIELDS)
    return components


def visible_in_mode(mode: str, is_img2img: bool) -> list[bool]:
    """Which of the mode-specific controls act in ``mode`` (the panel shows only those): MultiDiffusion's
    bootstrapping and windows, the MIGC weights, the MIGC/NaiveFuser steps, *Keep unchanged instances*.
    A mode change from a pasted infotext updates them too (gradio fires ``change`` for it)."""
    md, migc = mode == "multidiffusion", mode == "migc"
    return [md, md, migc, mode in ("migc", "naive"), migc and not is_img2img]


MODES_HELP = ("**migc**: the trained MIGC / MIGC++ layers (SD1.x, weights file). **naive**: MIGC's weight-free fuser "
              "on every cross-attention (SD1.x, SD2.x, SDXL; cheap). **multidiffusion**: each box denoised with its own "
              "prompt and fused per pixel (any model; about (N+2)/2 times the time of a plain image); on canvases larger "
              "than the model, in overlapping windows: panoramas, with or without boxes. **Show instance maps** adds one "
              "image per image: where each instance acted (MIGC's aggregation weights, the fuser's, MultiDiffusion's "
              "region weights, StructureDiffusion's attention, MagicFusion's model-B pixels).")


def mode_hint(have_weights: bool, folder: str) -> str:
    """Shown only without MIGC weights: which modes still work (the modes themselves are explained under Help)."""
    if have_weights:
        return ""
    return (f"⚠ No MIGC weights found in {folder}: choose **naive** or **multidiffusion**, which need none, "
            "or download MIGC_SD14.ckpt there.")


#: The panel's switches and mode: what a paste without a MIGC entry resets (the drawn layout is kept).
SWITCH_FIELDS = ("enabled", "structure_enabled", "fusion_enabled", "mode")


def pasted_values(params: dict) -> tuple[list[Any], str]:
    """What pasting an infotext (the WebUI's parsed ``params``) sets in the panel, in :data:`UI_FIELDS`
    order (None: leave that component as it is), and a message for the user ("" when all went well).

    Without a MIGC entry the image was made without any part of the panel, so MIGC, StructureDiffusion
    and MagicFusion are all turned off and the mode goes back to its default; a MIGC entry that cannot be
    read changes nothing and says why.
    """
    if params.get(INFOTEXT_KEY) is None:
        keys = sorted(k for k in params if k.startswith(("RP ", "forge_couple")) or k in ("Prompt", "Size-1", "Size-2"))
        if any(k.startswith(("RP ", "forge_couple")) for k in keys):
            values, message = _imported(json.dumps({k: str(params[k]) for k in keys}))
            return list(values), message
    values, message = _pasted(params.get(INFOTEXT_KEY))
    return list(values), message


@functools.lru_cache(maxsize=1)
def _imported(entries: str) -> tuple[tuple[Any, ...], str]:
    """A pasted infotext without a MIGC entry but with Regional Prompter or Forge Couple entries: their
    regions as MIGC boxes (MIGC turned on), and what was converted and what was not."""
    try:
        converted = importers.from_infotext(json.loads(entries))
        if converted is None:
            return _pasted(None)
        layout = converted.layout()
        params = MigcParams.from_api({"enabled": True, "use_main_prompt": "global_prompt" not in layout, **layout})
        return tuple(params.ui_values()), converted.message()
    except Exception as exc:  # noqa: BLE001 - reported like any paste problem
        log.warning("MIGC: the pasted infotext's regions could not be imported: %s", exc)
        return _pasted(None)[0], f"⚠ The pasted infotext's regions could not be imported: {exc}"


@functools.lru_cache(maxsize=1)
def _pasted(text: str | None) -> tuple[tuple[Any, ...], str]:
    """One parse (and one log line) per pasted entry: every component's getter asks for the same text."""
    if text is None:
        defaults = MigcParams().ui_values()
        return tuple(defaults[i] if name in SWITCH_FIELDS else None for i, name in enumerate(UI_FIELDS)), ""
    try:
        return tuple(MigcParams.from_infotext(text).ui_values()), ""
    except Exception as exc:  # noqa: BLE001 - any malformed entry is reported the same way
        log.warning("MIGC: the pasted infotext's MIGC entry could not be read: %s", exc)
        return (None,) * len(UI_FIELDS), (f"⚠ The pasted infotext's MIGC entry could not be read, so the MIGC panel was "
                                          f"left as it was: {exc}")


def infotext_fields(components: list[Any], status: Any = None) -> list[tuple[Any, Callable[[dict], Any]]]:
    """Restore every component from a pasted infotext (see :func:`pasted_values`); ``status`` (a Markdown)
    shows what went wrong, if anything.

    The getters return ``gr.update`` objects: the WebUI otherwise converts a value to the type of the
    component's current value, and an empty gradio-4 textbox reports ``None`` there (Forge).
    """
    import gradio as gr

    def getter(index: int) -> Callable[[dict], Any]:
        def get(params: dict) -> Any:
            value = pasted_values(params)[0][index]
            return None if value is None else gr.update(value=value)

        return get

    fields = [(component, getter(i)) for i, component in enumerate(components)]
    if status is None:
        status = getattr(components, "paste_status", None)
    if status is not None:
        fields.append((status, lambda params: gr.update(value=pasted_values(params)[1])))
    return fields


class PanelComponents(list):
    """The panel's input components (the Script's arguments) plus the Markdown that reports paste problems."""

    paste_status: Any = None
