"""Small gradio pieces the panel sections share (the WebUI's own components where it has them)."""
from __future__ import annotations

from typing import Any


def optional_section(gr: Any, tab: str, name: str, title: str) -> tuple[Any, Any]:
    """(switch, accordion) of an add-on mode: the checkbox stays in view; the options sit in an accordion that
    is collapsed until the switch is ticked (a pasted infotext ticking it opens it too) and whose title says
    "on" while the mode is on, so a collapsed section still shows that it acts."""
    switch = gr.Checkbox(False, label=title, elem_id=f"{tab}_migc_{name}_enabled")
    options = gr.Accordion(f"{title} options", open=False, elem_id=f"{tab}_migc_{name}_options")

    def follow(on: bool) -> Any:
        return gr.update(open=bool(on), label=f"{title} options — on" if on else f"{title} options")

    switch.change(fn=follow, inputs=[switch], outputs=[options], show_progress=False)
    return switch, options


def tool_button(gr: Any, label: str, elem_id: str) -> Any:
    """The WebUI's small square ToolButton where available (A1111, Forge), a plain button otherwise."""
    try:
        from modules.ui_components import ToolButton

        return ToolButton(value=label, elem_id=elem_id)
    except ImportError:
        return gr.Button(value=label, elem_id=elem_id)
