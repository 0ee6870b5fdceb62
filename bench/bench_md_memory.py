"""Where a windowed MultiDiffusion job's memory peaks: the UNet's windows or the VAE at the full canvas.

    python bench/bench_md_memory.py [--panorama 512x4608] [--unet-canvas 512x768] [--upscale 2048x2048]
                                    [--chunk 4] [--tiled-only] [--device cpu|cuda] [--threads N]

Measures, with the real ldm modules (random weights, SD1 configs, A1111's 'sdp' attention in the UNet
and the VAE), the peak memory of: one windowed denoiser step (512-px windows, 64-px stride, ``--chunk``
UNet rows per call, as the mode runs it; its peak is set by the chunk, not the canvas, so a
``--unet-canvas`` of a few windows stands for the panorama and keeps the CPU run short), the VAE decode
of the ``--panorama`` canvas, and the VAE encode of a ``--upscale`` img2img input, each tiled
(lib_migc/core/tiled_vae.py, what the mode installs) and untiled (CUDA allocator peak; CPU: peak of
live tensor storages). Prints each peak and its time. Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_multidiffusion import SIGMA, full_size_setup, k_denoiser, panorama_step, peak_mib  # noqa: E402
from lib_migc.core import tiled_vae  # noqa: E402

#: SD1's first-stage config (v1-inference.yaml ddconfig).
VAE_CONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4),
                  num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def use_sdp_vae_attention() -> None:
    """ldm's VAE AttnBlock through scaled_dot_product_attention, as A1111's 'sdp' optimisation does."""
    import torch.nn.functional as F
    from ldm.modules.diffusionmodules.model import AttnBlock

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (layer(h).flatten(2).transpose(1, 2)[:, None] for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(out)

    AttnBlock.forward = forward


def timed_peak(fn, cuda: bool) -> tuple[float, float]:
    start = time.perf_counter()
    peak = peak_mib(fn, cuda)
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panorama", default="512x4608", help="HxW of the txt2img canvas")
    parser.add_argument("--unet-canvas", default="512x768", help="HxW of the canvas the UNet step runs on")
    parser.add_argument("--upscale", default="2048x2048", help="HxW of the img2img canvas")
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--tiled-only", action="store_true", help="skip the untiled VAE (which may not fit)")
    args, device, dtype, sync, unet = full_size_setup(parser)
    cuda = device.type == "cuda"
    use_sdp_vae_attention()
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(0)
    decoder = Decoder(**VAE_CONFIG).to(device, dtype).eval()
    encoder = Encoder(**VAE_CONFIG).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    height, width = map(int, args.unet_canvas.split("x"))
    x = torch.randn((1, 4, height // 8, width // 8), generator=g).to(device, dtype)
    pano_h, pano_w = map(int, args.panorama.split("x"))
    z = torch.randn((1, 4, pano_h // 8, pano_w // 8), generator=g).to(device, dtype)
    ctx = torch.randn((2, 77, 768), generator=g).to(device, dtype)
    count, step = panorama_step(k_denoiser(unet, device, SIGMA), x, ctx, args.chunk)
    up_h, up_w = map(int, args.upscale.split("x"))
    image = torch.rand((1, 3, up_h, up_w), generator=g).to(device, dtype) * 2 - 1
    cases = [
        (f"UNet step, {args.unet_canvas} canvas, {count} windows, {args.chunk} rows per call", step),
        (f"VAE decode, {args.panorama}, tiled ({tiled_vae.TILE_LATENT * 8}-px tiles)", lambda: tiled_vae.decode_tiled(decoder, z)),
        (f"VAE encode, {args.upscale} (img2img), tiled", lambda: tiled_vae.encode_tiled(encoder, image)),
    ]
    if not args.tiled_only:
        cases += [(f"VAE decode, {args.panorama}, untiled", lambda: decoder(z)),
                  (f"VAE encode, {args.upscale} (img2img), untiled", lambda: encoder(image))]
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}")
    print("| what | peak MiB | seconds |")
    print("|---|---|---|")
    with torch.no_grad():
        for label, fn in cases:
            peak, seconds = timed_peak(fn, cuda)
            print(f"| {label} | {peak:.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
