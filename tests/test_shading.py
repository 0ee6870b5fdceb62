"""Behaviour of the instance-shading attention, checked against the literal reference and definitions."""
import pytest
import torch

import reference_migc
from lib_migc.core.masks import MaskCache
from lib_migc.modes.migc.modules import MIGCBlock
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode, draw_sac_permutations

C = 64  # small channel count: same code paths, fast on CPU
CPU = torch.device("cpu")


def make_attn(seed=1, channels=C):
    from ldm.modules.attention import CrossAttention

    torch.manual_seed(seed)
    attn = CrossAttention(query_dim=channels, context_dim=768, heads=8, dim_head=channels // 8).eval()
    with torch.no_grad():
        attn.to_out[0].bias.normal_(0, 0.05)
    return attn


def make_block(seed=2, channels=C):
    torch.manual_seed(seed)
    block = MIGCBlock(channels).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1)
        block.norm.weight.add_(1.0)
    return block


def make_case(n=3, size=(16, 16), image=(512, 512), batch=1, seed=0, boxes=None):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    boxes = boxes or [[0.1, 0.15, 0.55, 0.7], [0.45, 0.3, 0.9, 0.95], [0.05, 0.6, 0.4, 0.98], [0.6, 0.05, 0.95, 0.4]][:n]
    x = torch.randn((batch, h * w, C), generator=g)
    global_ctx = torch.randn((batch, 77, 768), generator=g)
    inst_ctx = torch.randn((n, 77, 768), generator=g)
    pooled = torch.randn((n, 768), generator=g)
    cache = MaskCache.from_boxes(boxes, image[1], image[0])
    masks = cache.at(size, CPU, torch.float32)
    return dict(x=x, global_ctx=global_ctx, inst_ctx=inst_ctx, pooled=pooled, boxes=boxes, masks=masks, size=size)


def shader_for(case, attn, block=None, **scales):
    cond = InstanceConditioning.build(case["inst_ctx"], case["pooled"], case["boxes"], **scales)
    return LayerShader(attn, attn.forward, cond, block)


def perms_for(seeds):
    return draw_sac_permutations([torch.Generator().manual_seed(s) for s in seeds], CPU)


@pytest.mark.parametrize(
    "size,image,n,scales",
    [
        ((16, 16), (512, 512), 1, {}),
        ((16, 16), (512, 512), 3, dict(ca=[1.0, 0.5, 2.0], ea=[0.0, 1.5, 1.0], sac=[1.0, 2.0, 0.5])),
        ((16, 24), (768, 512), 2, {}),  # image 768 wide x 512 high
        ((24, 16), (512, 768), 4, {}),
        ((8, 8), (512, 512), 2, {}),  # the middle block
    ],
)
def test_fast_path_equals_the_literal_reference(size, image, n, scales):
    case = make_case(n=n, size=size, image=image, batch=2)
    attn, block = make_attn(), make_block()
    perms = perms_for([3, 4])
    with torch.no_grad():
        out, weights = shader_for(case, attn, block, **scales)(
            case["x"], case["global_ctx"], case["masks"], ShadingMode.MIGC, perms=perms, return_weights=True)
        for row in range(2):
            ref_out, ref_w = reference_migc.migc_layer(
                attn, block, case["x"][row:row + 1], case["global_ctx"][row:row + 1], case["inst_ctx"], case["pooled"],
                case["boxes"], case["masks"].instances, case["masks"].background, size, perms[row],
                ca=scales.get("ca"), ea=scales.get("ea"), sac=scales.get("sac"))
            torch.testing.assert_close(out[row:row + 1], ref_out, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(weights[row:row + 1], ref_w, rtol=1e-4, atol=1e-6)


def test_zero_instances_give_the_modules_own_forward_exactly():
    case = make_case(n=0)
    attn = make_attn()
    cond = InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), [])
    shader = LayerShader(attn, attn.forward, cond, make_block())
    with torch.no_grad():
        for mode in ShadingMode:
            out = shader(case["x"], case["global_ctx"], case["masks"], mode, perms=perms_for([0]))
            assert torch.equal(out, attn(case["x"], context=case["global_ctx"]))


def test_vanilla_mode_is_the_modules_own_forward_exactly():
    case = make_case(n=2)
    attn = make_attn()
    with torch.no_grad():
        out = shader_for(case, attn)(case["x"], case["global_ctx"], case["masks"], ShadingMode.VANILLA)
        assert torch.equal(out, attn(case["x"], context=case["global_ctx"]))


@pytest.mark.parametrize("size,image", [((16, 16), (512, 512)), ((64, 96), (768, 512))])
def test_naive_fuser_equals_its_definition(size, image):
    case = make_case(n=3, size=size, image=image, batch=2)
    attn = make_attn()
    with torch.no_grad():
        out = shader_for(case, attn)(case["x"], case["global_ctx"], case["masks"], ShadingMode.NAIVE)
        expected = reference_migc.naive_fuser(attn, case["x"], case["global_ctx"], case["inst_ctx"], case["masks"].instances)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_naive_fuser_is_the_global_output_where_no_box_is():
    case = make_case(n=1, boxes=[[0.0, 0.0, 0.25, 0.25]])
    attn = make_attn()
    with torch.no_grad():
        out = shader_for(case, attn)(case["x"], case["global_ctx"], case["masks"], ShadingMode.NAIVE)
        plain = attn(case["x"], context=case["global_ctx"])
    outside = case["masks"].instances[0] == 0
    assert outside.any() and (~outside).any()
    torch.testing.assert_close(out[:, outside], plain[:, outside], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, ~outside], plain[:, ~outside], atol=1e-3)


def test_enhancement_attention_is_zero_outside_each_box_and_matches_the_reference():
    case = make_case(n=3, batch=2)
    attn, block = make_attn(), make_block()
    shader = shader_for(case, attn, block)
    with torch.no_grad():
        enh = shader.enhancement(case["x"], case["masks"])  # (B, N, HW, C)
    m = case["masks"].instances
    for i in range(3):
        assert (enh[:, i][:, m[i] == 0] == 0).all()
        assert enh[:, i][:, m[i] > 0].abs().amax() > 0
    # Direct definition: m_i * EA(LayerNorm_migc(x); [pooled_i, box token_i]).
    with torch.no_grad():
        tokens = block.pos_net(torch.tensor(case["boxes"]))
        ctx = torch.stack([case["pooled"], tokens], 1)
        for i in range(3):
            ea = reference_migc.cross_attention(block.norm(case["x"]), ctx[i:i + 1].expand(2, -1, -1), block.ea.to_q,
                                                block.ea.to_k, block.ea.to_v, block.ea.to_out, 8)
            torch.testing.assert_close(enh[:, i], ea * m[i][None, :, None], rtol=1e-4, atol=1e-5)


def test_an_ea_scale_of_zero_removes_that_instances_enhancement():
    """The pooled embedding reaches the output only through the EA: with ea=0 it must not matter."""
    case = make_case(n=2)
    attn, block = make_attn(), make_block()
    other = dict(case, pooled=case["pooled"].clone())
    other["pooled"][1] = torch.randn(768)
    perms = perms_for([5])

    def run(c, ea):
        with torch.no_grad():
            return shader_for(c, attn, block, ea=ea)(c["x"], c["global_ctx"], c["masks"], ShadingMode.MIGC, perms=perms)

    torch.testing.assert_close(run(case, [1.0, 0.0]), run(other, [1.0, 0.0]), rtol=0, atol=0)
    assert not torch.allclose(run(case, [1.0, 1.0]), run(other, [1.0, 1.0]), atol=1e-4)


def test_box_token_separates_identical_descriptions():
    """Same text and pooled vector in two overlapping boxes: the EA differs where both boxes are full."""
    case = make_case(n=2, boxes=[[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 1.0, 1.0]])
    case["inst_ctx"][1] = case["inst_ctx"][0]
    case["pooled"][1] = case["pooled"][0]
    shader = shader_for(case, make_attn(), make_block())
    with torch.no_grad():
        enh = shader.enhancement(case["x"], case["masks"])
    m = case["masks"].instances
    both = (m[0] == 1) & (m[1] == 1)
    assert both.sum() > 10
    assert (enh[0, 0][both] - enh[0, 1][both]).abs().amax() > 1e-3


def test_same_seed_same_output_and_other_seed_other_output():
    case = make_case(n=3)
    shader = shader_for(case, make_attn(), make_block())
    with torch.no_grad():
        run = lambda seed: shader(case["x"], case["global_ctx"], case["masks"], ShadingMode.MIGC, perms=perms_for([seed]))  # noqa: E731
        a, b, c = run(42), run(42), run(43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sac_permutations_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    perms_for([1, 2, 3])
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [ShadingMode.MIGC, ShadingMode.NAIVE])
def test_half_precision_runs_without_nan_and_stays_close(dtype, mode):
    case = make_case(n=3, batch=2)
    attn, block = make_attn(), make_block()
    perms = perms_for([7, 8])
    with torch.no_grad():
        ref = shader_for(case, attn, block)(case["x"], case["global_ctx"], case["masks"], mode, perms=perms)
        attn_h, block_h = attn.to(dtype), block.to(dtype)
        masks_h = MaskCache.from_boxes(case["boxes"], 512, 512).at((16, 16), CPU, dtype)
        cond = InstanceConditioning.build(case["inst_ctx"].to(dtype), case["pooled"].to(dtype), case["boxes"])
        out = LayerShader(attn_h, attn_h.forward, cond, block_h)(
            case["x"].to(dtype), case["global_ctx"].to(dtype), masks_h, mode, perms=perms)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().amax() <= 0.05 * ref.abs().amax()


def test_migc_mode_requires_a_block_and_permutations():
    case = make_case(n=1)
    attn = make_attn()
    with pytest.raises(ValueError):
        shader_for(case, attn)(case["x"], case["global_ctx"], case["masks"], ShadingMode.MIGC, perms=perms_for([0]))
    with pytest.raises(ValueError):
        shader_for(case, attn, make_block())(case["x"], case["global_ctx"], case["masks"], ShadingMode.MIGC)


def test_a_block_loaded_in_another_dtype_follows_the_activations():
    """Hosts may move the UNet after MIGC loaded its weights (Forge's memory manager, --medvram)."""
    case = make_case(n=2)
    attn, block = make_attn(), make_block().to(torch.float64)
    with torch.no_grad():
        out = shader_for(case, attn, block)(case["x"], case["global_ctx"], case["masks"], ShadingMode.MIGC, perms=perms_for([1]))
    assert out.dtype == torch.float32 and next(block.parameters()).dtype == torch.float32
