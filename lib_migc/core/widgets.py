"""Small gradio pieces the panel sections share (the WebUI's own components where it has them)."""
from __future__ import annotations

from typing import Any


def tool_button(gr: Any, label: str, elem_id: str) -> Any:
    """The WebUI's small square ToolButton where available (A1111, Forge), a plain button otherwise."""
    try:
        from modules.ui_components import ToolButton

        return ToolButton(value=label, elem_id=elem_id)
    except ImportError:
        return gr.Button(value=label, elem_id=elem_id)
