"""The optional extra output image: the layout's boxes drawn over the generated image."""
from __future__ import annotations

from PIL import Image, ImageDraw

from .layout import Layout

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0),
]


def instance_colour(index: int) -> tuple[int, int, int]:
    """The colour of box ``index``, the same as the box editor's."""
    return PALETTE[index % len(PALETTE)]


def draw_layout(image: Image.Image, layout: Layout) -> Image.Image:
    """A copy of ``image`` with every box outlined and labelled with its number and description."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(2, round(min(width, height) / 170))
    for i, inst in enumerate(layout.instances):
        x0, y0, x1, y1 = inst.box
        box = [x0 * width, y0 * height, x1 * width - 1, y1 * height - 1]
        colour = instance_colour(i)
        draw.rectangle(box, outline=colour, width=line)
        label = f"{i + 1}: {inst.description[:40]}"
        text_box = draw.textbbox((box[0] + line + 2, box[1] + line + 1), label)
        draw.rectangle(text_box, fill=colour)
        draw.text((box[0] + line + 2, box[1] + line + 1), label, fill=(0, 0, 0))
    return out
