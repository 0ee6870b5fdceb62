"""End to end: one CFG UNet forward of a full-size SD1 UNet with MIGC off, MIGC on, MIGC++ on, NaiveFuser
on, and StructureDiffusion (default and conjunction mode).

    python bench/bench_unet.py [--sizes 512x512,768x512,1024x1024] [--instances 1,2,4,6,8,16]
                               [--plus 1,4,6,8] [--structure 2,4] [--repeats 3] [--device cpu|cuda] [--threads N]
                               [--maps]

``--instances none`` / ``--plus none`` / ``--structure none`` leave those rows out. MIGC++ rows use its
4 weighted layers; the extra row "MIGC++ + refined shader on the other 12" is the official script's
schedule (RefinedSteps = all steps). ``--maps`` adds a twin of every case with *Show instance maps* on,
measured in the same interleaved rounds (its "ratio to the case without maps" is the collection's cost).
Compare StructureDiffusion with
``--attention sdp`` (the WebUI's usual optimisation): its cond rows run through SDPA, and ldm's own
attention is slower than that, which would flatter it.

Builds the real CompVis ldm ``UNetModel`` with the SD1.x configuration and random weights, hooks it the
way the A1111 adapter does (``hosts.a1111.Hooks`` + ``MigcSession``, cond row first, uncond row last) and
times one forward of a [cond, uncond] batch. Per case it prints the median time, the ratio to MIGC-off
measured in the same run, the extra peak memory over MIGC-off (CUDA: allocator peak; CPU: peak of live
tensor storages during the forward) and the marginal cost per instance. CPU fp32 by default; CUDA fp16
when a GPU is present. Asserts nothing: the figures go into the README's Performance section.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_migc.core.instance_maps import InstanceMaps  # noqa: E402
from lib_migc.core.layout import parse_layout  # noqa: E402
from lib_migc.core.unet_layers import MIGC_LAYERS  # noqa: E402
from lib_migc.hosts.a1111 import Hooks  # noqa: E402
from lib_migc.modes.migc.checkpoint import MigcWeights  # noqa: E402
from lib_migc.modes.migc.modules import MIGCBlock, MIGCPlusBlock  # noqa: E402
from lib_migc.modes.migc.session import MigcSession  # noqa: E402
from lib_migc.modes.migc.shading import InstanceConditioning  # noqa: E402
from lib_migc.modes.structure.attention import Overlay  # noqa: E402
from lib_migc.modes.structure.method import StructureRuntime  # noqa: E402
from lib_migc.params import MigcParams  # noqa: E402

GRID = [(x * 0.23, y * 0.23, x * 0.23 + 0.3, y * 0.23 + 0.3) for y in range(4) for x in range(4)]


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of CPU tensor storages alive at once among those created inside the mode.

    A storage counts from the op that allocates it until the last tensor (base or view) made inside
    the mode that refers to it is garbage; torch has no resettable CPU allocator peak to read instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # data_ptr -> [tensor count, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                entry = self._refs.get(key)
                if entry is None:
                    entry = self._refs[key] = [0, storage.nbytes()]
                    self.current += entry[1]
                    self.peak = max(self.peak, self.current)
                entry[0] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]


def use_sdp_attention() -> None:
    """Replace ldm's CrossAttention.forward on the class, the way A1111 applies its 'sdp' optimisation."""
    import torch.nn.functional as F
    from ldm.modules.attention import CrossAttention

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(-2))

    CrossAttention.forward = forward


def build_sd1_unet(device, dtype):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.03)
    return unet.to(device, dtype).eval().requires_grad_(False)


def cfg_inputs(width: int, height: int, device, dtype):
    """(x, t, context) of one CFG step (cond + uncond row), seeded, and the UNet's plain forward on them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, height // 8, width // 8), generator=g).to(device, dtype)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    return x, torch.full((2,), 500.0, device=device), ctx


def session_for(n: int, naive_only: bool, blocks, width: int, height: int, device, dtype, kind: str = "migc",
                naive_too: bool = False) -> MigcSession:
    layout = parse_layout([{"description": f"thing {i}", "box": list(GRID[i % len(GRID)])} for i in range(n)])
    params = MigcParams(enabled=True, layout=layout, migc_steps=0.0 if naive_only else 1.0,
                        naive_steps=1.0 if naive_only or naive_too else 0.0)
    g = torch.Generator().manual_seed(n)
    cond = InstanceConditioning.build(torch.randn((n, 77, 768), generator=g).to(device, dtype),
                                      torch.randn((n, 768), generator=g).to(device, dtype), layout.boxes)
    session = MigcSession(params, cond, None if naive_only else MigcWeights(kind, blocks))
    session.begin_pass(width, height, [1], device)
    return session


def structure_session(phrases: int, mode: str, width: int, height: int, device, dtype) -> MigcSession:
    """StructureDiffusion alone with ``phrases`` 3-token phrases at disjoint spans of a 40-token prompt."""
    g = torch.Generator().manual_seed(100 + phrases)
    overlays = [Overlay(1 + 4 * i, torch.randn((3, 768), generator=g).to(device, dtype)) for i in range(phrases)]
    params = MigcParams(enabled=False)
    session = MigcSession(params, InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), []), None)
    session.begin_pass(width, height, [1], device)
    session.structure = StructureRuntime(mode, [[(10**9, overlays)]])
    return session


def with_maps(session: MigcSession, width: int, height: int) -> MigcSession:
    """The session collecting *Show instance maps* the way a job does (MIGC's SAC/fuser shares, or, with
    StructureDiffusion alone, the spans' attention)."""
    maps = InstanceMaps(owner="structure" if session.structure is not None else "migc")
    maps.begin_pass(1, width, height)
    if session.structure is not None:
        session.structure.maps = maps
        maps.labels = [f"phrase {i}" for i in range(session.structure.phrase_count)]
    else:
        session.maps = maps
        maps.labels = list(session.params.layout.descriptions)
    return session


def cache_mib(session: MigcSession | None) -> float:
    """Tensors a session keeps for the whole generation (instance K/V, folded weights, masks)."""
    if session is None:
        return 0.0
    tensors = [t for shader in session._shaders.values() for t in shader._cache.values.values()]
    masks = session._masks._cache.values() if session._masks is not None else []
    tensors += [t for m in masks for t in (m.instances, m.background, m.__dict__.get("layout_allowed")) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x512,768x512,1024x1024", help="WIDTHxHEIGHT list")
    parser.add_argument("--instances", default="1,2,4,6,8,16")
    parser.add_argument("--plus", default="1,4,6,8", help="MIGC++ instance counts")
    parser.add_argument("--structure", default="2,4", help="StructureDiffusion phrase counts (default mode at the first)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--attention", choices=["ldm", "sdp"], default="ldm",
                        help="vanilla attention: ldm's own (materialises every score matrix; needs > 24 GB at "
                             "1024x1024) or scaled_dot_product_attention set on the class, as A1111's 'sdp' does")
    parser.add_argument("--no-memory", action="store_true", help="skip the (slow on CPU) peak-memory pass")
    parser.add_argument("--maps", action="store_true", help="add each case again with instance maps collected")
    args = parser.parse_args()
    if args.attention == "sdp":
        use_sdp_attention()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    unet = build_sd1_unet(device, dtype)
    torch.manual_seed(1)
    blocks = {name: MIGCBlock(1280).to(device, dtype).eval() for name in MIGC_LAYERS}
    plus_blocks = {name: MIGCPlusBlock(1280).to(device, dtype).eval() for name in MIGC_LAYERS}
    for block in plus_blocks.values():
        torch.nn.init.constant_(block.gamma, 0.8)
    weights_mb = sum(p.numel() for b in blocks.values() for p in b.parameters()) * 2 / 2**20
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}; MIGC weights {weights_mb:.0f} MiB in fp16")
    print("| size | case | median ms | ratio to MIGC off | extra peak MiB per step | per-generation cache MiB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        x, t, ctx = cfg_inputs(width, height, device, dtype)

        def forward():
            with torch.no_grad():
                return unet(x, t, context=ctx)

        def run_case(session: MigcSession | None, timed: bool):
            """One CFG step with ``session``'s hooks installed (none: MIGC off); (ms, peak MiB)."""
            hooks = None
            if session is not None:
                hooks = Hooks(session)
                hooks.install(SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))))
                hooks.on_cfg_step(0, 1, SimpleNamespace(text_cond=ctx[:1], text_uncond=ctx[1:], x=x))  # cond row first
            try:
                if not timed:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        forward()
                        return 0.0, (torch.cuda.max_memory_allocated() - base) / 2**20
                    with LiveTensorPeak() as tracker:
                        forward()
                    return 0.0, tracker.peak / 2**20
                sync()
                t0 = time.perf_counter()
                forward()
                sync()
                return (time.perf_counter() - t0) * 1e3, 0.0
            finally:
                if hooks is not None:
                    hooks.remove()

        counts = [] if args.instances == "none" else [int(n) for n in args.instances.split(",")]
        cases = [("MIGC off", None)] + [(f"MIGC, {n} instances", session_for(n, False, blocks, width, height, device, dtype)) for n in counts]
        if counts:
            cases.append(("NaiveFuser on every attn2, 6 instances", session_for(6, True, blocks, width, height, device, dtype)))
        plus_counts = [] if args.plus == "none" else [int(n) for n in args.plus.split(",")]
        cases += [(f"MIGC++, {n} instances", session_for(n, False, plus_blocks, width, height, device, dtype, "migc++"))
                  for n in plus_counts]
        if plus_counts:
            n = 6 if 6 in plus_counts else plus_counts[-1]
            cases.append((f"MIGC++ + refined shader on the other 12, {n} instances",
                          session_for(n, False, plus_blocks, width, height, device, dtype, "migc++", naive_too=True)))
        phrase_counts = [] if args.structure == "none" else [int(n) for n in args.structure.split(",")]
        if phrase_counts:
            cases.append((f"StructureDiffusion default, {phrase_counts[0]} phrases",
                          structure_session(phrase_counts[0], "default", width, height, device, dtype)))
        for n in phrase_counts:
            cases.append((f"StructureDiffusion conjunction, {n} phrases", structure_session(n, "conjunction", width, height, device, dtype)))
        if args.maps:
            twins = []
            for label, session in cases[1:]:
                twin = copy.copy(session)
                twin._shaders, twin.structure = {}, copy.copy(session.structure)
                twins.append((f"{label} + maps", with_maps(twin, width, height)))
            cases += twins
        for _, session in cases:
            run_case(session, timed=True)  # per-generation work: instance K/V, folded weights, masks
        peaks = {label: 0.0 if args.no_memory else run_case(session, timed=False)[1] for label, session in cases}
        caches = {label: cache_mib(session) for label, session in cases}
        times: dict[str, list[float]] = {label: [] for label, _ in cases}
        for _ in range(args.repeats):  # interleaved rounds, so drift in machine speed hits every case alike
            for label, session in cases:
                times[label].append(run_case(session, timed=True)[0])
        median = {label: statistics.median(values) for label, values in times.items()}
        off = median["MIGC off"]
        migc_rows = [(int(label.split()[1]), median[label]) for label, _ in cases if label.startswith("MIGC, ") and not label.endswith(" + maps")]
        for label, _ in cases:
            ms = median[label]
            print(f"| {size} | {label} | {ms:.0f} | {ms / off:.3f}x | {peaks[label] - peaks['MIGC off']:.0f} | {caches[label]:.0f} |")
        for label, _ in cases:
            if label.endswith(" + maps"):
                base = label[:-len(" + maps")]
                print(f"maps at {size}, {base}: {median[label] / median[base]:.4f}x the same case without maps")
        if len(migc_rows) > 1:
            print(f"\nper extra instance at {size} (least-squares slope over {len(migc_rows)} MIGC cases): "
                  f"{slope(migc_rows) / off * 100:+.2f}% of a plain step")


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of time over instance count: steadier than differences of single medians."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)

if __name__ == "__main__":
    main()
