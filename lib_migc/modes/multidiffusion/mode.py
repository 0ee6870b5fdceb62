"""The MultiDiffusion region mode's part of a WebUI job: prompts, masks, bootstrapping, the hooks.

Like :mod:`lib_migc.modes.magicfusion.mode` it is called by :mod:`lib_migc.job` at the same points as the other
modes; it acts at the hosts' model-call hook point (``job.host.StepHooks``), with
:meth:`~lib_migc.modes.multidiffusion.runtime.RegionRuntime.denoise_rows`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch

from ...core import settings, tiled_vae
from ...core.errors import MigcError
from ...core.families import model_family
from ...core.masks import LATENT_FACTOR
from ...core.text_encoding import encode_conditioning, own_global_context
from ...hosts.base import pass_size
from ...params import MigcParams
from .params import MODE_MULTIDIFFUSION, WINDOW_WHOLE_CANVAS
from ..base import Mode
from ..migc.mode import fit_layout_masks, unknown_family
from .runtime import COLOUR_POOL, Bootstrap, RegionPrompts, RegionRuntime, layout_region_masks
from .windows import Window, plan_windows

log = logging.getLogger("migc")

#: Rough activation memory of one SD1.5 fp16 UNet row per latent pixel with SDP attention (~300 MB at
#: 64x64, docs/modes/multidiffusion.md §6); SDXL rows cost about 2.5 times that.
ROW_BYTES_PER_LATENT_PIXEL = 75_000


def encode_prompts(p: Any, params: MigcParams) -> RegionPrompts:
    """Each box's description, its own negative where given (others take the main negative), and the
    layout's global prompt for the background region when it replaces the main prompt."""
    from modules import devices

    layout = params.layout
    with devices.autocast():
        cond, cond_vec = (encode_conditioning(p.sd_model, layout.descriptions, p.width, p.height) if len(layout)
                          else (torch.zeros((0, 1, 1)), None))  # a panorama without boxes: the background only
        uncond = uncond_vec = None
        if any(layout.negatives):
            main_negative = getattr(p, "negative_prompt", "") or ""
            texts = [negative if negative is not None else main_negative for negative in layout.negatives]
            uncond, uncond_vec = encode_conditioning(p.sd_model, texts, p.width, p.height)
        encoded = own_global_context(params, lambda texts: encode_conditioning(p.sd_model, texts, p.width, p.height))
        background, background_vec = encoded if encoded is not None else (None, None)
    return RegionPrompts(cond, cond_vec, uncond, uncond_vec, background, background_vec)


def colour_latents(p: Any, seed: int, count: int = COLOUR_POOL) -> torch.Tensor:
    """(count, C) latents of random constant colours (the official bootstrapping backgrounds), encoded
    once with the model's VAE from small 64x64 images; the VAE's posterior sample is drawn under a
    forked RNG so the WebUI's random state is untouched."""
    from modules import sd_samplers_common

    g = torch.Generator().manual_seed(int(seed))
    colours = torch.rand((count, 3, 1, 1), generator=g).expand(count, 3, 64, 64)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        latents = sd_samplers_common.images_tensor_to_samples(colours.contiguous(), approximation=0, model=p.sd_model)
    return latents.float().mean(dim=(2, 3)).cpu()


#: Rows per call without a GPU to measure, once there are several windows: a plain CFG call's two rows
#: and a little more, so a panorama's memory is a 512² step's, not the canvas's.
ROWS_WITHOUT_GPU = 4


def chunk_rows(p: Any, latent_hw: tuple[int, int], dtype: torch.dtype, windows: int = 1) -> int:
    """Most UNet rows per call: the setting, or an estimate from the free GPU memory for rows of
    ``latent_hw``; without CUDA all at once for one window (the rows of one canvas) and
    :data:`ROWS_WITHOUT_GPU` for several (0 = all at once)."""
    configured = int(settings.option("migc_md_max_rows") or 0)
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 0 if windows == 1 else ROWS_WITHOUT_GPU
    free, _ = torch.cuda.mem_get_info()
    per_row = latent_hw[0] * latent_hw[1] * ROW_BYTES_PER_LATENT_PIXEL * (torch.finfo(dtype).bits / 16)
    if getattr(p.sd_model, "is_sdxl", False):
        per_row *= 2.5
    return max(2, int(0.8 * free / per_row))


def native_size(sd_model: Any) -> int:
    """The side, in pixels, the model was trained at: SDXL 1024, SD2.x v-prediction (768-v) 768, else 512."""
    family = model_family(sd_model)
    if family == "sdxl":
        return 1024
    if family == "sd2" and v_prediction(sd_model):
        return 768
    return 512


def v_prediction(sd_model: Any) -> bool:
    """Whether the model predicts v (A1111 marks it on the model, Forge on its UNet's predictor)."""
    if getattr(sd_model, "parameterization", None) == "v":
        return True
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    return getattr(predictor, "prediction_type", None) in ("v", "v_prediction")


def window_plan(params: MigcParams, sd_model: Any, width: int, height: int) -> list[Window]:
    """The latent windows of a ``width`` x ``height`` canvas: one over the whole canvas when it fits the
    window (and no wrap), else native-size (or ``md_window``) windows every ``md_stride`` pixels."""
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    if params.md_window == WINDOW_WHOLE_CANVAS:
        size_h, size_w = h, w
    else:
        size_h = size_w = (params.md_window or native_size(sd_model)) // LATENT_FACTOR
    return plan_windows(h, w, size_h, size_w, params.md_stride // LATENT_FACTOR, params.md_wrap)


def build_runtime(job: Any, hr_pass: bool, noise: torch.Tensor | None, prompts: RegionPrompts) -> RegionRuntime:
    """Masks and windows at this pass's size; bootstrapping only in a txt2img first pass with boxes (x_T is
    pure noise there)."""
    p, params = job.p, job.params
    width, height = pass_size(p, hr_pass)
    masks = layout_region_masks(params.layout, width, height)
    windows = window_plan(params, p.sd_model, width, height)
    bootstrap = None
    steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if hr_pass else int(p.steps)
    boot_steps = int(round(params.md_bootstrap * steps))
    txt2img = not hasattr(p, "init_images")
    if boot_steps > 0 and len(params.layout) and not hr_pass and txt2img and isinstance(noise, torch.Tensor):
        bootstrap = Bootstrap(colour_latents(p, p.seeds[0]), noise.detach(), list(p.seeds), boot_steps)
    reference = next(job.host.unet_of(p).parameters())
    window = (windows[0].height, windows[0].width)
    return RegionRuntime(masks, prompts, bootstrap, alphas_cumprod=getattr(p.sd_model, "alphas_cumprod", None),
                         chunk_rows=chunk_rows(p, window, reference.dtype, len(windows)), windows=windows)


def install(job: Any, hr_pass: bool, noise: torch.Tensor | None) -> Any:
    """Encode (once per job), build this pass's runtime and install it at the host's model call; returns the hooks."""
    prompts = job.state.get(MODE_MULTIDIFFUSION)
    if prompts is None:
        prompts = job.state[MODE_MULTIDIFFUSION] = encode_prompts(job.p, job.params)  # once per job
    runtime = build_runtime(job, hr_pass, noise, prompts)
    record_maps(job, runtime)
    hooks = job.host.StepHooks("MultiDiffusion", denoise=runtime.denoise_rows, runtime=runtime,
                                 is_current=lambda: job.is_current(hooks))
    hooks.install(job.p)
    return hooks


def record_maps(job: Any, runtime: RegionRuntime) -> None:
    """*Show instance maps*: the boxes' fusion weights of this pass, the same for every image of the batch."""
    maps = job.maps_for(MODE_MULTIDIFFUSION)
    if maps is None:
        return
    maps.labels = list(job.params.layout.descriptions)
    maps.source = "Shares: each box's MultiDiffusion fusion weight (its region mask over every window)"
    shares = runtime.region_shares()[1:]
    images = len(job.p.seeds)
    maps.add(range(images), shares.expand(images, *shares.shape))


def needs_windows(p: Any, params: MigcParams) -> bool:
    """Whether some pass of this job runs more than one window (a job without boxes does nothing otherwise)."""
    sizes = [(p.width, p.height)]
    if getattr(p, "enable_hr", False) and params.hires:
        sizes.append((getattr(p, "hr_upscale_to_x", 0) or 0, getattr(p, "hr_upscale_to_y", 0) or 0))
        if not all(sizes[-1]):
            return True  # the hires size is not known yet: let the pass decide
    return any(len(window_plan(params, p.sd_model, width, height)) > 1 for width, height in sizes)


def check_job(p: Any) -> None:
    """What must hold before sampling (raised as the job's error)."""
    if getattr(p, "image_mask", None) is not None:
        raise MigcError("MultiDiffusion regions do not combine with inpainting masks yet; use the naive or migc mode, "
                        "or remove the inpainting mask.")


class MultiDiffusionMode(Mode):
    """Each box its own prompt through the whole denoiser, fused per pixel (``mode: multidiffusion``, any family)."""

    name, title = MODE_MULTIDIFFUSION, "MultiDiffusion"
    draws_maps = True
    excludes = ("structure", "magicfusion")
    exclusion_reason = ("MultiDiffusion runs each box as its own prompt, which they do not combine with; use the migc "
                        "or naive mode to combine them.")

    def asked(self, params: MigcParams) -> bool:
        return params.enabled and params.mode == MODE_MULTIDIFFUSION  # no boxes: a panorama of the main prompt

    def turned_off(self, params: MigcParams) -> MigcParams:
        return replace(params, enabled=False)

    def decline(self, p: Any, host: ModuleType, params: MigcParams) -> str | None:
        if not len(params.layout) and not needs_windows(p, params):
            return ("MultiDiffusion without boxes makes panoramas and large canvases; this one fits one window, so "
                    "there was nothing to do: draw boxes, or make the canvas larger than the window.")
        return unknown_family(p, params.mode)

    def start(self, job: Any) -> None:
        fit_layout_masks(job)
        check_job(job.p)
        job.lasting.append(tiled_vae.install(job.host.vae_of(job.p), settings.option("migc_tiled_vae")))

    def runs_in_pass(self, params: MigcParams, hr_pass: bool) -> bool:
        return not hr_pass or params.hires

    def begin_pass(self, job: Any, hr_pass: bool, noise: Any) -> Any:
        if not self.runs_in_pass(job.params, hr_pass):
            return None
        if not len(job.params.layout) and len(window_plan(job.params, job.p.sd_model, *pass_size(job.p, hr_pass))) == 1:
            return None  # a panorama's pass that fits one window is a plain pass
        with torch.no_grad():
            return install(job, hr_pass, noise)
