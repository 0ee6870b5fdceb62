"""What *Show instance maps* adds to a sampling step, as a share of a plain SD1 step measured in the same run.

    python bench/bench_maps.py [--size 512x512] [--instances 6] [--phrases 4] [--repeats 200] [--device cpu|cuda]

Whole-step twins (``bench_unet.py --maps``) cannot resolve 1 % on a busy CPU (their medians moved by ±15 % here),
so this bench times the collection itself: it runs one hooked forward of the full-size SD1 UNet (random
weights, the A1111 adapter's hooks) per mode with maps on, captures every recording call the hooks make
(MIGC: the SAC weights and masks each coarse layer hands over; naive: the masks; StructureDiffusion alone:
every attn2 call, which records on the coarse layers), then replays exactly those calls ``--repeats`` times.
MultiDiffusion records once per pass and MagicFusion one (images, 1, h, w) mask per step; they are timed the
same way. Prints per-step cost in ms and as a percentage of the plain step (median of 5). Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_unet import build_sd1_unet, cfg_inputs, session_for, structure_session, use_sdp_attention, with_maps  # noqa: E402
from timing import device_setup, median_ms  # noqa: E402

from lib_migc.core.instance_maps import InstanceMaps  # noqa: E402
from lib_migc.core.unet_layers import MIGC_LAYERS  # noqa: E402
from lib_migc.hosts.a1111 import Hooks  # noqa: E402
from lib_migc.modes.migc import session as session_module  # noqa: E402
from lib_migc.modes.migc.modules import MIGCBlock  # noqa: E402
from lib_migc.modes.structure.method import StructureRuntime  # noqa: E402


def captured_calls(unet, session, x, t, ctx) -> list:
    """Run one hooked CFG forward and return a replayable closure per recording call the hooks made."""
    calls = []
    original_add, original_record = InstanceMaps.add, StructureRuntime.record_map
    original_sac, original_naive = session_module.sac_instance_shares, session_module.naive_instance_shares

    def sac(weights, masks):
        calls.append(lambda: original_sac(weights, masks))
        return original_sac(weights, masks)

    def naive(masks):
        calls.append(lambda: original_naive(masks))
        return original_naive(masks)

    def add(self, images, shares):
        calls.append(lambda: original_add(self, images, shares))
        return original_add(self, images, shares)

    def record(self, *record_args):
        calls.append(lambda: original_record(self, *record_args))  # only the replay records

    session_module.sac_instance_shares, session_module.naive_instance_shares = sac, naive
    InstanceMaps.add, StructureRuntime.record_map = add, record
    hooks = Hooks(session)
    hooks.install(SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))))
    hooks.on_cfg_step(0, 1, SimpleNamespace(text_cond=ctx[:1], text_uncond=ctx[1:], x=x))
    try:
        with torch.no_grad():
            unet(x, t, context=ctx)
    finally:
        hooks.remove()
        session_module.sac_instance_shares, session_module.naive_instance_shares = original_sac, original_naive
        InstanceMaps.add, StructureRuntime.record_map = original_add, original_record
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--phrases", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    device, dtype, sync = device_setup(args)
    use_sdp_attention()
    width, height = map(int, args.size.split("x"))
    unet = build_sd1_unet(device, dtype)
    torch.manual_seed(1)
    blocks = {name: MIGCBlock(1280).to(device, dtype).eval() for name in MIGC_LAYERS}
    x, t, ctx = cfg_inputs(width, height, device, dtype)

    def plain():
        with torch.no_grad():
            unet(x, t, context=ctx)

    step = median_ms(plain, 5, sync)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}; {width}x{height}, one CFG step = 2 rows")
    print(f"plain SD1 step: {step:.0f} ms (median of 5)\n")
    print("| mode | recording calls per step | maps cost per step (ms) | share of a plain step |")
    print("|---|---|---|---|")
    n = args.instances
    cases = [
        (f"MIGC, {n} instances", with_maps(session_for(n, False, blocks, width, height, device, dtype), width, height)),
        (f"naive, {n} instances", with_maps(session_for(n, True, blocks, width, height, device, dtype), width, height)),
        (f"StructureDiffusion alone, {args.phrases} phrases",
         with_maps(structure_session(args.phrases, "default", width, height, device, dtype), width, height)),
    ]
    for label, session in cases:
        calls = captured_calls(unet, session, x, t, ctx)
        cost = median_ms(lambda: [c() for c in calls], args.repeats, sync)
        print(f"| {label} | {len(calls)} | {cost:.3f} | {cost / step * 100:.3f} % |")
    maps = InstanceMaps(owner="magicfusion", labels=["model B"])
    maps.begin_pass(1, width, height)
    mask = torch.rand((1, 1, height // 8, width // 8), generator=torch.Generator().manual_seed(2)).to(device) > 0.5
    cost = median_ms(lambda: maps.add(range(1), mask), args.repeats, sync)
    print(f"| MagicFusion | 1 | {cost:.3f} | {cost / step * 100:.3f} % |")
    print("| MultiDiffusion | once per pass (its fusion weights), none per step | 0 | 0 % |")


if __name__ == "__main__":
    main()
