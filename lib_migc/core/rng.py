"""Building a model must not move the user's random state.

``nn.Module`` constructors draw initial values from the global RNG before the weights are loaded over
them. The WebUIs draw from that same RNG (both sample the VAE posterior with it when encoding an img2img
image), so loading the MIGC weights or model B would otherwise make the next image depend on whether
they were already cached."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Run the block with the CPU's (and every CUDA device's) global RNG state restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
