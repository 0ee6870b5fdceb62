"""The real CLIP BPE tokenizer (the one A1111 and Forge run for SD1.x), built offline.

``clip-anytorch`` (installed with --no-deps) ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``; the
Hugging Face ``CLIPTokenizer`` vocabulary is derived from it the same way OpenAI's tokenizer derives
its own (byte symbols, their word-final forms, then one entry per merge, then BOS/EOS).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

import pytest

MERGES = 49152 - 256 - 2


def bpe_vocab_file() -> str | None:
    spec = importlib.util.find_spec("clip")  # locates the package without importing it (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.exists(path) else None


def clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    path = bpe_vocab_file()
    if path is None:
        pytest.skip("clip-anytorch (the CLIP BPE vocabulary) is not installed")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1:MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({token: i for i, token in enumerate(vocab)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="<|endoftext|>")
