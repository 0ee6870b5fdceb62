"""A literal, slow transcription of the MIGC layer from docs/migc-spec.md, for tests only.

It repeats the hidden states per instance, applies every to_out and conv1 separately and builds the
SAC inputs exactly as the spec lists them. The fast path in lib_migc.modes.migc.shading folds and batches all of
this; comparing the two on many shapes and options is how the fast path is checked beyond the single
official parity case (which this reference also reproduces, see test_parity.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_attention(q_in, context, to_q, to_k, to_v, to_out, heads, mask=None):
    """Plain multi-head attention with an explicit softmax; mask: bool (HW, L), False = blocked."""
    q, k, v = to_q(q_in), to_k(context), to_v(context)
    b, n, c = q.shape
    d = c // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    sim = (q @ k.transpose(-1, -2)) * d**-0.5
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    out = (sim.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return to_out(out)


def naive_fuser(attn, x, global_ctx, inst_ctx, inst_masks):
    """(R_global + sum 10 m_i R_i) / (1 + sum 10 m_i + 1e-6), every R computed separately."""
    r0 = cross_attention(x, global_ctx, attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.heads)
    num, den = r0.clone(), torch.ones_like(r0[..., :1])
    for i in range(inst_ctx.shape[0]):
        ri = cross_attention(x, inst_ctx[i:i + 1].expand(x.shape[0], -1, -1), attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.heads)
        w = 10.0 * inst_masks[i][None, :, None]
        num = num + w * ri
        den = den + w
    return num / (den + 1e-6)


def _cbam(cbam, x):
    """x (K, C, H, W), straight from the CBAM definition."""
    mlp = cbam.ChannelGate.mlp
    g = torch.sigmoid(mlp(F.avg_pool2d(x, x.shape[2:])) + mlp(F.max_pool2d(x, x.shape[2:])))
    x = x * g[:, :, None, None]
    pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
    return x * torch.sigmoid(cbam.SpatialGate.spatial.conv(pooled))


def box_token(block, boxes, dtype):
    """Fourier box token, boxes reordered to (x0, x1, y0, y1), through the position MLP."""
    b = torch.tensor(boxes, dtype=torch.float32)[:, [0, 2, 1, 3]]
    feats = []
    for k in range(8):
        f = 100 ** (k / 8)
        feats += [torch.sin(f * b), torch.cos(f * b)]
    return block.pos_net.linears_position(torch.cat(feats, -1).to(dtype))


def migc_layer(attn, block, x, global_ctx, inst_ctx, pooled, boxes, inst_masks, bg_mask, size, perm,
               ca=None, ea=None, sac=None):
    """One image's cond row x (1, HW, C) -> (out (1, HW, C), SAC weights (1, N+2, H, W))."""
    h, w = size
    n, c = inst_ctx.shape[0], x.shape[-1]
    ca = ca or [1.0] * n
    ea = ea or [1.0] * n
    r0 = cross_attention(x, global_ctx, attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.heads)
    xs = x.repeat(n, 1, 1)
    ri = cross_attention(xs, inst_ctx, attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.heads)
    box_tok = box_token(block, boxes, x.dtype)
    ea_ctx = torch.stack([pooled, box_tok], 1)
    normed = block.norm(xs)
    e = cross_attention(normed, ea_ctx, block.ea.to_q, block.ea.to_k, block.ea.to_v, block.ea.to_out, 8)
    m = inst_masks[:, :, None]
    e = e * m
    shaded = [ca[i] * ri[i] * m[i] + ea[i] * e[i] for i in range(n)]
    regions = torch.cat([inst_masks, bg_mask[None]])
    allowed = (regions[:, :, None] * regions[:, None, :]).sum(0).clamp(max=1) > 0
    t = cross_attention(x, x, block.la.to_q, block.la.to_k, block.la.to_v, block.la.to_out, 8, mask=allowed)[0]
    maps = [r0[0] * bg_mask[:, None]] + shaded + [t, torch.zeros_like(t)]
    guides = [bg_mask] + list(inst_masks) + [torch.ones_like(bg_mask), torch.zeros_like(bg_mask)]
    scores = []
    for mp, gd in zip(maps, guides):
        inp = torch.cat([mp.T.reshape(c, h, w), gd.reshape(1, h, w)])[None]
        y = _cbam(block.sac.cbam1, block.sac.conv1(inp))
        scores.append(block.sac.conv2(y)[0, 0])
    s_bg, s_inst, s_t, s_null = scores[0], scores[1:1 + n], scores[1 + n], scores[2 + n]
    pre = s_inst + [s_null] * (28 - n)
    stack = torch.stack([s_bg] + [pre[int(j)] for j in perm] + [s_t])[None]
    refined = _cbam(block.sac.cbam2, stack)[0]
    inverse = torch.argsort(perm)
    logits = [refined[0]] + [refined[1 + int(inverse[i])] * (1.0 if sac is None else sac[i]) for i in range(n)] + [refined[29]]
    weights = torch.stack(logits).softmax(0)
    out = sum(weights[j].reshape(-1, 1) * maps[j] for j in range(n + 2))
    return out[None], weights[None]


def migcplus_layer(attn, block, x, global_ctx, inst_ctx, pooled, boxes, inst_masks, bg_mask, size, perm,
                   ea=None, sac=None, gamma_scale=1.0):
    """MIGC++ literally (docs/modes/migcplus.md §4): base = naive fuser; phases = masked EA maps and the
    LA template; conv2 as a real 1x1 conv on each (C, H, W) map; 29 shuffled slots then the template;
    CBAM; softmax; out = base + tanh(gamma) * gamma_scale * sum."""
    h, w = size
    n, c = inst_ctx.shape[0], x.shape[-1]
    ea = ea or [1.0] * n
    base = naive_fuser(attn, x, global_ctx, inst_ctx, inst_masks)
    xs = x.repeat(n, 1, 1)
    box_tok = box_token(block, boxes, x.dtype)
    e = cross_attention(block.norm(xs), torch.stack([pooled, box_tok], 1), block.ea.to_q, block.ea.to_k, block.ea.to_v,
                        block.ea.to_out, 8)
    e = [e[i] * inst_masks[i][:, None] * ea[i] for i in range(n)]
    regions = torch.cat([inst_masks, bg_mask[None]])
    allowed = (regions[:, :, None] * regions[:, None, :]).sum(0) > 0
    t = cross_attention(x, x, block.la.to_q, block.la.to_k, block.la.to_v, block.la.to_out, 8, mask=allowed)[0]
    score = lambda mp: block.sac.conv2(mp.T.reshape(1, c, h, w))[0, 0]  # noqa: E731
    s_inst = [score(m) for m in e]
    s_null = score(torch.zeros_like(t))
    pre = s_inst + [s_null] * (29 - n)
    stack = torch.stack([pre[int(j)] for j in perm] + [score(t)])[None]
    refined = _cbam(block.sac.cbam2, stack)[0]
    inverse = torch.argsort(perm)
    logits = [refined[int(inverse[i])] * (1.0 if sac is None else sac[i]) for i in range(n)] + [refined[29]]
    weights = torch.stack(logits).softmax(0)
    maps = e + [t]
    sac_out = sum(weights[j].reshape(-1, 1) * maps[j] for j in range(n + 1))
    return base + torch.tanh(block.gamma) * gamma_scale * sac_out[None], weights[None]
