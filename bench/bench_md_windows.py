"""MultiDiffusion windows: one CFG denoiser step of a full-size SD1 UNet on panorama canvases.

    python bench/bench_md_windows.py [--sizes 512x1024,512x2048] [--strides 64,128] [--chunk 2] [--repeats 1]
                                     [--device cpu|cuda] [--threads N] [--no-memory]

For each canvas (HxW px) and stride: the windows the mode plans (SD1: 512 px), the UNet rows per step
(a cond and an uncond row per window, no boxes: the plain panorama), the median time of one step
through :class:`lib_migc.modes.multidiffusion.runtime.RegionRuntime` (what the hooks call), its ratio to a
plain 512x512 step and to a plain full-canvas step (both measured in the same run), and the peak memory
of the step against the plain full-canvas step (CUDA allocator peak; CPU: peak of live tensor
storages). Windows go through the UNet ``--chunk`` rows at a time. Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_multidiffusion import SIGMA, full_size_setup, k_denoiser, panorama_step, peak_mib  # noqa: E402
from timing import median_ms  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x1024,512x2048", help="HxW in pixels")
    parser.add_argument("--strides", default="64,128", help="window strides in pixels")
    parser.add_argument("--chunk", type=int, default=2, help="most UNet rows per call (0 = all at once)")
    parser.add_argument("--repeats", type=int, default=1)
    args, device, dtype, sync, unet = full_size_setup(parser)
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    model = k_denoiser(unet, device, SIGMA)

    def latent(height: int, width: int) -> torch.Tensor:
        return torch.randn((1, 4, height // 8, width // 8), generator=g).to(device, dtype)

    def plain(height: int, width: int):
        x = latent(height, width)
        return lambda: model(torch.cat([x, x]), torch.full((2,), SIGMA, device=device), ctx, None, None)

    def windowed(height: int, width: int, stride: int):
        return panorama_step(model, latent(height, width), ctx, args.chunk, stride)

    def peak(fn) -> float:
        return float("nan") if args.no_memory else peak_mib(fn, cuda)

    base = plain(512, 512)
    base_ms = median_ms(base, args.repeats, sync)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}, chunk {args.chunk or 'all'} rows; plain 512x512 step: {base_ms:.0f} ms")
    print("| canvas | stride | windows | UNet rows | ms per step | vs plain 512² | vs plain full canvas | peak MiB (plain full canvas) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        height, width = map(int, size.split("x"))
        full = plain(height, width)
        full_ms, full_peak = median_ms(full, args.repeats, sync), peak(full)
        for stride in map(int, args.strides.split(",")):
            count, fn = windowed(height, width, stride)
            ms = median_ms(fn, args.repeats, sync)
            print(f"| {height}x{width} | {stride} | {count} | {2 * count} | {ms:.0f} | {ms / base_ms:.1f}x | "
                  f"{ms / full_ms:.1f}x | {peak(fn):.0f} ({full_peak:.0f}) |", flush=True)


if __name__ == "__main__":
    main()
