"""The *Saved layouts* row of the panel: pick a name, load it into the editor, save the current layout
under a name, delete one; and 📥, which converts what was pasted into the layout box from another
regional extension (:mod:`lib_migc.importers`). Storage and checks are :mod:`lib_migc.layout_library`'s."""
from __future__ import annotations

import json
from typing import Any

from . import importers, layout_library
from .core.widgets import tool_button


def build_row(gr: Any, tab: str, layout: Any) -> None:
    """The row, wired to the panel's ``layout`` textbox (the box editor follows that textbox)."""
    with gr.Row():
        chosen = gr.Dropdown(choices=layout_library.names(), value=None, label="Saved layouts", allow_custom_value=True,
                             elem_id=f"{tab}_migc_saved_layouts")
        load = tool_button(gr, "\U0001f4c2", f"{tab}_migc_layout_load")  # open folder
        save = tool_button(gr, "\U0001f4be", f"{tab}_migc_layout_save")  # floppy disk
        delete = tool_button(gr, "\U0001f5d1", f"{tab}_migc_layout_delete")  # waste basket
        convert = tool_button(gr, "\U0001f4e5", f"{tab}_migc_layout_import")  # inbox: import from another extension
    status = gr.Markdown("", elem_id=f"{tab}_migc_saved_layouts_status")

    def refreshed(value: Any = None) -> Any:
        return gr.update(choices=layout_library.names(), value=value)

    def on_load(name: str | None, current: str) -> tuple[Any, Any]:
        try:
            return gr.update(value=layout_library.load(name or "")), f"Loaded '{name}'."
        except Exception as exc:  # noqa: BLE001 - shown to the user
            return gr.update(value=current), f"⚠ {exc}"

    def on_save(name: str | None, current: str) -> tuple[Any, Any]:
        try:
            saved = layout_library.save(name or "", current)
            return refreshed(saved), f"Saved as '{saved}' in {layout_library.folder()}."
        except Exception as exc:  # noqa: BLE001
            return refreshed(name), f"⚠ {exc}"

    def on_delete(name: str | None) -> tuple[Any, Any]:
        try:
            done = layout_library.delete(name or "")
        except Exception as exc:  # noqa: BLE001
            return refreshed(name), f"⚠ {exc}"
        return refreshed(None), (f"Deleted '{name}'." if done else f"There is no saved layout named '{name}'.")

    def on_import(current: str) -> tuple[Any, Any]:
        try:
            converted = importers.from_text(current)
        except Exception as exc:  # noqa: BLE001
            return gr.update(value=current), f"⚠ {exc}"
        return gr.update(value=json.dumps(converted.layout(), ensure_ascii=False)), converted.message()

    convert.click(fn=on_import, inputs=[layout], outputs=[layout, status])
    load.click(fn=on_load, inputs=[chosen, layout], outputs=[layout, status])
    save.click(fn=on_save, inputs=[chosen, layout], outputs=[chosen, status])
    delete.click(fn=on_delete, inputs=[chosen], outputs=[chosen, status])
