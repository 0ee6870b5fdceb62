"""StructureDiffusion in a WebUI job: phrases -> spans -> overlays, and the per-call attention.

Built once per sampling pass from the host's own text engine, so spans point at the exact rows of
the context the UNet gets (emphasis, BREAK, textual inversion, chunking) and phrase states come from
the same encoder (clip skip, LoRA in the text encoder). The cond rows' context ``E`` is never
re-encoded: the overlays are pasted onto the rows the hooks receive, and the value context ``Ē`` is
built from the overlays in place of ``E``'s own values once per UNet call and shared by its layers, so
the default mode adds no attention work to a step (only a few row additions). With prompt editing the prompt
changes between steps; spans are found for every schedule segment and picked by the current step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ...core.errors import MigcError
from ...core.instance_maps import InstanceMaps
from ...params import has_and_subprompts
from .attention import CHUNK_TOKENS, Overlay, _heads, mean_value_context, span_shares, structured_forward, structured_heads
from .params import StructureParams
from .spans import find_spans, phrases_from_descriptions, split_prompt, vocab_from_tokenizer

log = logging.getLogger("migc")

Segments = list[tuple[int, list[Overlay]]]  # (last step of the segment, its overlays)


@dataclass
class StructureRuntime:
    """The overlays of each image's prompt per schedule segment, and the attention that uses them."""

    mode: str
    image_segments: list[Segments]  # one entry per image of the batch
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: (first, end) context rows of each chunk's words, per overlay list (``id``); absent: all rows but BOS
    words: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    maps: InstanceMaps | None = None  # *Show instance maps*, when StructureDiffusion is the mode that fills them
    _value: tuple[tuple, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _word_rows: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def phrase_count(self) -> int:
        return max((len(o) for segs in self.image_segments for _, o in segs), default=0)

    def overlays(self, image: int, step: int) -> list[Overlay]:
        segments = self.image_segments[min(image, len(self.image_segments) - 1)] if self.image_segments else []
        for end, overlays in segments:
            if step <= end:
                return overlays
        return segments[-1][1] if segments else []

    def _groups(self, images: Sequence[int], step: int) -> list[tuple[list[int], list[Overlay]]]:
        """Rows that share the same overlays (usually all of them): one attention call per group."""
        groups: dict[int, tuple[list[int], list[Overlay]]] = {}
        for row, image in enumerate(images):
            overlays = self.overlays(image, step)
            groups.setdefault(id(overlays), ([], overlays))[0].append(row)
        return list(groups.values())

    def _per_group(self, images: Sequence[int], step: int, rows: int, run: Callable[[slice | list[int], list[Overlay]], torch.Tensor]) -> torch.Tensor:
        groups = self._groups(images, step)
        if len(groups) == 1:
            return run(slice(None), groups[0][1])
        parts = {}
        for index, overlays in groups:
            parts.update(zip(index, run(index, overlays).unbind(0)))
        return torch.stack([parts[i] for i in range(rows)])

    def value_context(self, context: torch.Tensor, overlays: list[Overlay]) -> torch.Tensor | None:
        """``Ē`` for these context rows, built once per UNet call: every layer of the call gets the same
        rows, so they are recognised by storage, shape and version (the cached tensor is held, so its
        memory cannot be reused by another tensor meanwhile). None in conjunction mode."""
        if self.mode != "default":
            return None
        version = -1 if context.is_inference() else context._version  # Forge samples in inference mode (no counter)
        key = (context.data_ptr(), tuple(context.shape), context.stride(), version, context.dtype, id(overlays))
        if self._value is None or self._value[0] != key:
            self._value = (key, context, mean_value_context(context, overlays))
        return self._value[2]

    def labels(self) -> list[str]:
        """The phrases of the first image's first prompt segment (the maps' channels)."""
        first = self.image_segments[0][0][1] if self.image_segments and self.image_segments[0] else []
        return [o.text for o in first]

    def _word_mask(self, overlays: list[Overlay], length: int, device: torch.device) -> torch.Tensor:
        key = (id(overlays), length, str(device))
        mask = self._word_rows.get(key)
        if mask is None:
            mask = torch.zeros(length, dtype=torch.bool)
            for first, end in self.words.get(id(overlays), [(c + 1, c + CHUNK_TOKENS) for c in range(0, length, CHUNK_TOKENS)]):
                mask[first:end] = True
            mask = self._word_rows[key] = mask.to(device)
        return mask

    def record_map(self, attn: nn.Module, tokens: int, query_heads: Callable[[], torch.Tensor], rows: torch.Tensor,
                   overlays: list[Overlay], images: Sequence[int]) -> None:
        """Add the spans' attention shares of these rows to the instance maps when this layer (``tokens`` query
        cells) is one they record; ``query_heads()`` gives its query heads (made only then). Rows whose phrases
        are not the legend's are left out."""
        maps = self.maps
        if (maps is None or not maps.wants(tokens) or not overlays or len(overlays) != len(maps.labels)
                or any(o.end > rows.shape[1] for o in overlays)):
            return
        shares = span_shares(attn, query_heads(), rows, overlays, self._word_mask(overlays, rows.shape[1], rows.device))
        maps.add(images, shares.reshape(*shares.shape[:2], *maps.size_of(tokens)))

    def _images_of(self, images: Sequence[int], idx: Any) -> list[int]:
        return list(images) if isinstance(idx, slice) else [images[i] for i in idx]

    def forward(self, attn: nn.Module, x: torch.Tensor, context: torch.Tensor, images: Sequence[int], step: int) -> torch.Tensor:
        """attn2 output (after to_out) of cond rows ``x`` with their prompt context ``context``."""
        def run(idx: Any, o: list[Overlay]) -> torch.Tensor:
            rows = context[idx]
            if self.maps is not None:
                self.record_map(attn, x.shape[1], lambda: _heads(attn.to_q(x[idx]), attn.heads), rows, o,
                                self._images_of(images, idx))
            return structured_forward(attn, x[idx], rows, o, self.mode, self.value_context(rows, o))

        return self._per_group(images, step, x.shape[0], run)

    def heads(self, attn: nn.Module, q: torch.Tensor, context: torch.Tensor, images: Sequence[int], step: int, heads: int) -> torch.Tensor:
        """Per-head output before to_out (MIGC's global branch)."""
        def run(idx: Any, o: list[Overlay]) -> torch.Tensor:
            rows = context[idx]
            if self.maps is not None:
                self.record_map(attn, q.shape[-2], lambda: q[idx], rows, o, self._images_of(images, idx))
            return structured_heads(attn, q[idx], rows, o, self.mode, heads, self.value_context(rows, o))

        return self._per_group(images, step, q.shape[0], run)


# ---------------------------------------------------------------------------------------- host text engine
class TextEngine:
    """The host's tokenizer and encoder for one SD model (A1111 ``cond_stage_model``, Forge
    ``text_processing_engine``): content token ids per 75-token chunk, and phrase encodings."""

    def __init__(self, sd_model: Any) -> None:
        self.sd_model = sd_model
        self.engine = getattr(sd_model, "text_processing_engine", None) or sd_model.cond_stage_model
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            tokenizer = getattr(getattr(self.engine, "wrapped", None), "tokenizer", None)
        self.vocab = vocab_from_tokenizer(tokenizer) if tokenizer is not None else None
        self.id_end = int(getattr(self.engine, "id_end", 49407))
        self._encoded: dict[str, torch.Tensor] = {}

    def chunks(self, text: str) -> list[list[int]]:
        """Content ids (no BOS/EOS/padding) of each 77-token chunk the WebUI makes of ``text``."""
        chunks, _ = self.engine.tokenize_line(text)
        out = []
        for chunk in chunks:
            tokens = list(chunk.tokens)[1:CHUNK_TOKENS - 1]
            out.append(tokens[:tokens.index(self.id_end)] if self.id_end in tokens else tokens)
        return out or [[]]

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        """(77*k, D) encoding of ``text`` alone, cached per text for the job."""
        if text not in self._encoded:
            cond = self.sd_model.get_learned_conditioning([text])
            if isinstance(cond, dict):
                cond = cond["crossattn"]
            self._encoded[text] = cond[0].detach()
        return self._encoded[text]


def prompt_segments(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The WebUI's prompt-editing schedule of ``prompt``: (last step, text) segments."""
    try:
        from modules import prompt_parser

        schedule = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
        return [(int(end), text) for end, text in schedule]  # A1111: a segment holds while step <= end
    except ImportError:
        return [(max(steps - 1, 0), prompt)]


def phrase_list(params: StructureParams, descriptions: Sequence[str], prompt: str) -> list[str]:
    if isinstance(params.phrases, tuple):
        return list(params.phrases)
    if params.phrases == "auto":
        return split_prompt(prompt)
    return phrases_from_descriptions(descriptions)


def _segment_overlays(engine: TextEngine, text: str, phrases: Sequence[str], skipped: list[tuple[str, str]],
                      words: dict[int, list[tuple[int, int]]]) -> list[Overlay]:
    chunks = engine.chunks(text)
    result = find_spans(chunks, [(phrase, engine.chunks(phrase)[0]) for phrase in phrases], engine.vocab)
    skipped.extend(result.skipped)
    overlays = []
    for match in result.matches:
        length = match.end - match.start
        own = engine.chunks(match.text)
        if len(own) != 1 or len(own[0]) != length:
            skipped.append((match.phrase, f"its own tokens ({sum(map(len, own))}) do not match its span in the prompt ({length})"))
            continue
        rows = engine.encode(match.text)[1:1 + length]
        overlays.append(Overlay(CHUNK_TOKENS * match.chunk + 1 + match.start, rows, match.phrase))
    words[id(overlays)] = [(CHUNK_TOKENS * c + 1, CHUNK_TOKENS * c + 1 + len(chunk)) for c, chunk in enumerate(chunks)]
    return overlays


def build_runtime(
    engine: TextEngine, params: StructureParams, prompts: Sequence[str], descriptions: Sequence[str], steps: int
) -> StructureRuntime:
    """Spans and phrase encodings for every image prompt of the pass (identical prompts share them).

    ``engine`` is kept for the whole job, so its phrase encodings serve every batch and the hires pass.
    """
    per_prompt: dict[str, Segments] = {}
    skipped: list[tuple[str, str]] = []
    words: dict[int, list[tuple[int, int]]] = {}
    for prompt in prompts:
        if prompt in per_prompt:
            continue
        if has_and_subprompts(prompt):
            raise MigcError("MIGC structure: StructureDiffusion does not support AND sub-prompts (composable diffusion); "
                            "remove AND from the prompt or turn StructureDiffusion off.")
        phrases = phrase_list(params, descriptions, prompt)
        per_prompt[prompt] = [(end, _segment_overlays(engine, text, phrases, skipped, words))
                              for end, text in prompt_segments(prompt, steps)]
    unique = list(dict.fromkeys(skipped))
    return StructureRuntime(params.mode, [per_prompt[p] for p in prompts], unique, words)


def skipped_message(skipped: Sequence[tuple[str, str]]) -> str | None:
    if not skipped:
        return None
    listed = "; ".join(f"'{phrase}' ({why})" for phrase, why in skipped)
    return f"StructureDiffusion skipped phrase(s): {listed}."
