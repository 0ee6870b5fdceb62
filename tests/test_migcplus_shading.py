"""The fast MIGC++ path against the literal reference on shapes the official code gets wrong."""
import pytest
import torch

import reference_migc
from lib_migc.core.layout import parse_layout
from lib_migc.core.mask_codec import encode_mask
from lib_migc.core.masks import MaskCache, box_mask
from lib_migc.modes.migc.modules import MIGCPlusBlock
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode

C = 64


def _disc(h, w, cx, cy, r):
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).double()


def _setup(seed=0):
    from ldm.modules.attention import CrossAttention

    torch.manual_seed(seed)
    attn = CrossAttention(query_dim=C, context_dim=768, heads=8, dim_head=C // 8).eval()
    block = MIGCPlusBlock(C).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.ndim == 1 else 1.0 / max(p.shape[-1], 1) ** 0.5)
    with torch.no_grad():
        block.gamma.fill_(0.8)
        block.norm.weight.add_(1.0)
    return attn, block


@pytest.mark.parametrize("img_hw,feat", [((512, 768), (16, 24)), ((768, 512), (24, 16)), ((448, 640), (14, 20)),
                                         ((448, 640), (7, 10)), ((512, 512), (8, 8))])
@pytest.mark.parametrize("scales", [False, True])
def test_fast_migcplus_equals_the_literal_reference_at_any_size(img_hw, feat, scales):
    attn, block = _setup()
    h, w = img_hw
    masks_full = torch.stack([_disc(h, w, w * 0.3, h * 0.4, min(h, w) * 0.2), box_mask((0.5, 0.1, 0.95, 0.6), h, w),
                              _disc(h, w, w * 0.7, h * 0.75, min(h, w) * 0.15)])
    boxes = [[0.1, 0.2, 0.5, 0.6], [0.5, 0.1, 0.95, 0.6], [0.55, 0.6, 0.85, 0.9]]
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, feat[0] * feat[1], C), generator=g)
    ctx = torch.randn((4, 77, 768), generator=g)
    pooled = torch.randn((3, 768), generator=g)
    perm = torch.randperm(29, generator=g)
    ea, sac = ([0.5, 2.0, 1.0], [1.5, 0.7, 1.0]) if scales else (None, None)
    fm = MaskCache(masks_full, h, w).at(feat, torch.device("cpu"), torch.float32)
    cond = InstanceConditioning.build(ctx[1:], pooled, boxes, ea=ea, sac=sac)
    shader = LayerShader(attn, attn.forward, cond, block, gamma_scale=0.9)
    with torch.no_grad():
        fast, fast_w = shader(x, ctx[:1], fm, ShadingMode.MIGC, perms=perm[None], return_weights=True)
        ref, ref_w = reference_migc.migcplus_layer(attn, block, x, ctx[:1], ctx[1:], pooled, boxes, fm.instances,
                                                   fm.background, feat, perm, ea=ea, sac=sac, gamma_scale=0.9)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_w, ref_w, rtol=1e-4, atol=1e-6)


def test_a_rectangle_mask_with_its_box_is_the_box_instance_and_without_it_differs_only_by_the_token():
    attn, block = _setup(1)
    h, w, feat = 256, 384, (16, 24)
    box = (0.125, 0.25, 0.625, 0.875)
    rect = encode_mask(box_mask(box, h, w).numpy())
    g = torch.Generator().manual_seed(4)
    x, ctx, pooled = torch.randn((2, feat[0] * feat[1], C), generator=g), torch.randn((2, 77, 768), generator=g), torch.randn((1, 768), generator=g)
    perms = torch.stack([torch.randperm(29, generator=g) for _ in range(2)])

    def run(instance, gamma=None):
        layout = parse_layout([instance])
        fm = MaskCache.from_layout(layout, h, w).at(feat, torch.device("cpu"), torch.float32)
        b = block if gamma is None else _with_gamma(block, gamma)
        shader = LayerShader(attn, attn.forward, InstanceConditioning.build(ctx[1:], pooled, layout.boxes), b)
        with torch.no_grad():
            return shader(x, ctx[:1].expand(2, -1, -1), fm, ShadingMode.MIGC, perms=perms)

    as_box = run({"description": "a", "box": list(box)})
    assert torch.equal(run({"description": "a", "mask": rect, "box": list(box)}), as_box)
    mask_only = run({"description": "a", "mask": rect})
    assert not torch.allclose(mask_only, as_box)  # derived box = last pixel index: another position token
    torch.testing.assert_close(run({"description": "a", "mask": rect}, gamma=0.0),
                               run({"description": "a", "box": list(box)}, gamma=0.0), rtol=0, atol=0)


def _with_gamma(block, value):
    other = MIGCPlusBlock(block.channels).eval()
    other.load_state_dict(block.state_dict())
    with torch.no_grad():
        other.gamma.fill_(value)
    return other
