"""Tiled VAE decode and encode whose image is the untiled one, for canvases the VAE cannot hold at once.

Why: MultiDiffusion's windows bound the UNet's memory by the window, but the WebUI then decodes the whole
canvas in one VAE call, whose memory grows with the canvas (``bench/bench_md_memory.py``: the decode of
a 512x4608 panorama is what runs out of memory, not the windowed UNet). Plain tiles would show seams for
two reasons: every GroupNorm normalises with the statistics of the *whole* image, and every convolution
sees its neighbours. So:

* the part that runs at latent resolution (the decoder's ``conv_in`` and middle block, the encoder's
  middle block and output) runs on the whole latent: it is small, and its attention stays global
  (scaled-dot-product attention in query chunks, so its memory is linear in the canvas);
* the full-resolution path (the decoder's up blocks, the encoder's down blocks) runs per tile, each
  tile padded by more than that path's receptive field, all tiles in lockstep: at each GroupNorm every
  tile reports the per-group mean and variance of its own core (each pixel counted once), the
  whole image's statistics are combined from them and every tile normalises with those.

The result equals the untiled decode up to float rounding (``tests/test_tiled_vae.py``). Both hosts'
SD VAEs (ldm's and sgm's ``Encoder``/``Decoder``, Forge's ``backend.nn.vae``) share this structure;
a module that does not is run untiled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .patching import ForwardPatches

log = logging.getLogger("migc")

#: Latent pixels per tile side (512 image pixels) and the overlap on each side. The decoder's up path
#: sees about 13 latent pixels around a pixel and the encoder's down path about 10 (3x3 convolutions at
#: each level), so 16 makes every core exact.
TILE_LATENT, PAD_LATENT = 64, 16
#: "Auto" tiles images with more pixels than this (1024x1024: about 5 GB for an untiled fp32 decode).
AUTO_ABOVE_PIXELS = 1024 * 1024
#: Scores per attention query chunk (2^26 floats: 256 MB in float32).
ATTENTION_SCORES = 1 << 26

GroupStats = tuple[torch.Tensor, torch.Tensor, int]  # per (batch, group) mean and variance, and the pixel count


@dataclass(frozen=True)
class Tile:
    """A tile in latent pixels: ``core`` (h0, h1, w0, w1) is what it contributes, ``span`` the core grown by
    the overlap and clipped to the canvas, which is what it computes."""

    core: tuple[int, int, int, int]
    span: tuple[int, int, int, int]

    def core_in_span(self, scale: int) -> tuple[slice, slice]:
        """The core's rows and columns inside a tensor that covers the span at ``scale`` pixels per latent pixel."""
        h0, h1, w0, w1 = self.core
        return (slice((h0 - self.span[0]) * scale, (h1 - self.span[0]) * scale),
                slice((w0 - self.span[2]) * scale, (w1 - self.span[2]) * scale))

    def of(self, x: torch.Tensor, scale: int, part: str = "span") -> torch.Tensor:
        """The span (or core) of a whole-canvas tensor at ``scale``."""
        h0, h1, w0, w1 = self.span if part == "span" else self.core
        return x[..., h0 * scale:h1 * scale, w0 * scale:w1 * scale]


def _cuts(size: int, tile: int) -> list[int]:
    count = max(1, -(-size // tile))
    return [round(i * size / count) for i in range(count + 1)]


def plan_tiles(height: int, width: int, tile: int = TILE_LATENT, pad: int = PAD_LATENT) -> list[Tile]:
    """Cores of at most ``tile`` latent pixels, evenly split, each grown by ``pad`` within the canvas."""
    rows, cols = _cuts(height, tile), _cuts(width, tile)
    tiles = []
    for h0, h1 in zip(rows, rows[1:]):
        for w0, w1 in zip(cols, cols[1:]):
            span = (max(0, h0 - pad), min(height, h1 + pad), max(0, w0 - pad), min(width, w1 + pad))
            tiles.append(Tile((h0, h1, w0, w1), span))
    return tiles


# ------------------------------------------------------------------------------------ GroupNorm in lockstep
TileProgram = Generator[GroupStats, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def _core_stats(x: torch.Tensor, groups: int, tile: Tile, scale: int) -> GroupStats:
    rows, cols = tile.core_in_span(scale)
    core = x[..., rows, cols].float()
    var, mean = torch.var_mean(core.reshape(core.shape[0], groups, -1), dim=-1, unbiased=False)
    return mean, var, core[0, 0].numel() * (core.shape[1] // groups)


def combine_stats(stats: Sequence[GroupStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image's per-group mean and (biased) variance from each tile's core: the parallel formula
    Σn(v + (m - mean)²)/N in float64, exact however the image is cut."""
    total = sum(count for _, _, count in stats)
    mean = sum(m.double() * count for m, _, count in stats) / total
    var = sum((v.double() + (m.double() - mean) ** 2) * count for m, v, count in stats) / total
    return mean, var


def _park(x: torch.Tensor) -> torch.Tensor:
    """A tensor a tile holds while the other tiles run, moved off the GPU: so the GPU holds one tile's
    work at a time and host memory the rest (on the CPU it stays where it is)."""
    return x.cpu() if x.is_cuda else x


# The tile programs pass their current tensor in a one-element list (``box``) rather than as an argument,
# so that no caller's frame keeps a GPU tensor alive while the tile waits for the others.
Box = list


def _group_norm(norm: nn.GroupNorm, box: Box, tile: Tile, scale: int) -> TileProgram:
    """GroupNorm of a tile with the whole image's statistics (asked for by yielding the tile's own)."""
    x = box.pop()
    stats, device = _core_stats(x, norm.num_groups, tile, scale), x.device
    x = _park(x)
    mean, var = yield stats
    x = x.to(device)
    grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
    rstd = (var + norm.eps).rsqrt().float()
    out = ((grouped - mean.float()[..., None]) * rstd[..., None]).reshape(x.shape)
    if norm.affine:
        out = out * norm.weight.float().to(device)[:, None, None] + norm.bias.float().to(device)[:, None, None]
    box.append(out.to(x.dtype))


def _resnet(block: nn.Module, box: Box, tile: Tile) -> TileProgram:
    """ldm's ResnetBlock (no time embedding, dropout off in eval) with its norms in lockstep."""
    scale, device = _scale(box[0], tile), box[0].device
    residual = _park(box[0])
    yield from _group_norm(block.norm1, box, tile, scale)
    box.append(block.conv1(F.silu(box.pop())))
    yield from _group_norm(block.norm2, box, tile, scale)
    h = block.conv2(F.silu(box.pop()))
    x = residual.to(device)
    del residual
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if getattr(block, "use_conv_shortcut", False) else block.nin_shortcut(x)
    box.append(x + h)


def _scale(x: torch.Tensor, tile: Tile) -> int:
    return x.shape[-1] // (tile.span[3] - tile.span[2])


def _up_path(decoder: nn.Module, box: Box, tile: Tile) -> TileProgram:
    """The decoder after its middle block, on one tile (latent span in, image span out)."""
    for level in reversed(range(decoder.num_resolutions)):
        for block in decoder.up[level].block:
            yield from _resnet(block, box, tile)
        if level != 0:
            box.append(decoder.up[level].upsample(box.pop()))
    yield from _group_norm(decoder.norm_out, box, tile, _scale(box[0], tile))
    h = decoder.conv_out(F.silu(box.pop()))
    return torch.tanh(h) if getattr(decoder, "tanh_out", False) else h


def _down_path(encoder: nn.Module, box: Box, tile: Tile) -> TileProgram:
    """The encoder before its middle block, on one tile (image span in, latent span out)."""
    box.append(encoder.conv_in(box.pop()))
    for level in range(encoder.num_resolutions):
        for block in encoder.down[level].block:
            yield from _resnet(block, box, tile)
        if level != encoder.num_resolutions - 1:
            box.append(encoder.down[level].downsample(box.pop()))
    return box.pop()


def run_in_lockstep(programs: list[TileProgram]) -> list[torch.Tensor]:
    """Run the tiles' programs together, answering each GroupNorm with the statistics of all tiles."""
    requests = [next(program) for program in programs]
    while True:
        answer = combine_stats(requests)
        results, requests = [], []
        for program in programs:
            try:
                requests.append(program.send(answer))
            except StopIteration as done:
                results.append(done.value)
        if results:
            if requests:
                raise RuntimeError("tiles of one VAE ran different programs")
            return results


def _stitch(tiles: Sequence[Tile], outputs: Sequence[torch.Tensor], shape: tuple[int, ...], scale: int) -> torch.Tensor:
    out = outputs[0].new_empty(shape)
    for tile, part in zip(tiles, outputs):
        rows, cols = tile.core_in_span(scale)
        tile.of(out, scale, "core").copy_(part[..., rows, cols])
    return out


# ------------------------------------------------------------------------------------ whole-latent parts
def global_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The VAE's single-head spatial self-attention block over the whole latent, queries in chunks so
    the scores never exceed :data:`ATTENTION_SCORES` per chunk."""
    h = block.norm(x)
    b, c, height, width = h.shape
    q, k, v = (layer(h).reshape(b, 1, c, height * width).transpose(-1, -2) for layer in (block.q, block.k, block.v))
    step = max(1, ATTENTION_SCORES // (b * height * width))
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v) for i in range(0, q.shape[2], step)], dim=2)
    return x + block.proj_out(out.transpose(-1, -2).reshape(b, c, height, width))


def _middle(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    h = module.mid.block_1(h, None)
    h = global_attention(module.mid.attn_1, h)
    return module.mid.block_2(h, None)


def decode_tiled(decoder: nn.Module, z: torch.Tensor, tile: int = TILE_LATENT, pad: int = PAD_LATENT) -> torch.Tensor:
    """``decoder(z)`` (ldm's Decoder, z after ``post_quant_conv``) with the up path in tiles."""
    h = _middle(decoder, decoder.conv_in(z))
    tiles = plan_tiles(*h.shape[-2:], tile, pad)
    outputs = run_in_lockstep([_up_path(decoder, [t.of(h, 1)], t) for t in tiles])
    scale = _scale(outputs[0], tiles[0])
    return _stitch(tiles, outputs, (*outputs[0].shape[:2], h.shape[-2] * scale, h.shape[-1] * scale), scale)


def encode_tiled(encoder: nn.Module, x: torch.Tensor, tile: int = TILE_LATENT, pad: int = PAD_LATENT) -> torch.Tensor:
    """``encoder(x)`` (ldm's Encoder, before ``quant_conv``) with the down path in tiles."""
    factor = 2 ** (encoder.num_resolutions - 1)
    height, width = x.shape[-2] // factor, x.shape[-1] // factor
    tiles = plan_tiles(height, width, tile, pad)
    outputs = run_in_lockstep([_down_path(encoder, [t.of(x, factor)], t) for t in tiles])
    h = _stitch(tiles, outputs, (*outputs[0].shape[:2], height, width), 1)
    h = encoder.norm_out(_middle(encoder, h))
    return encoder.conv_out(F.silu(h))


# ------------------------------------------------------------------------------------ which modules, when
def _has(module: Any, *names: str) -> bool:
    return all(hasattr(module, name) for name in names)


def tileable(module: nn.Module) -> bool:
    """Whether ``module`` is an ldm-structured Encoder or Decoder without attention outside its middle."""
    levels = getattr(module, "up", None) if hasattr(module, "up") else getattr(module, "down", None)
    if levels is None or not _has(module, "conv_in", "mid", "norm_out", "conv_out", "num_resolutions"):
        return False
    if not _has(module.mid, "block_1", "attn_1", "block_2") or not _has(module.mid.attn_1, "norm", "q", "k", "v", "proj_out"):
        return False
    return all(len(getattr(level, "attn", ())) == 0 and _has(level, "block") for level in levels)


def wants_tiles(policy: str, pixels: int) -> bool:
    """``policy`` is the setting: "Always", "Never" or "Auto" (above :data:`AUTO_ABOVE_PIXELS` image pixels)."""
    if policy == "Always":
        return True
    return policy == "Auto" and pixels > AUTO_ABOVE_PIXELS


def tiled_forward(module: nn.Module, previous: Callable[..., torch.Tensor], policy: str,
                  tile: int = TILE_LATENT) -> Callable[..., torch.Tensor]:
    """A ``forward`` for the VAE's decoder or encoder that tiles when ``policy`` asks for this image size
    and else calls ``previous``."""
    decoder = hasattr(module, "up")
    pixel_factor = 2 ** (module.num_resolutions - 1)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pixels = x.shape[-2] * x.shape[-1] * (pixel_factor ** 2 if decoder else 1)
        if args or kwargs or not wants_tiles(policy, pixels):
            return previous(x, *args, **kwargs)
        try:
            with torch.no_grad():
                return decode_tiled(module, x, tile) if decoder else encode_tiled(module, x, tile)
        except Exception:  # noqa: BLE001 - a VAE we misread must not cost the user the image
            log.exception("MIGC: the tiled VAE failed; running the VAE untiled")
            return previous(x, *args, **kwargs)

    return forward


def install(vae: nn.Module, policy: str) -> ForwardPatches:
    """Tile ``vae``'s decoder and encoder for one job (``remove()`` puts back what was there). A part another
    extension has already replaced (Tiled VAE, for one) is left to it; a part of another structure too."""
    patches = ForwardPatches()
    if policy == "Never":
        return patches
    for part in (getattr(vae, "decoder", None), getattr(vae, "encoder", None)):
        if part is None or not tileable(part):
            continue
        if "forward" in part.__dict__:
            log.info("MIGC: the VAE's %s is replaced by another extension; it tiles, not MIGC", type(part).__name__)
            continue
        patches.install(part, tiled_forward(part, part.forward, policy))
    return patches
