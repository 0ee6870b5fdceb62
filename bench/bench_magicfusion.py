"""Time MagicFusion's SNB blend against the plain CFG combine it replaces.

    python bench/bench_magicfusion.py [--repeats R] [--threads N] [--device cpu|cuda]

A plain step combines one model's predictions (``u + s·(c − u)``); a fused step runs SNB on two models'
predictions (two CFG combines, two saliency maps: abs, 4×4 box mean, bilinear resize, channel mean,
spatial softmax, per-pixel selection). Both are tiny next to the UNet calls (a fused step costs two
UNet batches); this shows how much the blend itself adds. Latents: 1×4×64×64 (512² image) and
2×4×96×128 (768×1024, batch 2). Prints median times and their ratio measured in this one run, for
``snb_blend`` (ε, timestep samplers) and ``snb_blend_denoised`` (x0, k-diffusion). Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import device_setup, median_ms  # noqa: E402

from lib_migc.modes.magicfusion.method import cfg, snb_blend, snb_blend_denoised  # noqa: E402

SHAPES = ((1, 4, 64, 64), (2, 4, 96, 128))
GUIDANCE, K_A, K_B = 7.5, 1.0, 1.0




@torch.no_grad()
def time_shape(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, repeats: int,
               sync: Callable[[], None]) -> tuple[float, float, float]:
    """Median ms of plain CFG, ``snb_blend`` and ``snb_blend_denoised`` on random latents of ``shape``."""
    a_c, a_u, b_c, b_u, x = (torch.randn(shape, device=device, dtype=dtype) for _ in range(5))
    sigma = torch.full((shape[0],), 2.5, device=device)
    t_cfg = median_ms(lambda: cfg(a_u, a_c, GUIDANCE), repeats, sync)
    t_snb = median_ms(lambda: snb_blend(a_c, a_u, b_c, b_u, GUIDANCE, K_A, K_B), repeats, sync)
    t_x0 = median_ms(lambda: snb_blend_denoised(x, sigma, a_c, a_u, b_c, b_u, GUIDANCE, K_A, K_B), repeats, sync)
    return t_cfg, t_snb, t_x0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, dtype, sync = device_setup(args)
    torch.manual_seed(0)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={args.repeats}")
    print(f"{'latent':>14s} {'CFG ms':>9s} {'SNB ms':>9s} {'ratio':>7s} {'SNB-x0 ms':>10s} {'ratio':>7s}")
    for shape in SHAPES:
        t_cfg, t_snb, t_x0 = time_shape(shape, device, dtype, args.repeats, sync)
        label = "×".join(map(str, shape))
        print(f"{label:>14s} {t_cfg:9.3f} {t_snb:9.3f} {t_snb / t_cfg:6.1f}x {t_x0:10.3f} {t_x0 / t_cfg:6.1f}x")

if __name__ == "__main__":
    main()
