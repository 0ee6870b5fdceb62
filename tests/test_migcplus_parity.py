"""The proof that we implement MIGC++: reproduce the official MIGC++ layer's stored outputs.

The interface of ../shared/data/modes/migcplus/README.md is :func:`migcplus_cond` below: a thin
composition of the product's own pieces (mask cache, instance conditioning, the one LayerShader).
"""
import pytest
import torch
from safetensors.torch import load_file

from helpers import load_shared_module
from lib_migc.core.masks import MaskCache
from lib_migc.modes.migc.modules import MIGCPlusBlock
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode

CASE = "up16_512_mixed4_overlap"
CPU = torch.device("cpu")


def migcplus_cond(x_cond, attn2, contexts, pooled, masks_full, boxes_xyxy, feat_hw, block_state=None, perm=None,
                  ea_scale=None, sac_scale=None, gamma_scale=1.0):
    """README interface: contexts = [global, d_1..d_N], pooled = [d_1..d_N], masks at image resolution."""
    n, img_h, img_w = masks_full.shape
    cache = MaskCache(masks_full, img_h, img_w)
    masks = cache.at(feat_hw, x_cond.device, x_cond.dtype)
    block = None
    if block_state is not None:
        block = MIGCPlusBlock(x_cond.shape[-1]).eval()
        block.load_state_dict(block_state, strict=True)
        block.to(x_cond.dtype)
    cond = InstanceConditioning.build(contexts[1:], pooled, boxes_xyxy.tolist(), ea=ea_scale, sac=sac_scale)
    shader = LayerShader(attn2, attn2.forward, cond, block, gamma_scale=gamma_scale)
    mode = ShadingMode.MIGC if block is not None else ShadingMode.NAIVE
    with torch.no_grad():
        return shader(x_cond, contexts[:1].to(x_cond.dtype), masks, mode,
                      perms=None if perm is None else perm[None], return_weights=True)


@pytest.fixture(scope="module")
def case(shared_dir):
    from ldm.modules.attention import CrossAttention

    inputs = load_shared_module("data/modes/migcplus/inputs.py", "migcplus_inputs")
    spec = inputs.CASES[CASE]
    c, h, w = spec["C"], spec["H"], spec["W"]
    full, boxes, kinds = inputs.case_instances(CASE)
    _, x_cond, contexts, pooled = inputs.case_inputs(c, h, w, len(kinds), inputs.case_seed(CASE))
    attn = CrossAttention(query_dim=c, context_dim=768, heads=8, dim_head=c // 8).eval()
    attn.load_state_dict(inputs.attn2_state(c, seed=7))
    return dict(
        all_contexts=contexts, all_pooled=pooled, inputs=inputs, spec=spec, full=full, boxes=boxes, kinds=kinds, x=x_cond, contexts=contexts[1:], pooled=pooled[1:],
        attn=attn, block_state=inputs.migcplus_block_state(c, seed=11), perm=inputs.sac_perm(),
        ref=load_file(str(shared_dir / "data" / "modes" / "migcplus" / f"{CASE}.safetensors")),
    )


def _rel(ours, official):
    return float((ours.float() - official.float()).abs().max() / official.float().abs().max())


def test_regenerated_inputs_and_weights_match_the_recorded_checksums(case):
    ref = case["ref"]
    ours = torch.stack([case["x"].double().sum(), case["all_contexts"].double().sum(), case["all_pooled"].double().sum(),
                        case["full"].sum(), case["boxes"].sum()])
    torch.testing.assert_close(ours, ref["input_checksum"], rtol=1e-9, atol=1e-6)
    weights = torch.tensor([sum(float(v.double().sum()) for v in case["attn"].state_dict().values()),
                            sum(float(v.double().sum()) for v in case["block_state"].values())], dtype=torch.float64)
    torch.testing.assert_close(weights, ref["weight_checksum"], rtol=1e-9, atol=1e-6)
    assert torch.equal(case["perm"], ref["perm"])


def test_the_product_derives_the_same_boxes_from_the_masks(case):
    from lib_migc.core.mask_codec import mask_to_box

    for i, kind in enumerate(case["kinds"]):
        if kind == "mask":
            ours = torch.tensor(mask_to_box(case["full"][i].numpy()), dtype=torch.float64)
            torch.testing.assert_close(ours, case["ref"]["boxes_xyxy"][i], rtol=0, atol=1e-12)


def test_migcplus_layer_reproduces_the_official_cond_out_and_sac_weights(case):
    out, weights = migcplus_cond(case["x"], case["attn"], case["contexts"], case["pooled"], case["full"], case["boxes"],
                                 (16, 16), case["block_state"], case["perm"])
    errors = _rel(out, case["ref"]["cond_out"]), _rel(weights, case["ref"]["sac_weights"])
    print(f"MIGC++ parity: cond_out {errors[0]:.1e}, sac_weights {errors[1]:.1e} (bar 1e-4)")
    assert max(errors) <= 1e-4


@pytest.mark.parametrize("mistake", ["identity perm", "migc 28-perm", "gamma 0", "exclusive box end"])
def test_plausible_mistakes_land_outside_the_bar(case, mistake):
    """The bar discriminates: each mistake the spec lists is caught by the same comparison."""
    perm, state, boxes = case["perm"], dict(case["block_state"]), case["boxes"].clone()
    if mistake == "identity perm":
        perm = torch.arange(29)
    elif mistake == "migc 28-perm":
        perm = torch.cat([torch.randperm(28, generator=torch.Generator().manual_seed(1234)), torch.tensor([28])])
    elif mistake == "gamma 0":
        state["gamma"] = torch.zeros(1)
    else:
        for i, kind in enumerate(case["kinds"]):
            if kind == "mask":
                boxes[i, 2:] += torch.tensor([1 / 512, 1 / 512], dtype=torch.float64)
    out, _ = migcplus_cond(case["x"], case["attn"], case["contexts"], case["pooled"], case["full"], boxes, (16, 16),
                           state, perm)
    assert _rel(out, case["ref"]["cond_out"]) > 1e-3


def test_refined_shader_alone_is_the_gamma_zero_migcplus_layer(case):
    """With gamma = 0 the MIGC++ layer is exactly its weight-free base (spec §4.6)."""
    state = dict(case["block_state"], gamma=torch.zeros(1))
    args = (case["x"], case["attn"], case["contexts"], case["pooled"], case["full"], case["boxes"], (16, 16))
    gated, _ = migcplus_cond(*args, state, case["perm"])
    refined, weights = migcplus_cond(*args)
    assert weights is None
    torch.testing.assert_close(gated, refined, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_has_no_nan_and_stays_close(case, dtype):
    attn = case["attn"]
    half = type(attn)(query_dim=1280, context_dim=768, heads=8, dim_head=160).eval()
    half.load_state_dict(attn.state_dict())
    half.to(dtype)
    out, weights = migcplus_cond(case["x"].to(dtype), half, case["contexts"].to(dtype), case["pooled"].to(dtype),
                                 case["full"], case["boxes"], (16, 16), case["block_state"], case["perm"])
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert _rel(out, case["ref"]["cond_out"]) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
