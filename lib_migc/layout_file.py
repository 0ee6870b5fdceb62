"""Many layouts in one job: JSON Lines, or YAML in the official COCO-MIG benchmark's format.

* **JSON Lines**: one object per line, ``{"prompt": str, "negative_prompt"?: str, "seed"?: int,
  "layout": <the API's layout: {"instances": [...], "global_prompt"?}>}``; blank lines and lines starting
  with ``#`` are skipped.
* **YAML** (``bench_file/mig_bench_anno.yaml`` of the official repository, 800 layouts): the prompt is
  the key; under it, each description maps to a list of ``[x0, y0, x1, y1]`` boxes (one instance per
  box) and ``coco_id`` names the layout.

Each entry becomes :class:`Entry` (its 1-based line, or the YAML's entry number, names it in errors);
:func:`run` makes ``seeds`` images per entry through the WebUI, the MIGC panel's settings applied to the
entry's layout (the entry's instances and switch override the panel's, through the same per-job
overrides as the X/Y/Z axes).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from .core.errors import MigcError
from .core.layout import parse_layout
from .xyz_axes import OVERRIDES

JSONL_KEYS = ("prompt", "negative_prompt", "seed", "layout")


@dataclass(frozen=True)
class Entry:
    where: str  # "line 3" or "entry 3 ('a photo of …')": how errors name it
    prompt: str
    layout: dict[str, Any]
    negative_prompt: str | None = None
    seed: int | None = None
    name: str | None = None  # the COCO id, for file names
    extra: dict[str, Any] = field(default_factory=dict)


def parse(text: str) -> list[Entry]:
    """JSON Lines when the first meaningful line is a JSON object, YAML otherwise; every layout validated."""
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")), "")
    if not first:
        raise MigcError("MIGC layouts from file: the file is empty.")
    return _parse_jsonl(text) if first.startswith("{") else _parse_yaml(text)


def _checked(where: str, prompt: Any, layout: Any, **rest: Any) -> Entry:
    if not isinstance(prompt, str):
        raise MigcError(f"MIGC layouts from file, {where}: 'prompt' must be a string.")
    try:
        parse_layout(layout)
    except MigcError as exc:
        raise MigcError(f"MIGC layouts from file, {where}: {exc}") from None
    return Entry(where, prompt, layout, **rest)


def _parse_jsonl(text: str) -> list[Entry]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MigcError(f"MIGC layouts from file, {where}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
        if not isinstance(data, dict):
            raise MigcError(f"MIGC layouts from file, {where}: each line must be a JSON object with {', '.join(JSONL_KEYS)}.")
        unknown = sorted(set(data) - set(JSONL_KEYS))
        if unknown:
            raise MigcError(f"MIGC layouts from file, {where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(JSONL_KEYS)}.")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MigcError(f"MIGC layouts from file, {where}: 'seed' must be an integer.")
        entries.append(_checked(where, data.get("prompt"), data.get("layout"), negative_prompt=data.get("negative_prompt"), seed=seed))
    return entries


def _parse_yaml(text: str) -> list[Entry]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}" if mark is not None else ""
        raise MigcError(f"MIGC layouts from file: not valid YAML or JSON Lines{place}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(data, dict):
        raise MigcError("MIGC layouts from file: the YAML must map each prompt to its descriptions and boxes "
                        "(the COCO-MIG benchmark's format).")
    entries = []
    for number, (prompt, descriptions) in enumerate(data.items(), start=1):
        where = f"entry {number} ({str(prompt)[:40]!r})"
        if not isinstance(descriptions, dict):
            raise MigcError(f"MIGC layouts from file, {where}: expected descriptions mapped to lists of [x0, y0, x1, y1] boxes.")
        instances = []
        for description, boxes in descriptions.items():
            if description == "coco_id":
                continue
            if not isinstance(boxes, list) or not boxes:
                raise MigcError(f"MIGC layouts from file, {where}: {description!r} must have a list of [x0, y0, x1, y1] boxes.")
            instances += [{"description": str(description), "box": box} for box in boxes]
        coco_id = descriptions.get("coco_id")
        entries.append(_checked(where, prompt, {"instances": instances}, name=None if coco_id is None else str(coco_id)))
    return entries


def run(p: Any, text: str, seeds_per_layout: int) -> Any:
    """Generate every entry ``seeds_per_layout`` times (seeds: the entry's, else the job's seed, + 0, 1, …);
    one image per seed (×batch) with its own infotext; images of a named entry are saved with its name."""
    from modules import images as image_saving
    from modules import shared
    from modules.processing import Processed, fix_seed, process_images
    from modules.shared import state

    entries = parse(text or "")
    seeds_per_layout = max(int(seeds_per_layout or 1), 1)
    fix_seed(p)
    state.job_count = len(entries) * seeds_per_layout * max(int(getattr(p, "n_iter", 1) or 1), 1)
    images, prompts, infotexts = [], [], []
    for entry in entries:
        for offset in range(seeds_per_layout):
            if state.interrupted:
                break
            state.job = f"{entry.where}, seed {offset + 1} of {seeds_per_layout}"
            cell = copy.copy(p)
            cell.prompt = entry.prompt
            if entry.negative_prompt is not None:
                cell.negative_prompt = entry.negative_prompt
            cell.seed = (entry.seed if entry.seed is not None else int(p.seed)) + offset
            setattr(cell, OVERRIDES, {**(getattr(p, OVERRIDES, None) or {}), "enabled": True, **entry.layout})
            if entry.name is not None:
                cell.do_not_save_samples = True
            processed = process_images(cell)
            if entry.name is not None and not getattr(p, "do_not_save_samples", False):
                for image, info in zip(processed.images, processed.infotexts):
                    image_saving.save_image(image, p.outpath_samples, "", cell.seed, entry.prompt, shared.opts.samples_format,
                                            info=info, p=cell, suffix=f"-coco{entry.name}-{offset}")
            images += processed.images
            prompts += processed.all_prompts
            infotexts += processed.infotexts
    return Processed(p, images, p.seed, "", all_prompts=prompts, infotexts=infotexts)
