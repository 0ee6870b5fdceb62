"""MultiDiffusion region mode: one CFG denoiser call of a full-size SD1 UNet, plain vs N regions.

    python bench/bench_multidiffusion.py [--size 512x512] [--regions 1,2,4,8] [--repeats 1] [--chunk 0]
                                         [--device cpu|cuda] [--threads N] [--no-memory]

The UNet (real ldm ``UNetModel``, SD1 config, random weights, SDP attention as A1111's 'sdp') sits
behind a k-diffusion-style denoiser (x0 out); the region rows go through
:class:`lib_migc.modes.multidiffusion.runtime.RegionRuntime` exactly as the A1111 wrapper runs them. Cases:
plain (2 rows), regions while bootstrapping (every region's cond and uncond row: 2(N+1) rows), and
regions after bootstrapping with one shared negative (N+1 cond rows + 1 uncond row). Prints the median
time, the ratio to plain measured in the same run, the expected ratio from the row count, and the
extra peak memory (CUDA allocator peak; CPU: peak of live tensor storages). Asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_unet import LiveTensorPeak, build_sd1_unet, use_sdp_attention  # noqa: E402
from timing import device_setup  # noqa: E402
from lib_migc.modes.multidiffusion.method import pixel_boxes, region_masks  # noqa: E402
from lib_migc.modes.multidiffusion.runtime import Bootstrap, RegionPrompts, RegionRuntime  # noqa: E402

GRID = [(x * 0.23, y * 0.23, x * 0.23 + 0.3, y * 0.23 + 0.3) for y in range(4) for x in range(4)]
SIGMA = 3.0


def k_denoiser(unet: torch.nn.Module, device: torch.device, sigma: float = SIGMA):
    """The model call the hooks make: a k-diffusion-style denoiser (x0 out) around the UNet, at one level."""
    c_in = 1 / (sigma ** 2 + 1) ** 0.5

    def model(xs, levels, contexts, vectors, source):
        with torch.no_grad():
            eps = unet(xs * c_in, torch.full((xs.shape[0],), 500.0, device=device), context=contexts)
        return xs - eps * levels.view(-1, 1, 1, 1).to(xs.dtype)

    return model


def panorama_step(model, x: torch.Tensor, ctx: torch.Tensor, chunk: int, stride_px: int = 64):
    """(windows, fn): one windowed denoiser step of a box-free panorama ``x`` (1, C, h, w) in 512-px
    windows every ``stride_px``, with a cond and an uncond row, through the runtime the hooks call."""
    from lib_migc.modes.multidiffusion.runtime import RegionPrompts, RegionRuntime
    from lib_migc.modes.multidiffusion.windows import plan_windows

    h, w = x.shape[-2:]
    windows = plan_windows(h, w, 64, 64, stride_px // 8)
    masks = torch.ones((1, 1, h, w), device=x.device, dtype=x.dtype)
    runtime = RegionRuntime(masks, RegionPrompts(torch.zeros((0, 77, 768))), None, space="k", chunk_rows=chunk,
                            windows=windows)
    sigma = torch.full((2,), SIGMA, device=x.device)
    return len(windows), lambda: runtime.denoise(model, torch.cat([x, x]), sigma, ctx, None, [True, False], [0, 0], 0)


def peak_mib(fn, cuda: bool) -> float:
    """Extra peak memory of one call of ``fn``: the CUDA allocator's peak, or on the CPU the peak of live tensor storages."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorPeak() as tracker:
        fn()
    return tracker.peak / 2**20


def full_size_setup(parser: argparse.ArgumentParser):
    """Add the device options, parse, and build the full-size SD1 UNet with A1111's 'sdp' attention:
    (args, device, dtype, sync, unet)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    use_sdp_attention()
    device, dtype, sync = device_setup(args)
    return args, device, dtype, sync, build_sd1_unet(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--regions", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=0, help="most UNet rows per call (0 = all at once)")
    args, device, dtype, sync, unet = full_size_setup(parser)
    cuda = device.type == "cuda"
    width, height = map(int, args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, height // 8, width // 8), generator=g).to(device, dtype)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    sigma = torch.full((2,), SIGMA, device=device)
    model = k_denoiser(unet, device)

    def plain():
        return model(torch.cat([x, x]), sigma, ctx, None, None)

    def regions(n: int, bootstrapping: bool):
        boxes = pixel_boxes([GRID[i % len(GRID)] for i in range(n)], height, width)
        masks = region_masks(boxes, height, width, device=device, dtype=dtype)
        prompts = RegionPrompts(torch.randn((n, 77, 768), generator=g).to(device, dtype))
        boot = Bootstrap(torch.randn((20, 4), generator=g), torch.randn(x.shape, generator=g), [1], 10) if bootstrapping else None
        runtime = RegionRuntime(masks, prompts, boot, space="k", chunk_rows=args.chunk)

        def run():
            return runtime.denoise(model, torch.cat([x, x]), sigma, ctx, None, [True, False], [0, 0], step=0)

        return run

    counts = [int(n) for n in args.regions.split(",")]
    cases = [("plain", plain, 2)]
    for n in counts:
        cases.append((f"{n} regions, bootstrapping", regions(n, True), 2 * (n + 1)))
        cases.append((f"{n} regions, after bootstrapping (shared negative)", regions(n, False), n + 2))

    for _, fn, _ in cases:
        fn()  # warm-up
    peaks = {label: 0.0 if args.no_memory else peak_mib(fn, cuda) for label, fn, _ in cases}
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(args.repeats):
        for label, fn, _ in cases:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[label].append((time.perf_counter() - t0) * 1e3)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}, {args.size}, chunk {args.chunk or 'all'}")
    print("| case | UNet rows | median ms | ratio to plain | expected (rows / 2) | peak MiB |")
    print("|---|---|---|---|---|---|")
    plain_ms = statistics.median(times["plain"])
    for label, _, rows in cases:
        ms = statistics.median(times[label])
        print(f"| {label} | {rows} | {ms:.0f} | {ms / plain_ms:.2f}x | {rows / 2:.1f}x | {peaks[label]:.0f} |")


if __name__ == "__main__":
    main()
