"""MIGC (Multi-Instance Generation Controller) as an always-on WebUI script.

Only wiring: every callback forwards to lib_migc, which holds the layout, the math and the hooks.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import modules.scripts as scripts  # noqa: E402
from modules import script_callbacks  # noqa: E402

from lib_migc import hosts, job, layout_library, ui, xyz_axes  # noqa: E402
from lib_migc.core import settings  # noqa: E402

HOST = hosts.current()


class MigcScript(scripts.Script):
    def title(self):
        return "MIGC"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components = ui.build_panel(is_img2img)
        self.infotext_fields = ui.infotext_fields(components)
        self.paste_field_names = []
        return components

    def before_process(self, p, *args):
        job.before_process(p)

    def process(self, p, *args):
        job.process(p, args, HOST)

    def process_before_every_sampling(self, p, *args, **kwargs):
        job.before_sampling(p, noise=kwargs.get("noise"))

    def post_sample(self, p, ps, *args):
        job.post_sample(p, ps)

    def postprocess_batch(self, p, *args, **kwargs):
        job.after_batch(p)

    def postprocess(self, p, processed, *args):
        job.postprocess(p, processed)


script_callbacks.on_cfg_denoiser(job.on_cfg_denoiser)
script_callbacks.on_cfg_denoised(job.on_cfg_denoised)
script_callbacks.on_ui_settings(settings.register)
script_callbacks.on_model_loaded(job.on_model_loaded)
script_callbacks.on_before_ui(xyz_axes.register)
script_callbacks.on_app_started(lambda demo, app: layout_library.add_api_routes(app))
