"""MultiDiffusion region fusion inside the CFG denoiser: the host-neutral part of both adapters.

Why here and not after a sampler step: with binary masks and the same weights for the cond and uncond
rows, averaging the per-region denoiser outputs (x0 or eps) per pixel is exactly the official
method's fused DDIM step, bootstrapping included (docs/modes/multidiffusion.md §3.1), and it works
for every single-evaluation sampler. Each CFG row the sampler hands the model becomes R = 1 + N region
rows (background = the row's own prompt, boxes = their descriptions), all through the UNet in chunks
of at most ``chunk_rows`` rows, then fused back into one row. :meth:`RegionRuntime.denoise_rows` is the
mode's function at the hosts' model-call hook point (:class:`~lib_migc.core.hook_points.ModelRows`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.errors import MigcError
from ...core.hook_points import ModelCall, ModelRows
from ...core.layout import Layout
from ...core.masks import LATENT_FACTOR, fitted_mask
from .method import bootstrap_inputs, bootstrap_inputs_sigma, divide_covered, pixel_boxes, region_masks
from .windows import Window, add_into, crop, whole_canvas, window_vectors

#: Candidate background colours for bootstrapping (the official code draws one per bootstrapping step).
COLOUR_POOL = 20



@dataclass
class RegionPrompts:
    """The boxes' prompts, encoded once per job.

    cond: (N, L, D) descriptions; cond_vectors: (N, V) SDXL's ``y`` or None.
    uncond / uncond_vectors: per-region negatives in the same shapes, or None when every region shares
    the row's own negative (then an uncond row runs once instead of R times after bootstrapping).
    """

    cond: torch.Tensor
    cond_vectors: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    uncond_vectors: torch.Tensor | None = None
    background: torch.Tensor | None = None  # (1, L, D): the layout's own global prompt instead of the row's
    background_vector: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.cond.shape[0])


@dataclass
class Bootstrap:
    """Constant-colour backgrounds behind each box for the first ``steps`` sampler steps.

    colours: (K, C) latent of each candidate colour (spatially constant); noise0: (B, C, h, w) the
    unit initial noise of each image, which (not fresh noise) noises the background to the current
    level; seeds: one per image, so the colour drawn per step and region is reproducible.
    """

    colours: torch.Tensor
    noise0: torch.Tensor
    seeds: Sequence[int]
    steps: int

    def __post_init__(self) -> None:
        self._draws: dict[tuple[int, int], torch.Tensor] = {}

    def active(self, step: int) -> bool:
        return step < self.steps

    def backgrounds(self, image: int, step: int, regions: int, windows: int = 1) -> torch.Tensor:
        """(windows, regions, C) colours for ``image`` at ``step``, one per window and box as the official
        code draws them: drawn once per step, shared by its cond and uncond rows and by every model call of
        that step (the official x̃ is built once per step). One window draws what versions before windows drew."""
        key = (image, step)
        if key not in self._draws:
            g = torch.Generator().manual_seed(int(self.seeds[min(image, len(self.seeds) - 1)]) * 1009 + step)
            index = torch.randint(len(self.colours), (windows, regions), generator=g)
            self._draws[key] = self.colours[index]
        return self._draws[key]


def lcm_tile(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bring contexts of 77*k tokens to one length by repeating each whole token sequence; attention
    over a sequence repeated m times equals attention over it once, so batching stays exact."""
    lengths = {c.shape[-2] for c in contexts}
    if len(lengths) == 1:
        return list(contexts)
    target = math.lcm(*lengths)
    return [c.repeat(*([1] * (c.dim() - 2)), target // c.shape[-2], 1) for c in contexts]


def layout_region_masks(layout: Layout, width: int, height: int) -> torch.Tensor:
    """(R, 1, height/8, width/8) binary masks, background first, by the official rule: a latent cell is
    inside a region iff the image pixel at its top-left corner is (boxes: pixel box [x0, x1) -> latent
    columns ceil(x0/8) .. ceil(x1/8) - 1; mask instances: thresholded at 0.5, then that pixel)."""
    boxes = region_masks(pixel_boxes(layout.boxes, height, width), height, width)[1:]
    masks = []
    for index, inst in enumerate(layout.instances):
        if inst.mask is None:
            masks.append(boxes[index])
            continue
        corners = fitted_mask(inst.mask, height, width)[::LATENT_FACTOR, ::LATENT_FACTOR]
        masks.append((corners >= 0.5).float()[None, :height // LATENT_FACTOR, :width // LATENT_FACTOR])
    fg = torch.stack(masks) if masks else torch.zeros((0, 1, height // LATENT_FACTOR, width // LATENT_FACTOR))
    background = (1.0 - fg.sum(0, keepdim=True)).clamp(min=0.0)
    return torch.cat([background, fg])


class RegionRuntime:
    """Per-pass state: latent masks (R, 1, h, w) with the background first, the prompts, bootstrapping.

    space: "k" when the model input is k-diffusion's x (levels are sigmas), "vp" when it is the
    variance-preserving latent of the timesteps samplers (levels are integer timesteps, ``alphas_cumprod``
    needed).
    """

    def __init__(
        self,
        masks: torch.Tensor,
        prompts: RegionPrompts,
        bootstrap: Bootstrap | None = None,
        space: str = "k",
        alphas_cumprod: torch.Tensor | None = None,
        chunk_rows: int = 0,
        windows: Sequence[Window] | None = None,
    ) -> None:
        if masks.shape[0] != prompts.count + 1:
            raise ValueError(f"{masks.shape[0]} masks for {prompts.count} regions plus the background")
        if space == "vp" and bootstrap is not None and alphas_cumprod is None:
            raise ValueError("bootstrapping in VP space needs alphas_cumprod")
        self.masks, self.prompts, self.bootstrap = masks, prompts, bootstrap
        self.space, self.alphas_cumprod, self.chunk_rows = space, alphas_cumprod, int(chunk_rows)
        self.windows = list(windows) if windows is not None else whole_canvas(*masks.shape[-2:])
        self.calls = 0  # model calls made (for tests and the bench)

    @property
    def regions(self) -> int:
        return int(self.masks.shape[0])

    def region_shares(self) -> torch.Tensor:
        """(R, h, w), background first: each region's share of a cond row's fusion weight ``Σ m`` over every
        window, i.e. how much of each latent cell's prediction comes from that region's prompt (what
        *Show instance maps* shows for MultiDiffusion). Bootstrapping changes the inputs, not these weights."""
        masks = self.masks.float()
        total = torch.zeros_like(masks)
        for window in self.windows:
            add_into(total, window, crop(masks, window))
        return divide_covered(total, total.sum(0, keepdim=True))[:, 0]

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x``'s latent size is the one the masks were built for (else: pass through)."""
        return tuple(x.shape[-2:]) == tuple(self.masks.shape[-2:])

    # ------------------------------------------------------------------ the per-call work
    def denoise_rows(self, rows: ModelRows) -> torch.Tensor:
        """The hook point's function: the fused output of one model call. A call of another latent size
        (another extension running the model itself) passes through untouched."""
        if not self.fits(rows.x):
            return rows.plain()
        if rows.has_control:
            raise MigcError("MultiDiffusion does not support ControlNet on Forge yet: disable ControlNet or use the naive mode.")
        self.space = rows.space
        return self.denoise(rows.call, rows.x, rows.levels, rows.contexts, rows.vectors, rows.is_cond, rows.images,
                            rows.step)

    def denoise(
        self,
        call: ModelCall,
        x: torch.Tensor,
        levels: torch.Tensor,
        contexts: torch.Tensor,
        vectors: torch.Tensor | None,
        is_cond: Sequence[bool],
        images: Sequence[int],
        step: int,
    ) -> torch.Tensor:
        """The fused model output for rows ``x`` (B, C, h, w) of the given kinds and images: each row
        becomes one model row per window and region (one per window for an uncond row all regions share),
        and ``Σ m·out / Σ m`` over every window and region is divided once (official §1.4)."""
        boot = self.bootstrap if self.bootstrap is not None and self.bootstrap.active(step) else None
        masks = self.masks.to(device=x.device, dtype=x.dtype)  # once per call, not per row
        windows = self.windows
        window_masks = [crop(masks, window) for window in windows]
        plan: list[list[tuple[int, int]]] = []  # per input row, per window: (first expanded row, region rows)
        xs, lv, ctx, vec, src = [], [], [], [], []
        for r, cond in enumerate(is_cond):
            regional = cond or boot is not None or self.prompts.uncond is not None
            colours = boot.backgrounds(images[r], step, self.prompts.count, len(windows)) if boot is not None else None
            count = self.prompts.count + 1 if regional else 1
            c, e = self._region_contexts(contexts[r], None if vectors is None else vectors[r], cond, count)
            row_plan = []
            for v, window in enumerate(windows):
                xw = crop(x[r], window)
                rows = (self._region_inputs(xw, levels[r], images[r], boot, window_masks[v][1:], window,
                                            None if colours is None else colours[v]) if regional else xw[None])
                row_plan.append((len(src), count))
                xs.append(rows)
                lv.append(levels[r:r + 1].expand(count))
                ctx.extend(c)
                vec.extend(e if len(windows) == 1 else window_vectors(e, window))  # SDXL: each window as its crop
                src.extend([r] * count)
            plan.append(row_plan)
        out = self._run(call, torch.cat(xs), torch.cat(lv), lcm_tile(ctx), vec, torch.tensor(src, device=x.device))
        return torch.stack([self._fuse_windows(out, row_plan, window_masks, x.shape[1:]) for row_plan in plan])

    def _fuse_windows(self, out: torch.Tensor, row_plan: list[tuple[int, int]], window_masks: list[torch.Tensor],
                      shape: torch.Size) -> torch.Tensor:
        """One row's ``Σ m·out / Σ m`` over its windows and regions (an uncond row shared by all regions
        weighs 1 per window), 0 where nothing covers a cell; in at least float32, like :func:`fuse`."""
        work = torch.promote_types(out.dtype, torch.float32)
        total = torch.zeros(shape, device=out.device, dtype=work)
        weight = torch.zeros((1, *shape[1:]), device=out.device, dtype=work)
        for window, (start, count), wm in zip(self.windows, row_plan, window_masks):
            rows = out[start:start + count].to(work)
            m = wm.to(work) if count > 1 else torch.ones_like(rows[:, :1])
            add_into(total, window, (m * rows).sum(0))
            add_into(weight, window, m.sum(0))
        return divide_covered(total, weight).to(out.dtype)

    def _region_inputs(self, x: torch.Tensor, level: torch.Tensor, image: int, boot: Bootstrap | None,
                       fg: torch.Tensor, window: Window, colours: torch.Tensor | None) -> torch.Tensor:
        """(R, C, h, w) for one window: the row itself for the background, and for each box the row or,
        while bootstrapping, the row inside the box over a noised constant colour outside it."""
        n = self.prompts.count
        if boot is None:
            return x[None].expand(n + 1, *x.shape)
        colours = colours.to(device=x.device, dtype=x.dtype)
        noise0 = crop(boot.noise0[min(image, len(boot.noise0) - 1)], window).to(device=x.device, dtype=x.dtype)
        if self.space == "vp":
            alpha = self.alphas_cumprod.to(x.device)[level.long()].to(x.dtype)
            boxes = bootstrap_inputs(x[None], fg, colours, noise0[None], alpha)
        else:
            boxes = bootstrap_inputs_sigma(x[None], fg, colours, noise0[None], level.to(x.dtype))
        return torch.cat([x[None], boxes])

    def _region_contexts(self, own: torch.Tensor, own_vector: torch.Tensor | None, cond: bool,
                         rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if rows == 1:
            return [own], [own_vector]
        prompts = self.prompts
        table, vectors = (prompts.cond, prompts.cond_vectors) if cond else (prompts.uncond, prompts.uncond_vectors)
        background, background_vector = own, own_vector
        if cond and prompts.background is not None:
            background = prompts.background[0].to(own)
            if own_vector is not None and prompts.background_vector is not None:
                background_vector = prompts.background_vector[0].to(own_vector)
        contexts = [background] + [own if table is None else table[i].to(own) for i in range(prompts.count)]
        vecs = [background_vector] + [own_vector if vectors is None or own_vector is None else vectors[i].to(own_vector)
                                      for i in range(prompts.count)]
        return contexts, vecs

    def _run(self, call: ModelCall, x: torch.Tensor, levels: torch.Tensor, contexts: list[torch.Tensor],
             vectors: list[torch.Tensor | None], source: torch.Tensor) -> torch.Tensor:
        total = x.shape[0]
        size = self.chunk_rows if self.chunk_rows > 0 else total
        ctx = torch.stack(contexts)
        vec = torch.stack(vectors) if vectors and vectors[0] is not None else None
        outs = []
        for start in range(0, total, size):
            part = slice(start, min(start + size, total))
            outs.append(call(x[part], levels[part], ctx[part], None if vec is None else vec[part], source[part]))
            self.calls += 1
        return torch.cat(outs)
