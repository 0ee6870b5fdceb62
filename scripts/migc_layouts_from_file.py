"""*MIGC layouts from file*: a Script in the Script dropdown that runs many layouts in one job.

Only wiring: parsing and the loop are lib_migc.layout_file's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio as gr  # noqa: E402
import modules.scripts as scripts  # noqa: E402

from lib_migc import layout_file  # noqa: E402

HELP = ("One layout per line as JSON ({\"prompt\": ..., \"negative_prompt\"?: ..., \"seed\"?: ..., \"layout\": "
        "{\"instances\": [...]}}), or a YAML file in the COCO-MIG benchmark's format (prompt → descriptions → boxes, "
        "coco_id). The MIGC panel's other settings (weights, steps, mode) apply to every layout.")


class LayoutsFromFileScript(scripts.Script):
    def title(self):
        return "MIGC layouts from file"

    def show(self, is_img2img):
        return not is_img2img

    def ui(self, is_img2img):
        gr.Markdown(HELP)
        text = gr.Textbox(label="Layouts (JSON Lines or YAML)", lines=6, elem_id=self.elem_id("text"))
        upload = gr.File(label="Or upload a .jsonl / .yaml file", type="binary", elem_id=self.elem_id("file"))
        seeds = gr.Number(label="Seeds per layout (the paper uses 8)", value=1, precision=0, elem_id=self.elem_id("seeds"))
        upload.change(fn=lambda data: (data or b"").decode("utf-8", errors="replace") if isinstance(data, bytes) else gr.update(),
                      inputs=[upload], outputs=[text], show_progress=False)
        return [text, seeds]

    def run(self, p, text, seeds):
        return layout_file.run(p, text, seeds)
