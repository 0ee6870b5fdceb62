"""Shared builders for the tests: the real ldm UNet, random MIGC checkpoints, the shared reference data."""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIGC_SHARED_DIR", REPO.parent / "shared"))
KEYS_FILE = SHARED / "data" / "migc-ckpt-keys.txt"


def load_shared_module(relative: str, name: str):
    """Import one of the pure-torch input generators that ship with the reference data."""
    path = SHARED / relative
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rerandomise_zero_params(model: torch.nn.Module, seed: int = 0, std: float = 0.03) -> int:
    """ldm zero-initialises proj_out, each ResBlock's last conv and the final conv, which makes a
    random UNet ignore its context. Give every all-zero parameter random values; return how many."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
                count += 1
    return count


def build_unet(model_channels: int = 32, seed: int = 0, context_dim: int = 768):
    """The real CompVis ldm UNetModel with the SD1.x layout (4 levels, attention at ds 1, 2, 4)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
        use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
        use_checkpoint=False, legacy=False,
    )
    rerandomise_zero_params(unet, seed)
    return unet.eval().requires_grad_(False)


def official_subkeys() -> dict[str, tuple[int, ...]]:
    """Per-layer sub-key -> shape, read from the official key list (independent of lib_migc)."""
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("migc."):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def compvis_key(layer: str, subkey: str) -> str:
    return f"model.diffusion_model.{layer}.transformer_blocks.0.attn2.{subkey}"


def random_official_state(layers=("middle_block.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"),
                          seed: int = 0, key=compvis_key, channels: int = 1280) -> dict[str, torch.Tensor]:
    """A random checkpoint with exactly the official key list and shapes (C rescaled if asked)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        for subkey, shape in official_subkeys().items():
            shape = tuple(_rescale(s, channels) for s in shape)
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[key(layer, subkey)] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state[key(layer, "migc.norm.weight")] += 1.0
    return state


def _rescale(dim: int, channels: int) -> int:
    """Map the C = 1280 shapes of the key list onto another channel count (for tiny UNets)."""
    return {1280: channels, 1281: channels + 1, 80: channels // 16}.get(dim, dim)


def start_job(p, args, host=None):
    """What the WebUI calls before sampling: before_process, process (with ``host``, A1111 by default), before_sampling."""
    from lib_migc import job
    from lib_migc.hosts import a1111

    job.before_process(p)
    job.process(p, args, host or a1111)
    job.before_sampling(p)


def finish_job(p):
    """What the WebUI calls after a batch and at the end of the job."""
    from types import SimpleNamespace

    from lib_migc import job

    job.after_batch(p)
    job.postprocess(p, SimpleNamespace(images=[], infotexts=[]))


def build_family_unet(family: str, model_channels: int = 32, seed: int = 0):
    """Tiny real ldm UNets shaped like SD2.x (1024-d context, linear projections) or SDXL (2048-d context,
    two transformer blocks per spatial transformer, a 2816-d ``y`` vector through ``label_emb``). sgm's
    SDXL classes are not on PyPI; ldm's UNet in this shape runs the same attn2 modules the hooks see."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if family == "sd1":
        return build_unet(model_channels, seed)
    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
        use_spatial_transformer=True, transformer_depth=2 if sdxl else 1, context_dim=[2048, 2048] if sdxl else 1024,
        use_linear_in_transformer=True, use_checkpoint=False, legacy=False, num_classes="continuous" if sdxl else None,
    )
    if sdxl:
        unet.label_emb = torch.nn.Linear(2816, model_channels * 4)
        for module in unet.modules():
            if type(module).__name__ == "SpatialTransformer":
                module.__class__ = _sgm_like_spatial_transformer(type(module))
    rerandomise_zero_params(unet, seed)
    return unet.eval().requires_grad_(False)


def _sgm_like_spatial_transformer(base: type) -> type:
    """ldm's SpatialTransformer indexes one context per transformer block; sgm's (SDXL) reuses a single
    context for every block. Same modules, sgm's rule."""

    class SgmLikeSpatialTransformer(base):
        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context=context)

    return SgmLikeSpatialTransformer
