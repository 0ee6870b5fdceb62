"""MagicFusion's section of the panel (gradio 3.41 in A1111, gradio 4 in Forge)."""
from __future__ import annotations

from typing import Any

from ...core.widgets import optional_section, tool_button
from .params import SAME, WINDOW_MODES, FusionParams, FusionWindow, fused_step_count

FUSION_HELP = (
    "MagicFusion (training-free): the loaded checkpoint (A: text encoder, VAE, composition) and a second SD1.x "
    "checkpoint's UNet (B: e.g. a style or a fine-tuned subject) both predict the noise; per pixel the one whose "
    "prompt response is more salient wins. Only B's UNet is loaded (~1.7 GB fp16); fused steps cost two UNet calls, "
    "the others one. B's own text encoder and clip skip are not used."
)


def fused_steps_text(window_mode: str, switch_t: Any) -> str:
    """How many steps the window fuses, for common step counts (the timestep grid of DDIM-like samplers)."""
    try:
        window = FusionWindow(window_mode, int(switch_t))
    except Exception as exc:  # noqa: BLE001 - shown to the user as is
        return f"⚠ {exc}"
    counts = ", ".join(f"{fused_step_count(n, window)} of {n}" for n in (20, 30, 50, 100))
    return f"Fused steps (t {'>' if window.window_mode.startswith('SNB') else '≤'} {window.switch_t}): {counts}."


def build_section(gr: Any, tab: str) -> list[Any]:
    """The MagicFusion fields, in :data:`lib_migc.params.FUSION_UI_FIELDS` order."""

    def titles() -> list[str]:
        try:
            from modules import sd_models

            return [SAME, *sd_models.checkpoint_tiles()]
        except (ImportError, AttributeError):  # outside the WebUI (the UI demo)
            return [SAME]

    d = FusionParams()
    with gr.Group(elem_id=f"{tab}_migc_fusion"):
        enabled, options = optional_section(gr, tab, "fusion", "MagicFusion")
        with options:
            with gr.Row():
                model_b = gr.Dropdown(titles(), value=None, label="Model B (second checkpoint)", allow_custom_value=True,
                                      elem_id=f"{tab}_migc_fusion_model_b")
                refresh = tool_button(gr, "\U0001f504", f"{tab}_migc_fusion_refresh")
            prompt_b = gr.Textbox(value="", lines=1, label="Prompt B (empty: the main prompt)", elem_id=f"{tab}_migc_fusion_prompt_b")
            with gr.Row():
                k_a = gr.Slider(0.1, 10.0, value=d.k_a, step=0.1, label="k_A (temperature of A)", elem_id=f"{tab}_migc_fusion_k_a")
                k_b = gr.Slider(0.1, 10.0, value=d.k_b, step=0.1, label="k_B (temperature of B)", elem_id=f"{tab}_migc_fusion_k_b")
            with gr.Row():
                window = gr.Radio(list(WINDOW_MODES), value=d.window_mode, label="Window", elem_id=f"{tab}_migc_fusion_window")
                switch_t = gr.Slider(0, 1000, value=d.switch_t, step=1, label="Switch timestep t", elem_id=f"{tab}_migc_fusion_switch_t")
                hires = gr.Checkbox(False, label="Also in the hires-fix pass", elem_id=f"{tab}_migc_fusion_hires")
            steps_info = gr.Markdown(fused_steps_text(d.window_mode, d.switch_t), elem_id=f"{tab}_migc_fusion_steps")
            gr.Markdown(FUSION_HELP)
    for component in (window, switch_t):
        component.change(fn=fused_steps_text, inputs=[window, switch_t], outputs=[steps_info])
    refresh.click(fn=lambda: gr.update(choices=titles()), inputs=[], outputs=[model_b])
    return [enabled, model_b, prompt_b, k_a, k_b, window, switch_t, hires]
