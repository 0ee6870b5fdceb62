"""The proof that we implement MIGC: reproduce the official layer's stored outputs for seeded inputs."""
import pytest
import torch
from safetensors.torch import load_file

import reference_migc
from helpers import load_shared_module
from lib_migc.core.masks import MaskCache
from lib_migc.modes.migc.modules import MIGCBlock
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode

CASE = "public_up16_512_2inst"


@pytest.fixture(scope="module")
def case(shared_dir):
    from ldm.modules.attention import CrossAttention

    inputs = load_shared_module("data/parity/inputs.py", "parity_inputs")
    spec = inputs.CASES[CASE]
    c, h, w, boxes = spec["C"], spec["H"], spec["W"], spec["boxes"]
    x_uncond, x_cond, contexts, pooled = inputs.case_inputs(c, h, w, len(boxes), seed=sum(map(ord, CASE)))
    ref = load_file(str(shared_dir / "data" / "parity" / f"{CASE}.safetensors"))
    attn = CrossAttention(query_dim=c, context_dim=768, heads=8, dim_head=c // 8).eval()
    attn.load_state_dict(inputs.attn2_state(c, seed=7))
    block = MIGCBlock(c).eval()
    block.load_state_dict(inputs.migc_block_state(c, seed=11), strict=True)
    perm = torch.randperm(28, generator=torch.Generator().manual_seed(inputs.SAC_PERM_SEED))
    masks = MaskCache.from_boxes(boxes, spec["img_h"], spec["img_w"]).for_tokens(h * w, torch.device("cpu"), torch.float32)
    return dict(spec=spec, x=x_cond, contexts=contexts, pooled=pooled, ref=ref, attn=attn, block=block, perm=perm, masks=masks)


def _close(ours, official, rel=1e-4):
    err = (ours - official).abs().max() / official.abs().max()
    assert err <= rel, f"max |ours - official| = {err:.2e} x max |official|"


def test_regenerated_inputs_match_the_recorded_checksums(case):
    sums = case["ref"]["x_cond_checksum"].double()
    ours = torch.stack([case["x"].double().sum(), case["contexts"].double().sum(), case["pooled"].double().sum()])
    torch.testing.assert_close(ours, sums, rtol=1e-6, atol=1e-3)


def test_fast_shading_reproduces_the_official_cond_out_and_sac_map(case):
    cond = InstanceConditioning.build(case["contexts"][2:], case["pooled"][1:], case["spec"]["boxes"])
    shader = LayerShader(case["attn"], case["attn"].forward, cond, case["block"])
    with torch.no_grad():
        out, weights = shader(case["x"], case["contexts"][1:2], case["masks"], ShadingMode.MIGC,
                              perms=case["perm"][None], return_weights=True)
    _close(out, case["ref"]["cond_out"])
    _close(weights, case["ref"]["sac_scale_map"])


def test_literal_reference_reproduces_the_official_outputs_too(case):
    """Validates the slow reference that the other tests compare the fast path against."""
    m = case["masks"]
    with torch.no_grad():
        out, weights = reference_migc.migc_layer(
            case["attn"], case["block"], case["x"], case["contexts"][1:2], case["contexts"][2:], case["pooled"][1:],
            case["spec"]["boxes"], m.instances, m.background, m.size, case["perm"])
    _close(out, case["ref"]["cond_out"])
    _close(weights, case["ref"]["sac_scale_map"])
