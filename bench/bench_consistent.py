"""Keep unchanged instances (Consistent-MIG): the record's size and the cost of an edit step, full-size SD1 UNet.

    python bench/bench_consistent.py [--sizes 512x512:50,768x512:30] [--repeats 1] [--device cpu|cuda] [--threads N]

For each size (WxH:steps): one UNet call with a cond and an uncond row through the hooks the WebUI
installs (A1111's attn1 overrides driven by :class:`ConsistentRun`), first recording, then editing
(keys and values from the current and the recorded tokens in the 9 up-block self-attentions). Prints
the record's bytes per step (the tokens of every up-block attn1 input, fp16, plus the sampler latent in
fp32) and for the whole generation, and the time of a recording step and an edit step against a plain
one, all measured in this run. Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_multidiffusion import full_size_setup  # noqa: E402
from timing import median_ms  # noqa: E402

from lib_migc.hosts import a1111  # noqa: E402
from lib_migc.modes.consistent.mode import is_up_block  # noqa: E402
from lib_migc.modes.consistent.record import Fingerprint, Record  # noqa: E402
from lib_migc.modes.consistent.runtime import ConsistentRun  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x512:50,768x512:30", help="WxH:steps")
    parser.add_argument("--repeats", type=int, default=1)
    args, device, dtype, sync, unet = full_size_setup(parser)
    p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}")
    print("| size | steps | record per step (MiB) | record for the generation (MiB) | plain step (ms) | recording step | edit step |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.sizes.split(","):
        size, steps = spec.split(":")
        width, height = map(int, size.split("x"))
        x = torch.randn((2, 4, height // 8, width // 8), generator=g).to(device, dtype)
        t = torch.full((2,), 500.0, device=device)
        fingerprint = Fingerprint(0, 0, 0.0, width, height, "Euler", "", int(steps), "bench")

        def unet_call() -> None:
            with torch.no_grad():
                unet(x, t, context=ctx)

        def through(run_for):
            """One UNet call with the attn1 hooks of a fresh run (``run_for()``): what the WebUI's call does."""
            def call() -> ConsistentRun:
                run = run_for()
                hooks = a1111.SelfAttentionHooks(run.self_attention_source, is_up_block)
                hooks.install(p)
                try:
                    run.sampler_input(x[:1].clone())
                    unet_call()
                finally:
                    hooks.remove()
                return run

            return call

        new_record = lambda: Record(fingerprint, frozenset(), 2**62)  # noqa: E731
        recorded = through(lambda: ConsistentRun("bench", new_record()))()
        keep = torch.ones((height // 8, width // 8), dtype=torch.float64)
        per_step = recorded.current.size_bytes()
        plain_ms = median_ms(unet_call, args.repeats, sync)
        record_ms = median_ms(through(lambda: ConsistentRun("bench", new_record())), args.repeats, sync)
        edit_ms = median_ms(through(lambda: ConsistentRun("bench", new_record(), recorded.current, keep)), args.repeats, sync)
        mib = 2 ** 20
        print(f"| {width}x{height} | {steps} | {per_step / mib:.1f} | {per_step * int(steps) / mib:.0f} | {plain_ms:.0f} | "
              f"{record_ms / plain_ms:.2f}x | {edit_ms / plain_ms:.2f}x |")


if __name__ == "__main__":
    main()
