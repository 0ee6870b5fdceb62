"""The one timing helper the benches share."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call (``sync`` waits for the device)."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_setup(args: Any) -> tuple[Any, Any, Callable[[], None]]:
    """(device, dtype, sync) from ``--device``/``--threads``: fp16 on CUDA, fp32 on the CPU."""
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    return device, (torch.float16 if cuda else torch.float32), (torch.cuda.synchronize if cuda else (lambda: None))
