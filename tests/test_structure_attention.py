"""StructureDiffusion's attention against the official outputs in ../shared/data/modes/structurediffusion/,
and its algebra (Ē, conjunction as run) against a literal per-set computation written here."""
import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open

from lib_migc.modes.structure.attention import (
    Overlay, aligned, conjunction_sets, mean_value_context, overlays_from_spans, structure_attention,
)


def _reference(shared_dir):
    folder = os.path.join(shared_dir, "data", "modes", "structurediffusion")
    spec = importlib.util.spec_from_file_location("sd_inputs", os.path.join(folder, "inputs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with safe_open(os.path.join(folder, "case1_car_sheep_default.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    case = module.make_case(module.CASES[0])
    checksums = json.loads(meta["input_sha256"])
    assert checksums == module.input_checksums(module.CASES[0]), "regenerated inputs differ from the stored ones"
    return module.CASES[0], case, stored


def test_default_mode_reproduces_the_official_output(shared_dir):
    spec, case, stored = _reference(shared_dir)
    out = structure_attention(case["x_cond"], case["full"], case["phrases"], spec["spans"], case["weights"], spec["heads"])
    ref = stored["out_cond"]
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel
    # And it is not plain attention (the reference differs from it by ~19 %).
    plain = structure_attention(case["x_cond"], case["full"], [], [], case["weights"], spec["heads"])
    assert ((plain - ref).abs().max() / ref.abs().max()).item() > 0.05


def test_default_mode_fp16_close(shared_dir):
    spec, case, stored = _reference(shared_dir)
    half = lambda t: t.half()  # noqa: E731
    out = structure_attention(half(case["x_cond"]), half(case["full"]), [half(p) for p in case["phrases"]], spec["spans"],
                              {k: half(v) for k, v in case["weights"].items()}, spec["heads"])
    ref = stored["out_cond"]
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 5e-3


def _literal(x, full, phrase_rows, spans, w, heads, conjunction):
    """The method as the spec's §3.3-3.4 writes it: explicit key/value sets, one softmax per key set."""
    def aligned_copy(which):
        a = full.clone()
        for i in which:
            s, e = spans[i]
            a[:, s + 1:e + 1] = phrase_rows[i][:, 1:1 + e - s]
        return a

    n = len(spans)
    if conjunction:
        a_all = aligned_copy(range(n))
        keys, values = [a_all] + [aligned_copy([i]) for i in range(n)], [a_all]
    else:
        keys, values = [full], [full] + [aligned_copy([i]) for i in range(n)]
    d = w["to_q.weight"].shape[0] // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    q = split(x @ w["to_q.weight"].T)
    maps = [torch.softmax(q @ split(k @ w["to_k.weight"].T).transpose(-1, -2) * d ** -0.5, dim=-1) for k in keys]
    vals = [split(v @ w["to_v.weight"].T) for v in values]
    total = sum(m @ v for m in maps for v in vals) / (len(maps) * len(vals))
    merged = total.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return merged @ w["to_out.0.weight"].T + w["to_out.0.bias"]


@pytest.mark.parametrize("conjunction", [False, True])
def test_nested_overlapping_spans_match_the_literal_method(conjunction):
    torch.manual_seed(0)
    c, heads, b = 64, 4, 2
    w = {"to_q.weight": torch.randn(c, c) / 8, "to_k.weight": torch.randn(c, 32) / 6, "to_v.weight": torch.randn(c, 32) / 6,
         "to_out.0.weight": torch.randn(c, c) / 8, "to_out.0.bias": torch.randn(c) / 10}
    full = torch.randn(b, 77, 32, dtype=torch.float64)
    spans = [(5, 11), (7, 11), (0, 3)]  # an outer phrase, an inner one (wins in A_all), a prefix
    phrases = [torch.randn(b, 77, 32, dtype=torch.float64) for _ in spans]
    x = torch.randn(b, 16, c, dtype=torch.float64)
    w64 = {k: v.double() for k, v in w.items()}
    out = structure_attention(x, full, phrases, spans, w64, heads, conjunction=conjunction)
    # each row (image) with its own phrase encodings, as the hooks hand them over
    ref = _literal(x, full, phrases, spans, w64, heads, conjunction)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    # (77, D) phrases, as the docstring allows: the same encoding for every row
    shared = structure_attention(x, full, [p[0] for p in phrases], spans, w64, heads, conjunction=conjunction)
    ref_shared = _literal(x, full, [p[:1].expand_as(p) for p in phrases], spans, w64, heads, conjunction)
    assert torch.allclose(shared, ref_shared, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(shared, out, rtol=1e-6, atol=1e-6), "row 1's own phrases matter"


def test_the_mean_value_divides_by_the_overlays_it_uses():
    full = torch.randn(1, 77, 8, dtype=torch.float64)
    used = Overlay(2, torch.randn(3, 8, dtype=torch.float64))
    beyond = Overlay(77 + 1, torch.randn(3, 8, dtype=torch.float64))  # a second chunk this context does not have
    mean = mean_value_context(full, [used, beyond])
    expected = (full[0, 2:5] + used.rows) / 2  # mean(E, A_used): two value sets, not three
    assert torch.allclose(mean[0, 2:5], expected, atol=1e-12)


def test_value_context_is_e_outside_spans_and_a_blend_inside():
    full = torch.randn(1, 154, 8)
    p1, p2 = torch.randn(77, 8), torch.randn(77, 8)
    overlays = overlays_from_spans([p1], [(2, 5)], chunk=1) + [Overlay(3, p2[1:4])]
    mean = mean_value_context(full, overlays)
    inside = list(range(77 + 3, 77 + 6))
    outside = [i for i in range(154) if i not in inside and i not in (3, 4, 5)]
    assert torch.equal(mean[:, outside], full[:, outside])
    assert torch.allclose(mean[0, 77 + 3], full[0, 77 + 3] * 2 / 3 + p1[1] / 3, atol=1e-6)
    a_all = aligned(full, overlays)
    assert torch.equal(a_all[0, 3:6], p2[1:4]) and torch.equal(a_all[0, 80:83], p1[1:4])
    keys, value = conjunction_sets(full, overlays)
    assert keys.shape == (3, 1, 154, 8) and torch.equal(keys[0], value)
    assert torch.equal(keys[1][0, 80:83], p1[1:4]) and torch.equal(keys[1][0, 3:6], full[0, 3:6])
