"""Time the MIGC instance-shading attention against the plain attn2 forward of the same layer.

    python bench/bench_shading.py [--threads N] [--repeats R] [--device cpu|cuda]

For the SD1.x MIGC layers (C = 1280) at a 512x512 image, 16x16 (output_blocks.3-5) and 8x8
(middle_block), it times one attn2 call of a CFG batch (1 cond + 1 uncond row):
  plain: the layer's attention with scaled_dot_product_attention on both rows (A1111's "sdp");
  MIGC:  plain attention on the uncond row + MIGC on the cond row with N instances.
Per-generation work (instance K/V, folded weights) is done before timing, as in a real run.
Prints median-time ratios measured in this one run and the FLOPs of each call
(torch.utils.flop_counter) so the distance to the arithmetic floor is visible. Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import device_setup, median_ms  # noqa: E402

from lib_migc.core.masks import MaskCache  # noqa: E402
from lib_migc.modes.migc.modules import MIGCBlock  # noqa: E402
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode, draw_sac_permutations  # noqa: E402

C, HEADS, CTX = 1280, 8, 768
BOX_GRID = [(x / 4, y / 4, x / 4 + 0.45, y / 4 + 0.45) for y in range(3) for x in range(3)]


class Attn2(torch.nn.Module):
    """An SD1.x attn2 with the ldm parameter names; forward = A1111's sdp optimisation."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = HEADS
        self.to_q = torch.nn.Linear(C, C, bias=False)
        self.to_k = torch.nn.Linear(CTX, C, bias=False)
        self.to_v = torch.nn.Linear(CTX, C, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(C, C), torch.nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        split = lambda t: t.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(-2))




def flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--instances", default="1,2,4,6,8,16")
    args = parser.parse_args()
    device, dtype, sync = device_setup(args)
    torch.manual_seed(0)
    attn = Attn2().to(device, dtype).eval()
    block = MIGCBlock(C).to(device, dtype).eval()
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("layer  N   plain ms   MIGC ms  ratio   plain GF   MIGC GF  GF ratio  NaiveFuser ratio")
    for label, size in (("16x16", (16, 16)), ("8x8", (8, 8))):
        hw = size[0] * size[1]
        x = torch.randn((2, hw, C), device=device, dtype=dtype)
        ctx = torch.randn((2, 77, CTX), device=device, dtype=dtype)
        with torch.no_grad():
            plain = lambda: attn(x, context=ctx)  # noqa: E731
            t_plain = median_ms(plain, args.repeats, sync)
            f_plain = flops(plain)
            for n in map(int, args.instances.split(",")):
                boxes = [BOX_GRID[i % len(BOX_GRID)] for i in range(n)]
                cond = InstanceConditioning.build(
                    torch.randn((n, 77, CTX), dtype=dtype), torch.randn((n, CTX), dtype=dtype), boxes)
                shader = LayerShader(attn, lambda a, b: attn(a, context=b), cond, block)
                masks = MaskCache.from_boxes(boxes, 512, 512).at(size, device, dtype)
                gens = [torch.Generator(device=device).manual_seed(1)]

                def call(mode):
                    uncond = attn(x[1:], context=ctx[1:])
                    perms = draw_sac_permutations(gens, device) if mode is ShadingMode.MIGC else None
                    return shader(x[:1], ctx[:1], masks, mode, perms=perms), uncond

                migc = lambda: call(ShadingMode.MIGC)  # noqa: E731
                naive = lambda: call(ShadingMode.NAIVE)  # noqa: E731
                t_migc = median_ms(migc, args.repeats, sync)
                t_naive = median_ms(naive, args.repeats, sync)
                f_migc = flops(migc)
                print(f"{label:6s} {n:2d} {t_plain:9.2f} {t_migc:9.2f} {t_migc / t_plain:6.2f}x "
                      f"{f_plain:9.3f} {f_migc:9.3f} {f_migc / f_plain:8.2f}x {t_naive / t_plain:10.2f}x")


if __name__ == "__main__":
    main()
