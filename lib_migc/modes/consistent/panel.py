"""The *Keep unchanged instances* row of the panel: the switch, a *Forget* button and what it did."""
from __future__ import annotations

from typing import Any

from .params import TAB

LABEL = "Keep unchanged instances"
#: For the panel's Help (the label stays one line).
INFO = ("**Keep unchanged instances** (migc mode, txt2img): generate, change one box, generate again with the same seed; "
        "the other instances stay as they were (Consistent-MIG).")
FORGET_DONE = "The recorded image was forgotten; the next image records afresh."
FORGET_NONE = "Nothing was recorded."


def forget_record() -> str:
    """The *Forget* button (API: ``"consistent": "reset"``)."""
    from . import record as records  # torch: imported when used, so the panel builds without it

    return FORGET_DONE if records.forget(TAB) else FORGET_NONE


def build_row(gr: Any, tab: str, is_img2img: bool) -> tuple[Any, Any]:
    """The switch (in txt2img only: the record is the txt2img tab's) and its row (shown in the migc mode)."""
    with gr.Row(visible=not is_img2img, elem_id=f"{tab}_migc_consistent_row") as row:
        switch = gr.Checkbox(False, label=LABEL, elem_id=f"{tab}_migc_consistent")
        forget = gr.Button("Forget", elem_id=f"{tab}_migc_consistent_forget", **_compact(gr.Button))
        status = gr.Markdown("", elem_id=f"{tab}_migc_consistent_status")
    forget.click(fn=forget_record, inputs=[], outputs=[status])
    return switch, row


def _compact(component: Any) -> dict[str, Any]:
    """A small button that does not take half the row, in the gradio versions that can say so."""
    import inspect

    accepted = inspect.signature(component.__init__).parameters
    wanted = {"size": "sm", "scale": 0, "min_width": 80}
    return {name: value for name, value in wanted.items() if name in accepted}
