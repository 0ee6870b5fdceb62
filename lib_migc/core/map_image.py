"""The instance-map image: the result dimmed, each instance's colour where it dominated, and a legend.

"Dominated" is read per pixel from the mean shares (:mod:`lib_migc.core.instance_maps`): the labelled
region with the largest share wins the pixel when that share is also larger than what is left for the rest
(background, global prompt, template, model A); the colour's strength follows the share, so a pixel an
instance barely won looks faint. The legend, in a band under the image so nothing of it is covered, names
each colour, how much of the image that region won and where the shares came from.
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .draw import instance_colour

DIM = 0.35  # the result's brightness under the colours
MAX_ALPHA = 0.8  # a share of 1 paints this much colour over the dimmed result
LINE = 16  # legend line height in px
CHAR = 6  # PIL's default font: px per character, to wrap the legend to the image's width


def winners(shares: torch.Tensor, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of a ``width`` x ``height`` image: the index of the winning region (-1: the rest) and its share."""
    if shares.shape[0] == 0:
        return np.full((height, width), -1), np.zeros((height, width))
    up = F.interpolate(shares.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    rest = (1.0 - up.sum(0)).clamp(min=0.0)
    best, index = up.max(0)
    index = torch.where(best > rest, index, torch.full_like(index, -1))
    return index.numpy(), best.numpy()


def render_map(image: Image.Image, shares: torch.Tensor | None, labels: Sequence[str], source: str) -> Image.Image:
    """The map image for one generated ``image`` from its mean ``shares`` (K, h, w) (None: nothing recorded)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    out = rgb * DIM
    won = [0.0] * len(labels)
    if shares is not None:
        index, share = winners(shares[:len(labels)], width, height)
        for i in range(len(labels)):
            where = index == i
            won[i] = float(where.mean())
            alpha = (MAX_ALPHA * share * where)[..., None]
            out = out * (1 - alpha) + np.asarray(instance_colour(i), dtype=np.float32) * alpha
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    columns = max(16, (width - 30) // CHAR)
    lines: list[tuple[str, int | None, bool]] = []  # (text, instance whose swatch starts the line, indented)
    for i, label in enumerate(labels):
        for n, text in enumerate(textwrap.wrap(f"{i + 1}: {label[:80]} ({won[i]:.0%} of the image)", columns)):
            lines.append((text, i if n == 0 else None, True))
    note = source if shares is not None else f"{source}: nothing was recorded (no shaded step)"
    lines += [(text, None, False) for text in textwrap.wrap(note, columns + 4)]
    canvas = Image.new("RGB", (width, height + LINE * len(lines) + 8), (24, 24, 24))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, swatch, indented) in enumerate(lines):
        y = height + 4 + row * LINE
        if swatch is not None:
            draw.rectangle([6, y + 2, 18, y + LINE - 3], fill=instance_colour(swatch))
        draw.text((24 if indented else 6, y + 1), text, fill=(235, 235, 235))
    return canvas
