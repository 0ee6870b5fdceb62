"""Where each StructureDiffusion phrase sits in the tokenized prompt, and where phrases come from.

Spans are found in the WebUI's own CLIP BPE token ids (after emphasis parsing, BREAK, textual
inversion and comma back-tracking), so they point at exactly the rows of the context the UNet sees.
CLIP BPE is word-local, so a phrase that appears verbatim in the prompt has the same ids there; for
the rest we normalise (punctuation, leading determiners) and finally accept a close window
(longest common subsequence). A phrase that is not verbatim is encoded from the *prompt's own*
window text, so its length always matches its span. Phrases never span two 75-token chunks.

Positions: ``(chunk, start, end)`` with ``start``/``end`` 0-based over a chunk's BPE tokens without
BOS, ``end`` exclusive (the official code's convention).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

DETERMINERS = ("a", "an", "the", "this", "that", "some")
#: Words and marks the rule-based splitter cuts a prompt at (the spec's list; whole words only).
SPLIT_WORDS = ("and", "with", "next to", "beside", "behind", "near", "on", "in", "under", "above", "holding", "wearing", "of")
STOPWORDS = frozenset(DETERMINERS + ("and", "or", "with", "of", "in", "on", "at", "to", "is", "are", "very", "its", "his", "her", "their"))
FUZZY_SHARE = 0.6
MAX_PHRASE_TOKENS = 75


class TokenVocab(Protocol):
    """What the finder needs beyond ids: each id's BPE string ("red</w>") and a window's text."""

    def strings(self, ids: Sequence[int]) -> list[str]: ...

    def text(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class PhraseMatch:
    phrase: str  # as the user (or the splitter, or an instance) gave it
    chunk: int
    start: int
    end: int
    text: str  # what to encode: the phrase when verbatim, the prompt's own window otherwise
    how: str  # "verbatim", "normalised" or "fuzzy"


@dataclass
class SpanResult:
    matches: list[PhraseMatch] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (phrase, why)


def _word(token: str) -> str:
    return token.replace("</w>", "").lower()


def _is_punctuation(token: str) -> bool:
    return not any(ch.isalnum() for ch in _word(token))


def _normalised(ids: Sequence[int], strings: list[str], drop_determiners: bool) -> list[int]:
    """Indices into ``ids`` that survive: no punctuation tokens, optionally no leading determiners."""
    keep = [i for i in range(len(ids)) if not _is_punctuation(strings[i])]
    if drop_determiners:
        while keep and _word(strings[keep[0]]) in DETERMINERS:
            keep.pop(0)
    return keep


def _occurrences(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i:i + n]) == list(needle)] if n else []


def _lcs(a: Sequence[int], b: Sequence[int]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            cur = row[j + 1]
            row[j + 1] = prev + 1 if x == y else max(row[j + 1], row[j])
            prev = cur
    return row[-1]


class _Finder:
    def __init__(self, chunks: Sequence[Sequence[int]], vocab: TokenVocab | None) -> None:
        self.chunks = [list(c) for c in chunks]
        self.vocab = vocab
        self.used: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
        self.key: tuple[int, ...] = ()  # the phrase being placed: a repeated phrase never reuses its own spans
        self.last = 0  # global position (chunk * 75 + end) of the previous match

    def _pick(self, found: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
        """Of (chunk, start, end) candidates clear of this phrase's earlier spans: the first at or after the previous match."""
        taken = self.used.setdefault(self.key, [])
        free = [f for f in found if not any(f[0] == t[0] and f[1] < t[2] and t[1] < f[2] for t in taken)]
        if not free:
            return None
        after = [f for f in free if f[0] * MAX_PHRASE_TOKENS + f[1] >= self.last]
        choice = (after or free)[0]
        taken.append(choice)
        self.last = choice[0] * MAX_PHRASE_TOKENS + choice[2]
        return choice

    def verbatim(self, ids: list[int]) -> tuple[int, int, int] | None:
        found = [(c, s, s + len(ids)) for c, chunk in enumerate(self.chunks) for s in _occurrences(chunk, ids)]
        return self._pick(found)

    def crosses_chunks(self, ids: list[int]) -> bool:
        return len(self.chunks) > 1 and bool(_occurrences([t for c in self.chunks for t in c], ids))

    def normalised(self, ids: list[int]) -> tuple[int, int, int] | None:
        phrase_strings = self.vocab.strings(ids)
        keep = _normalised(ids, phrase_strings, drop_determiners=True)
        target = [ids[i] for i in keep]
        if not target:
            return None
        found = []
        for c, chunk in enumerate(self.chunks):
            kept = _normalised(chunk, self.vocab.strings(chunk), drop_determiners=False)
            seq = [chunk[i] for i in kept]
            found += [(c, kept[s], kept[s + len(target) - 1] + 1) for s in _occurrences(seq, target)]
        return self._pick(found)

    def fuzzy(self, ids: list[int]) -> tuple[int, int, int] | None:
        strings = self.vocab.strings(ids)
        target = [ids[i] for i in _normalised(ids, strings, drop_determiners=True)]
        if not target:
            return None
        need = max(1, -(-len(target) * FUZZY_SHARE // 1))
        best: tuple[int, int, int, int] | None = None  # (-score, length, chunk, start)
        for c, chunk in enumerate(self.chunks):
            for s in range(len(chunk)):
                if chunk[s] not in target:
                    continue
                for e in range(s + 1, min(len(chunk), s + 2 * len(target)) + 1):
                    window = chunk[s:e]
                    if window[-1] not in target or target[-1] not in window:
                        continue
                    score = _lcs(target, window)
                    if score >= need:
                        cand = (-score, e - s, c, s)
                        if best is None or cand < best:
                            best = cand
        if best is None:
            return None
        _, length, c, s = best
        return self._pick([(c, s, s + length)])


def find_spans(
    prompt_chunks: Sequence[Sequence[int]],
    phrases: Sequence[tuple[str, Sequence[int]]],
    vocab: TokenVocab | None = None,
) -> SpanResult:
    """Spans of ``phrases`` (text, BPE ids without BOS/EOS) in the prompt's chunks (content ids only).

    Phrases are matched in order, left to right: a repeated phrase takes the next unused occurrence.
    Without ``vocab`` only verbatim matches are possible.
    """
    finder = _Finder(prompt_chunks, vocab)
    result = SpanResult()
    whole = len(finder.chunks) == 1 and finder.chunks[0]
    for text, raw_ids in phrases:
        ids = list(raw_ids)
        if not ids:
            result.skipped.append((text, "it has no tokens"))
            continue
        if len(ids) > MAX_PHRASE_TOKENS:
            result.skipped.append((text, f"it is longer than {MAX_PHRASE_TOKENS} tokens"))
            continue
        if whole and ids == whole:
            result.skipped.append((text, "it is the whole prompt"))
            continue
        finder.key = tuple(ids)
        span = finder.verbatim(ids)
        how = "verbatim"
        if span is None and finder.crosses_chunks(ids):
            result.skipped.append((text, "it crosses a 75-token chunk boundary of the prompt (move it or add BREAK before it)"))
            continue
        for attempt, name in ((finder.normalised, "normalised"), (finder.fuzzy, "fuzzy")):
            if span is None and vocab is not None:
                span, how = attempt(ids), name
        if span is None:
            result.skipped.append((text, "it is not in the prompt"))
            continue
        chunk, start, end = span
        window = finder.chunks[chunk][start:end]
        encode = text if how == "verbatim" else vocab.text(window)
        result.matches.append(PhraseMatch(text, chunk, start, end, encode, how))
    return result


# ---------------------------------------------------------------------------------------- phrase sources
_SYNTAX = re.compile(r"<[^>]*>|:\s*-?\d+(?:\.\d+)?|[()\[\]{}]")


def strip_prompt_syntax(text: str) -> str:
    """The words of a prompt without emphasis, weights and ``<lora:...>`` tags."""
    return re.sub(r"\s+", " ", _SYNTAX.sub(" ", text)).strip()


def split_prompt(prompt: str, split_words: Sequence[str] = SPLIT_WORDS) -> list[str]:
    """The rule-based phrase splitter (no parser, no downloads): cut at , ; BREAK AND and connector
    words, keep pieces of at least two words with at least one word that is not a stopword."""
    text = strip_prompt_syntax(prompt)
    words = "|".join(re.escape(w) for w in sorted(split_words, key=len, reverse=True))
    pieces = re.split(rf"[,;]|\bBREAK\b|\bAND\b|\b(?:{words})\b", text, flags=re.IGNORECASE)
    out = []
    for piece in pieces:
        piece = piece.strip(" .!?:")
        tokens = piece.lower().split()
        if len(tokens) >= 2 and any(t not in STOPWORDS for t in tokens) and piece not in out:
            out.append(piece)
    return out


def phrases_from_descriptions(descriptions: Sequence[str]) -> list[str]:
    """MIGC instance descriptions as phrases: single words are dropped (nothing to bind)."""
    out = []
    for text in descriptions:
        cleaned = strip_prompt_syntax(text)
        if len(cleaned.split()) >= 2 and text not in out:
            out.append(text)
    return out


def vocab_from_tokenizer(tokenizer: object) -> TokenVocab | None:
    """A :class:`TokenVocab` over a Hugging Face CLIP tokenizer (A1111 SD1, Forge); None otherwise."""
    if not (hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "convert_tokens_to_string")):
        return None

    class _Vocab:
        def strings(self, ids: Sequence[int]) -> list[str]:
            return list(tokenizer.convert_ids_to_tokens(list(ids)))

        def text(self, ids: Sequence[int]) -> str:
            return tokenizer.convert_tokens_to_string(self.strings(ids)).strip()

    return _Vocab()

