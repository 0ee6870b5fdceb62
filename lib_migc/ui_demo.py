"""A small standalone gradio app that mounts the real MIGC panel and box editor.

Why: the box editor is JavaScript that talks to gradio through one textbox; testing it needs a real
browser and a real gradio (3.41 as in A1111, 4.40 as in Forge), not a whole WebUI with a model. The
app reproduces only the WebUI's boundary the editor relies on: the tab element ids (prompt, width and
height sliders, gallery, img2img input), the page helpers the WebUI defines for extensions
(``gradioApp``, ``onUiLoaded``, ``updateInput``) and the way it injects extension scripts and
``style.css`` into the page. "Check" buttons send the hidden layout to Python, so a test sees what
the Script would receive; "Paste infotext" runs the panel's real infotext getters.

Run: ``python -m lib_migc.ui_demo --port 7870`` and open http://127.0.0.1:7870.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import os
import tempfile
from typing import Any

from .core.errors import MigcError
from .params import INFOTEXT_KEY, UI_FIELDS, MigcParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The WebUI's page helpers, as extensions see them (A1111 script.js semantics, written for the demo).
HOST_HELPERS_JS = """
(function () {
    const loaded = [];
    let fired = false;
    window.gradioApp = function () {
        const app = document.querySelector("gradio-app");
        if (!app) return document;
        return app.shadowRoot ? app.shadowRoot : app;
    };
    window.onUiLoaded = function (fn) { if (fired) fn(); else loaded.push(fn); };
    window.updateInput = function (target) {
        const event = new Event("input", { bubbles: true });
        Object.defineProperty(event, "target", { value: target });
        target.dispatchEvent(event);
    };
    const timer = setInterval(function () {
        if (!gradioApp().querySelector("#txt2img_migc_layout textarea")) return;
        clearInterval(timer);
        fired = true;
        loaded.splice(0).forEach(function (fn) { fn(); });
    }, 100);
})();
"""


def page_head() -> str:
    """The <head> additions: helpers first, then every extension script and style.css, like the WebUI."""
    parts = [f"<script>{HOST_HELPERS_JS}</script>"]
    for path in sorted(glob.glob(os.path.join(ROOT, "javascript", "*.js"))):
        with open(path, encoding="utf-8") as fh:
            parts.append(f"<script>\n{fh.read()}\n</script>")
    with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as fh:
        parts.append(f"<style>\n{fh.read()}\n</style>")
    return "\n".join(parts)


def _inject_into_page(head: str) -> None:
    """Add ``head`` to the index page, the way the WebUI adds extension scripts (both gradio 3 and 4)."""
    import gradio.routes

    original = gradio.routes.templates.TemplateResponse

    def template_response(*args: Any, **kwargs: Any) -> Any:
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", f"{head}</head>".encode("utf-8"))
        response.init_headers()
        return response

    gradio.routes.templates.TemplateResponse = template_response


_checks = itertools.count(1)


def check_layout(layout_json: str, width: float, height: float) -> str:
    """What an enabled Script would receive: ``[#n] WxH <layout JSON>`` or ``[#n] ERROR: ...``.

    ``n`` counts the checks, so a test can tell a fresh answer from the previous one.
    """
    head = f"[#{next(_checks)}]"
    try:
        params = MigcParams.from_ui(True, "MIGC_SD14.ckpt", layout_json)
    except MigcError as exc:
        return f"{head} ERROR: {exc}"
    return f"{head} {int(width)}x{int(height)} {params.layout.to_json()}"


def backdrop_image(width: float, height: float) -> Any:
    """A stand-in "generated image" with a recognisable pattern, for the editor's backdrop."""
    from PIL import Image, ImageDraw

    w, h = int(width), int(height)
    image = Image.new("RGB", (w, h), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse([w * 0.1, h * 0.2, w * 0.5, h * 0.8], fill=(240, 200, 40))
    draw.rectangle([w * 0.6, h * 0.5, w * 0.9, h * 0.9], fill=(200, 40, 60))
    return image


def build_app() -> Any:
    import gradio as gr

    from . import ui

    with gr.Blocks(title="MIGC box editor demo", analytics_enabled=False) as app:
        for is_img2img, tab in ((False, "txt2img"), (True, "img2img")):
            with gr.Tab(tab, elem_id=f"tab_{tab}"):
                gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}_prompt")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{tab}_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{tab}_height")
                if is_img2img:
                    gr.Image(label="Input image", type="pil", elem_id="img2img_image")
                else:
                    gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery")
                    generate = gr.Button("Generate (a stand-in image)", elem_id="txt2img_generate")
                    generate.click(fn=lambda w, h: [backdrop_image(w, h)], inputs=[width, height], outputs=[gallery])
                components = ui.build_panel(is_img2img)
                layout = components[UI_FIELDS.index("layout")]
                with gr.Row():
                    check = gr.Button("Check layout", elem_id=f"{tab}_migc_check")
                    parsed = gr.Textbox(label="What the Script receives", elem_id=f"{tab}_migc_parsed")
                check.click(fn=check_layout, inputs=[layout, width, height], outputs=[parsed])
                with gr.Row():
                    infotext = gr.Textbox(label="Infotext to paste (MIGC field JSON)", elem_id=f"{tab}_migc_infotext")
                    paste = gr.Button("Paste infotext", elem_id=f"{tab}_migc_paste")
                getters = ui.infotext_fields(components)

                def paste_infotext(text: str, getters: list = getters) -> list:
                    params = {INFOTEXT_KEY: text} if text.strip() else {}
                    return [get(params) for _, get in getters]

                paste.click(fn=paste_infotext, inputs=[infotext], outputs=[c for c, _ in getters])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("MIGC_DATA_DIR", tempfile.mkdtemp(prefix="migc-demo-"))  # saved layouts go there
    _inject_into_page(page_head())
    app = build_app()
    app.queue()
    app.launch(server_name=args.host, server_port=args.port, show_api=False, quiet=True)


if __name__ == "__main__":
    main()
