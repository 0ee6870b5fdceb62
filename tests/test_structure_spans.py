"""The StructureDiffusion span finder on real CLIP BPE tokens, and the phrase sources."""
import pytest

from lib_migc.modes.structure.spans import (
    find_spans, phrases_from_descriptions, split_prompt, strip_prompt_syntax, vocab_from_tokenizer,
)

from clip_bpe import clip_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return clip_tokenizer(str(tmp_path_factory.mktemp("clip")))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def spans(tok, prompt, phrases, vocab=True, chunks=None):
    chunks = chunks or [ids(tok, prompt)]
    result = find_spans(chunks, [(p, ids(tok, p)) for p in phrases], vocab_from_tokenizer(tok) if vocab else None)
    return [(m.phrase, m.chunk, m.start, m.end, m.how, m.text) for m in result.matches], result.skipped


def test_the_readme_examples(tok):
    found, skipped = spans(tok, "a red car and a white sheep", ["a red car", "a white sheep"])
    assert [f[:4] for f in found] == [("a red car", 0, 0, 3), ("a white sheep", 0, 4, 7)] and not skipped
    found, _ = spans(tok, "a kitchen with red countertops", ["a kitchen", "red countertops"])
    assert [f[2:4] for f in found] == [(0, 2), (3, 6)]  # countertops = counter + tops
    found, _ = spans(tok, "the sombrero is bright green", ["the sombrero"])
    assert [f[2:4] for f in found] == [(0, 3)]  # sombrero = som + brero
    found, _ = spans(tok, "a brown bench sits in front of an old white building",
                     ["a brown bench", "front of an old white building", "an old white building"])
    assert [f[2:4] for f in found] == [(0, 3), (5, 11), (7, 11)]  # nested phrases keep their own spans


def test_repeated_phrases_take_occurrences_left_to_right(tok):
    found, skipped = spans(tok, "a black cat next to a white dog and a black cat", ["a black cat", "a white dog", "a black cat"])
    assert [f[2:4] for f in found] == [(0, 3), (5, 8), (9, 12)] and not skipped
    found, skipped = spans(tok, "a black cat and a dog", ["a black cat", "a black cat"])
    assert len(found) == 1 and skipped == [("a black cat", "it is not in the prompt")]


def test_punctuation_case_and_determiners_are_normalised(tok):
    found, skipped = spans(tok, "a shiny, red car parked near A white sheep.", ["shiny red car", "the white sheep"])
    assert not skipped
    (p1, _, s1, e1, how1, text1), (p2, _, s2, e2, how2, text2) = found
    assert (s1, e1, how1) == (1, 5, "normalised") and text1 == "shiny , red car"  # the prompt's own window is encoded
    assert (s2, e2, how2, text2) == (8, 10, "normalised", "white sheep")  # "A" is lower-cased by CLIP; "the" dropped


def test_fuzzy_window_and_phrases_not_in_the_prompt(tok):
    found, skipped = spans(tok, "a cozy cabin with a big red wooden door in the snow", ["a red door", "a purple elephant"])
    assert [(f[0], f[4], f[5]) for f in found] == [("a red door", "fuzzy", "red wooden door")]
    assert skipped == [("a purple elephant", "it is not in the prompt")]
    # Without the vocabulary only verbatim matches are possible, and the rest are reported.
    found, skipped = spans(tok, "a cozy cabin with a big red wooden door", ["a red door"], vocab=False)
    assert found == [] and skipped[0][0] == "a red door"


def test_chunk_boundaries_and_the_whole_prompt(tok):
    first = ids(tok, "word " * 74 + "a red")
    second = ids(tok, "car and a white sheep")
    found, skipped = spans(tok, "", ["a red car", "a white sheep"], chunks=[first, second])
    assert [(f[0], f[1], f[2], f[3]) for f in found] == [("a white sheep", 1, 2, 5)]
    assert skipped == [("a red car", "it crosses a 75-token chunk boundary of the prompt (move it or add BREAK before it)")]
    found, skipped = spans(tok, "a red car", ["a red car"])
    assert found == [] and skipped == [("a red car", "it is the whole prompt")]


def test_rule_based_splitter():
    assert split_prompt("a red car and a white sheep") == ["a red car", "a white sheep"]
    assert split_prompt("(a red teddy bear:1.2) wearing a christmas hat, masterpiece, best quality, <lora:x:0.5>") == [
        "a red teddy bear", "a christmas hat", "best quality"]
    assert split_prompt("a cat BREAK a dog; the tall tree, dog, in") == ["a cat", "a dog", "the tall tree"]  # single words dropped
    assert strip_prompt_syntax("[a (red:1.3) car] with ((wheels))") == "a red car with wheels"
    assert phrases_from_descriptions(["a red car", "sheep", "a red car", "(a tall:1.1) tree"]) == ["a red car", "(a tall:1.1) tree"]
