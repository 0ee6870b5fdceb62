"""End to end: one CFG step of a full-size SD1 UNet with MagicFusion off, fused, and outside its window.

    python bench/bench_fusion_unet.py [--size 512x512] [--steps 30] [--repeats 3] [--device cpu|cuda]

Builds two SD1 ldm UNets with random weights (model A and model B), installs the A1111 adapter the way
a job does (``StepHooks`` with MagicFusion's functions: B beside A at the sampler's model call, the blend
in ``on_cfg_denoised``) and times one k-diffusion CFG step ([cond, uncond] rows, the denoiser's x0 outputs, the blend). Prints the median
times, the fused step and the outside-window step as ratios to a plain step measured in the same run,
the whole-run estimate ``(fused·f + outside·(1 − f))`` for the official window (SNB-then-A, t > 600) at
``--steps`` Euler steps, and B's weight memory (the extra resident memory; the two UNets run one after
the other, so activations are not doubled). Asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_unet import build_sd1_unet, use_sdp_attention  # noqa: E402
from lib_migc.hosts.a1111 import StepHooks  # noqa: E402
from lib_migc.modes.magicfusion.params import FusionParams  # noqa: E402
from lib_migc.modes.magicfusion.runtime import FusionRuntime  # noqa: E402

GUIDANCE = 7.5


def karras_sigmas(steps: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146, rho: float = 7.0) -> list[float]:
    ramp = [i / max(steps - 1, 1) for i in range(steps)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp]


def sigma_to_t(sigma: float) -> float:
    """SD1's DDPM timestep of a noise level (scaled-linear betas, log-σ interpolation, like k-diffusion)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
    return float(np.interp(np.log(sigma), log_sigmas.numpy(), np.arange(1000.0)))


class CompVisDenoiser(torch.nn.Module):
    """k-diffusion's CompVisDenoiser as A1111 wraps the model: k-space x and sigma in, x0 out; every sigma
    maps to the timestep ``t`` of the case being timed (it decides whether MagicFusion's window is open)."""

    def __init__(self, sd_model: SimpleNamespace) -> None:
        super().__init__()
        self.sd_model, self.t = sd_model, 700.0

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.full_like(sigma, self.t)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        scale = (sigma ** 2 + 1) ** -0.5
        eps = self.sd_model.model.diffusion_model(input * scale[:, None, None, None], self.sigma_to_t(sigma),
                                                  context=cond["c_crossattn"][0])
        return input - sigma[:, None, None, None] * eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    use_sdp_attention()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    unet_a = build_sd1_unet(device, dtype)
    torch.manual_seed(1)
    unet_b = build_sd1_unet(device, dtype)
    with torch.no_grad():
        for p in unet_b.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    width, height = map(int, args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, height // 8, width // 8), generator=g).to(device, dtype)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    sigma = 2.0
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet_a))
    inner = CompVisDenoiser(sd_model)
    p = SimpleNamespace(sd_model=sd_model, cfg_scale=GUIDANCE, sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=inner)))

    def cfg_step(hooks: StepHooks | None, t: float) -> None:
        if hooks is None:
            fusion.remove()  # MagicFusion off: the sampler's model exactly as the WebUI has it
        elif not hooks.installed:
            hooks.install(p)
        inner.t = t
        x_in = torch.cat([x, x])
        sigma_in = torch.full((2,), sigma, device=device, dtype=dtype)
        if hooks is not None:
            params = SimpleNamespace(x=x_in, sigma=sigma_in, text_cond=ctx[:1], text_uncond=ctx[1:], denoiser=None)
            hooks.on_cfg_step(0, 1, params)
        with torch.no_grad():
            x_out = inner(x_in, sigma_in, cond={"c_crossattn": [ctx]})
            if hooks is not None:
                hooks.on_cfg_denoised(SimpleNamespace(x=x_out))
            x_out[1] + GUIDANCE * (x_out[0] - x_out[1])  # the WebUI's CFG combine

    def timed(hooks: StepHooks | None, t: float) -> float:
        sync()
        t0 = time.perf_counter()
        cfg_step(hooks, t)
        sync()
        return (time.perf_counter() - t0) * 1e3

    runtime = FusionRuntime(FusionParams(enabled=True, model_b="B", switch_t=600), unet_b)
    fusion = StepHooks("MagicFusion", denoise=runtime.denoise_rows, blend=runtime.blend, runtime=runtime)
    cases = {"plain step (MagicFusion off)": (None, 700.0), "fused step (t = 700 > 600)": (fusion, 700.0),
             "outside the window (t = 500)": (fusion, 500.0)}
    for hook, t in cases.values():
        cfg_step(hook, t)  # warm-up
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every case alike
        for label, (hook, t) in cases.items():
            times[label].append(timed(hook, t))
    fusion.remove()
    median = {label: statistics.median(v) for label, v in times.items()}
    plain = median["plain step (MagicFusion off)"]
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}, {args.size}, median of {args.repeats}")
    print("| case | median ms | ratio to a plain step |")
    print("|---|---|---|")
    for label, ms in median.items():
        print(f"| {label} | {ms:.0f} | {ms / plain:.3f}x |")
    sigmas = karras_sigmas(args.steps)
    fused = sum(sigma_to_t(s) > 600 for s in sigmas)
    fraction = fused / args.steps
    run = fraction * median["fused step (t = 700 > 600)"] + (1 - fraction) * median["outside the window (t = 500)"]
    print(f"\nwhole run, {args.steps} Karras steps, SNB-then-A t > 600: {fused} fused steps (fraction {fraction:.2f}) -> "
          f"{run / plain:.3f}x a plain run (1 + fraction = {1 + fraction:.2f})")
    mib = sum(p.numel() * p.element_size() for p in unet_b.parameters()) / 2**20
    print(f"model B's UNet resident: {mib:.0f} MiB in {dtype} ({mib / 2:.0f} MiB in fp16)")


if __name__ == "__main__":
    main()
