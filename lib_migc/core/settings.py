"""The ``MIGC`` section of the WebUI settings, and where the weights live.

Precedence for the models folder: ``--migc-models-dir`` (preload.py) > the setting > ``models/MIGC``.
"""
from __future__ import annotations

import os
from typing import Any

SECTION = ("migc", "MIGC")
DEFAULTS: dict[str, Any] = {
    "migc_models_dir": "",
    "migc_default_weights": "MIGC_SD14.ckpt",
    "migc_default_steps": 0.5,
    "migc_default_naive_steps": 0.0,
    "migc_default_hires": False,
    "migc_md_max_rows": 0,
    "migc_tiled_vae": "Auto",
    "migc_keep_weights": False,
    "migc_consistent_max_mb": 2048,
}


def _shared() -> Any:
    from modules import shared

    return shared


def option(name: str) -> Any:
    try:
        return getattr(_shared().opts, name, DEFAULTS[name])
    except ImportError:
        return DEFAULTS[name]


def models_dir() -> str:
    """The folder MIGC weights are listed from and loaded from."""
    try:
        shared = _shared()
        from modules import paths
    except ImportError:
        return os.path.join("models", "MIGC")
    from_cli = getattr(shared.cmd_opts, "migc_models_dir", None)
    return from_cli or option("migc_models_dir") or os.path.join(paths.models_path, "MIGC")


def register() -> None:
    """Add the settings; called from the WebUI's ``on_ui_settings`` callback."""
    import gradio as gr

    shared = _shared()
    info, section = shared.OptionInfo, SECTION
    fraction = {"minimum": 0.0, "maximum": 1.0, "step": 0.01}
    items = {
        "migc_models_dir": info(DEFAULTS["migc_models_dir"], "Folder with MIGC weights (empty: models/MIGC; --migc-models-dir overrides)", section=section),
        "migc_default_weights": info(DEFAULTS["migc_default_weights"], "Default MIGC weights file", section=section),
        "migc_default_steps": info(DEFAULTS["migc_default_steps"], "Default MIGC steps (fraction of sampling steps)", gr.Slider, fraction, section=section),
        "migc_default_naive_steps": info(DEFAULTS["migc_default_naive_steps"], "Default NaiveFuser steps (fraction of sampling steps; 0 = off)", gr.Slider, fraction, section=section),
        "migc_default_hires": info(DEFAULTS["migc_default_hires"], "Run MIGC in the hires-fix pass by default", section=section),
        "migc_md_max_rows": info(DEFAULTS["migc_md_max_rows"], "MultiDiffusion: most UNet rows per call (0 = from free GPU memory; lower it if you run out of memory)",
                                 gr.Slider, {"minimum": 0, "maximum": 64, "step": 1}, section=section),
        "migc_tiled_vae": info(DEFAULTS["migc_tiled_vae"], "MultiDiffusion: tiled VAE decode and encode (the same image, in bounded memory; Auto: images above 1024x1024 pixels)",
                               gr.Radio, {"choices": ["Auto", "Always", "Never"]}, section=section),
        "migc_keep_weights": info(DEFAULTS["migc_keep_weights"], "Keep the MIGC weights loaded between jobs (off: a job that does not use them, or a switch to a model MIGC cannot use, frees them; the next MIGC job reloads them in about a second)",
                                  section=section),
        "migc_consistent_max_mb": info(DEFAULTS["migc_consistent_max_mb"], "Keep unchanged instances: most host memory (MiB) the record of the last image may hold (past it the earliest steps are dropped and run without sharing in the next edit; about 27 MiB per step at 512x512)",
                                       gr.Slider, {"minimum": 64, "maximum": 16384, "step": 64}, section=section),
    }
    for name, item in items.items():
        shared.opts.add_option(name, item)
