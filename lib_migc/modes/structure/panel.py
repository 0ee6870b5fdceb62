"""StructureDiffusion's section of the panel (gradio 3.41 in A1111, gradio 4 in Forge)."""
from __future__ import annotations

from typing import Any

from ...core.widgets import optional_section
from .params import CUSTOM, MODES, SOURCES

STRUCTURE_HELP = (
    "StructureDiffusion (training-free attribute binding): each phrase is also encoded on its own and mixed into "
    "the prompt's cross-attention, so 'a red car and a white sheep' keeps the red on the car. Works with MIGC or "
    "alone (no boxes needed), on SD1.x and SD2.x. Phrases must appear in the prompt; those not found are listed "
    "under the image. Default mode costs nothing per step; conjunction adds one attention map per phrase."
)


def build_section(gr: Any, tab: str) -> list[Any]:
    """The StructureDiffusion fields, in :data:`lib_migc.params.STRUCTURE_UI_FIELDS` order."""

    with gr.Group(elem_id=f"{tab}_migc_structure"):
        enabled, options = optional_section(gr, tab, "structure", "StructureDiffusion")
        with options:
            with gr.Row():
                mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id=f"{tab}_migc_structure_mode")
                source = gr.Dropdown([*SOURCES, CUSTOM], value=SOURCES[0], label="Phrases from",
                                     elem_id=f"{tab}_migc_structure_phrases")
            custom = gr.Textbox(value="", lines=2, label="Custom phrases (one per line; used when 'Phrases from' is custom)",
                                placeholder="a red car\na white sheep", elem_id=f"{tab}_migc_structure_custom")
            gr.Markdown(STRUCTURE_HELP)
    return [enabled, mode, source, custom]
