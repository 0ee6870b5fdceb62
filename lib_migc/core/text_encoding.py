"""Instance descriptions through the WebUI's own text conditioning, plus CLIP's pooled embedding.

Both hosts expose ``sd_model.get_learned_conditioning(list_of_prompts)`` for SD1.x, which honours
emphasis, textual inversion, CLIP skip and long prompts exactly as for the main prompt. Neither returns
the pooled vector MIGC's Enhancement Attention needs (CLIP's final-normed hidden state at the first EOS),
so the CLIP text model's last hidden state is captured *during that same call* (textual-inversion
vectors are in it) and read at each phrase's first EOS of its first 77-token chunk.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import MigcError
from .patching import ForwardPatches


def _clip_text_model(sd_model: Any) -> tuple[Any, int]:
    """(CLIP text transformer, EOS token id) of an A1111 or Forge SD1.x model."""
    engine = getattr(sd_model, "text_processing_engine", None)  # Forge
    if engine is not None:
        return engine.text_encoder.transformer, int(engine.id_end)
    embedder = sd_model.cond_stage_model  # A1111: FrozenCLIPEmbedderWithCustomWords
    transformer = embedder.wrapped.transformer
    eos = getattr(embedder, "id_end", None)
    return transformer, int(eos if eos is not None else transformer.config.eos_token_id)


@torch.no_grad()
def encode_phrases(sd_model: Any, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts (N, 77*k, 768) and pooled embeddings (N, 768) of ``phrases``."""
    transformer, eos = _clip_text_model(sd_model)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    previous = transformer.forward

    def capture(*args: Any, **kwargs: Any) -> Any:
        out = previous(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        captured.append((ids, out.last_hidden_state))
        return out

    with ForwardPatches() as patches:
        patches.install(transformer, capture)
        contexts = sd_model.get_learned_conditioning(list(phrases))
    if not captured or captured[0][0] is None:
        raise MigcError("MIGC: could not read the text encoder's pooled output for the instance descriptions.")
    ids, hidden = captured[0]
    ids = ids.to(hidden.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    is_eos = (ids == eos) & (positions > 0)
    last = torch.full_like(ids[:, 0], ids.shape[1] - 1)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), last)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]
    return contexts, pooled.clone()


@torch.no_grad()
def encode_conditioning(sd_model: Any, texts: Sequence[str], width: int | None = None,
                        height: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(contexts (N, 77*k, D), pooled vectors (N, V) or None) through the model's own text conditioning.

    Family-agnostic, for the training-free modes: SD1.x (768), SD2.x (1024) and SDXL (2048, both text
    encoders, plus the 2816-d vector of pooled text and size embeddings that SDXL's UNet takes as ``y``).
    The size embedding is built for the image's ``width`` x ``height`` like the WebUI's own prompts.
    """
    batch: Any = list(texts)
    if width and height:
        try:
            from modules.prompt_parser import SdConditioning

            batch = SdConditioning(batch, width=width, height=height)
        except (ImportError, TypeError):
            pass
    cond = sd_model.get_learned_conditioning(batch)
    if isinstance(cond, dict):
        return cond["crossattn"], cond.get("vector")
    return cond, None


def own_global_context(params: Any, encode: Any) -> Any:
    """The layout's own global prompt, encoded with ``encode(texts)``, when it replaces the main prompt
    (MIGC's global branch, the naive mode, MultiDiffusion's background region); None when it does not."""
    if params.use_main_prompt:
        return None
    if not params.layout.global_prompt:
        raise MigcError("MIGC: 'Use main prompt as global prompt' is off but the global prompt is empty; "
                        "type a global prompt or turn the option back on.")
    return encode([params.layout.global_prompt])
