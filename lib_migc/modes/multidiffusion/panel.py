"""MultiDiffusion's window controls in the panel (gradio 3.41 in A1111, gradio 4 in Forge)."""
from __future__ import annotations

from typing import Any

from .params import DEFAULT_STRIDE, MAX_SIDE, WINDOW_NATIVE

WINDOWS_HELP = (
    "MultiDiffusion windows: a canvas larger than the model (panoramas, large img2img) is denoised in overlapping "
    "windows of the model's size, fused per pixel. Window 0 = the model's native size (SD1.x 512, SD2.x-768 768, "
    "SDXL 1024 px); -1 = one window over the whole canvas. A smaller stride hides seams better and costs more. "
    "Without boxes, MultiDiffusion makes a plain panorama of the main prompt."
)


def build_section(gr: Any, tab: str) -> tuple[list[Any], Any]:
    """The window fields, in ``md_window``, ``md_stride``, ``md_wrap`` order (the end of the positional list),
    and the column holding them (shown in the multidiffusion mode only)."""
    with gr.Column(visible=False, elem_id=f"{tab}_migc_md_section") as section:
        with gr.Row(elem_id=f"{tab}_migc_md_windows"):
            window = gr.Number(value=WINDOW_NATIVE, precision=0, minimum=-1, maximum=MAX_SIDE,
                               label="MultiDiffusion window (px; 0 = native, -1 = whole canvas)", elem_id=f"{tab}_migc_md_window")
            stride = gr.Slider(8, 512, value=DEFAULT_STRIDE, step=8, label="Window stride (px)", elem_id=f"{tab}_migc_md_stride")
            wrap = gr.Checkbox(False, label="Wrap around left-right (360° panorama)", elem_id=f"{tab}_migc_md_wrap")
        gr.Markdown(WINDOWS_HELP)
    return [window, stride, wrap], section
