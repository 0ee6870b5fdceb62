"""The one instance-shading attention that the A1111 and Forge adapters both call.

Given an attn2 module's projections and the cond rows of its input, :class:`LayerShader` returns the
cond rows' output for this step's mode:

* ``VANILLA``: the module's own forward (bit-identical to no extension).
* ``NAIVE``: MIGC's weight-free "naive fuser": per-pixel mix of the global and per-instance
  cross-attention outputs with weights 1 and 10*mask.
* ``MIGC``: the trained MIGC block (instance shading, Enhancement Attention, Layout Attention and the
  Shading Aggregation Controller), numerically the official method.

Why it looks different from a literal transcription: the literal form repeats the hidden states once
per instance, projects the query N+1 times and runs N+3 full C x C projections through the SAC. Here
the query is projected once; all instances go through one ``scaled_dot_product_attention`` call with
K/V of the instance contexts computed once per generation; the linear maps ``to_out`` and SAC
``conv1`` are folded (``conv1 . to_out`` precomputed once per generation) so the per-instance
``to_out`` disappears and ``to_out`` runs once on the mixed result; and because the Enhancement
Attention has only two context tokens, its output is a per-head convex mix of two precomputed vectors.
Everything stays on the device: no ``.item()``, numpy or host syncs per call.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.masks import FeatureMasks
from .modules import SAC_PLUS_SLOTS, SAC_SLOTS, BlockType


class ShadingMode(enum.Enum):
    VANILLA = "vanilla"
    NAIVE = "naive"
    MIGC = "migc"


NAIVE_INSTANCE_WEIGHT = 10.0
NAIVE_EPS = 1e-6


@dataclass(frozen=True)
class InstanceConditioning:
    """What a generation knows about its instances, independent of any layer.

    contexts: (N, L, D) text contexts of the descriptions (same token length for all).
    pooled: (N, D) pooled text embeddings (CLIP's final-normed EOS state) for the Enhancement Attention.
    boxes: (N, 4) boxes [x0, y0, x1, y1] in image fractions (float32).
    ca, ea, sac: (N,) per-instance scales (1 = trained behaviour).
    """

    contexts: torch.Tensor
    pooled: torch.Tensor
    boxes: torch.Tensor
    ca: torch.Tensor
    ea: torch.Tensor
    sac: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.contexts.shape[0])

    @classmethod
    def build(
        cls,
        contexts: torch.Tensor,
        pooled: torch.Tensor,
        boxes: Sequence[Sequence[float]],
        ca: Sequence[float] | None = None,
        ea: Sequence[float] | None = None,
        sac: Sequence[float] | None = None,
    ) -> "InstanceConditioning":
        n = contexts.shape[0]
        if pooled.shape[0] != n or len(boxes) != n:
            raise ValueError(f"{n} contexts but {pooled.shape[0]} pooled embeddings and {len(boxes)} boxes")

        def scale(values: Sequence[float] | None) -> torch.Tensor:
            return torch.tensor([1.0] * n if values is None else list(values), dtype=torch.float32)

        return cls(
            contexts=contexts,
            pooled=pooled,
            boxes=torch.tensor([list(map(float, b)) for b in boxes], dtype=torch.float32).reshape(n, 4),
            ca=scale(ca),
            ea=scale(ea),
            sac=scale(sac),
        )


def sac_slots(block: BlockType | None) -> int:
    """How many shuffled instance slots the block's SAC has: 28 for MIGC, 29 for MIGC++."""
    return SAC_PLUS_SLOTS if getattr(block, "plus", False) else SAC_SLOTS


def draw_sac_permutations(
    generators: Sequence[torch.Generator], device: torch.device, slots: int = SAC_SLOTS
) -> torch.Tensor:
    """(B, slots) slot permutations, one per cond row, each from that image's own seeded generator.

    The official SAC draws ``torch.randperm(28)`` (MIGC++: 29) from the global RNG at every call;
    drawing it from a per-image generator keeps a seed reproducible and leaves the WebUI's RNG
    untouched. A generator living on ``device`` keeps the draw free of host-device syncs.
    """
    perms = [torch.randperm(slots, generator=g, device=g.device) for g in generators]
    return torch.stack(perms).to(device, non_blocking=True)


def naive_instance_shares(masks: FeatureMasks) -> torch.Tensor:
    """(N, H, W): each instance's weight in the naive fuser, ``10 m_i / (1 + Σ 10 m_j + eps)`` (the rest is the
    global prompt's); what *Show instance maps* records for the naive phase."""
    inst_w = NAIVE_INSTANCE_WEIGHT * masks.instances
    return (inst_w / (1.0 + inst_w.sum(0) + NAIVE_EPS)).reshape(-1, *masks.size)


def sac_instance_shares(weights: torch.Tensor, masks: FeatureMasks) -> torch.Tensor:
    """(B, N, H, W): each instance's part of what the SAC actually mixes at a pixel, from the weights
    :class:`LayerShader` returns (MIGC: [background, instances, template]; MIGC++: [instances, template]).
    The shader multiplies the background's weight by its mask and each instance's by its own, so those
    products (and the template's weight) are the parts: outside its mask an instance has none."""
    n = masks.instances.shape[0]
    size = masks.size
    inst = weights[:, -n - 1:-1] * masks.instances.reshape(n, *size)
    rest = weights[:, -1]
    if weights.shape[1] == n + 2:
        rest = rest + weights[:, 0] * masks.background.reshape(size)
    return inst / (inst.sum(1) + rest).clamp(min=1e-12)[:, None]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, H*d) -> (..., H, L, d)."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, d) -> (..., L, H*d)."""
    return t.transpose(-3, -2).flatten(-2)


class _GenerationCache:
    """Per-generation, per-layer tensors that depend on the weights and the instances but not on the image."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.values: dict[str, torch.Tensor] = {}


class LayerShader:
    """Instance shading for one attn2 layer during one generation.

    attn: the layer's cross-attention module (``to_q``, ``to_k``, ``to_v``, ``to_out``, ``heads``); its
        projections are *called* (not read), so LoRA/network patches on them apply to every row.
    plain_forward: the module's own forward ``(x, context) -> out``, used for vanilla rows.
    conditioning: the generation's instances; block: this layer's MIGC or MIGC++ weights or ``None``.
    gamma_scale: MIGC++'s extra factor on its aggregation branch (1 = the official behaviour).
    """

    def __init__(
        self,
        attn: nn.Module,
        plain_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        conditioning: InstanceConditioning,
        block: BlockType | None = None,
        gamma_scale: float = 1.0,
    ) -> None:
        self.attn = attn
        self.heads = int(attn.heads)
        self.plain_forward = plain_forward
        self.cond = conditioning
        self.block = block
        self.plus = bool(getattr(block, "plus", False))
        self.gamma_scale = float(gamma_scale)
        self._cache = _GenerationCache()

    # ---------------------------------------------------------------- per-generation precomputation
    @torch.no_grad()
    def _prepared(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (x.device, x.dtype)
        if self._cache.key == key:
            return self._cache.values
        attn, dt, dev = self.attn, x.dtype, x.device
        cond = self.cond
        ctx = cond.contexts.to(device=dev, dtype=dt)
        v: dict[str, torch.Tensor] = {
            "inst_k": _heads(attn.to_k(ctx), self.heads),  # (N, h, L, d)
            "inst_v": _heads(attn.to_v(ctx), self.heads),
        }
        channels = x.shape[-1]
        v["out_bias"] = attn.to_out(torch.zeros((1, channels), device=dev, dtype=dt))[0]
        if self.block is not None:
            reference = next(self.block.parameters())
            if reference.device != dev or reference.dtype != dt:
                # Hosts may load or offload the UNet elsewhere between our load and sampling (Forge's
                # memory manager, A1111's --medvram): follow the activations, once per generation.
                self.block.to(device=dev, dtype=dt)
            v.update(self._prepare_block(x, v["out_bias"]))
        self._cache.key, self._cache.values = key, v
        return v

    def _prepare_block(self, x: torch.Tensor, out_bias: torch.Tensor) -> dict[str, torch.Tensor]:
        block, dt, channels = self.block, x.dtype, x.shape[-1]
        if block.channels != channels:
            raise ValueError(f"MIGC block has {block.channels} channels but the layer has {channels}")
        p = self._prepare_enhancement(x)
        ea_dir, ea_base = p.pop("ea_dir_f32"), p.pop("ea_base_f32")  # fold in float32, cast once
        conv2 = block.sac.conv2.weight.reshape(channels).float()
        p["conv2"], p["conv2_bias"] = conv2.to(dt), block.sac.conv2.bias.to(dt)
        if self.plus:
            # MIGC++'s phase logits are conv2 of the EA maps: w . (m ea (c + sum_h alpha D)) + b, so only
            # the projections of c and D onto w are needed; the EA maps are never materialised for them.
            p["ea_base_w"] = (ea_base @ conv2).to(dt)  # (N,)
            p["ea_dir_w"] = (ea_dir @ conv2).to(dt)  # (N, h)
            p["gate"] = (torch.tanh(block.gamma.float()) * self.gamma_scale).to(dt)
            return p
        sac = block.sac
        conv1 = sac.conv1.weight.reshape(channels, channels + 1).float()
        w1c, w1m = conv1[:, :channels], conv1[:, channels]
        # to_out's matrix through the module itself, so patched weights are honoured: W_o^T = to_out(I) - b.
        eye = torch.eye(channels, device=x.device, dtype=dt)
        wo_t = (self.attn.to_out(eye) - out_bias).float()
        p.update(
            fold_t=(wo_t @ w1c.T).to(dt),  # (conv1_C . W_o)^T
            conv1_bias_o=(w1c @ out_bias.float()).to(dt),  # conv1_C . b_o
            conv1_mask=w1m.to(dt),
            conv1_bias=sac.conv1.bias.to(dt),
            conv1_c=w1c.to(dt).contiguous(),
            ea_dir_c1=(ea_dir @ w1c.T).to(dt),  # conv1 of the EA output's parts
            ea_base_c1=(ea_base @ w1c.T).to(dt),
        )
        return p

    def _prepare_enhancement(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Enhancement Attention's per-instance constants, shared by MIGC and MIGC++."""
        block, cond, heads = self.block, self.cond, self.heads
        dt, dev, channels = x.dtype, x.device, x.shape[-1]
        # Enhancement Attention context: [pooled, box token] per instance -> keys/values (N, 2, C).
        box_tokens = block.pos_net(cond.boxes.to(dev))
        ea_ctx = torch.stack([cond.pooled.to(device=dev, dtype=box_tokens.dtype), box_tokens], dim=1)
        ea_k = block.ea.to_k(ea_ctx).float()
        ea_v = block.ea.to_v(ea_ctx).float()
        d = channels // heads
        wo_ea = block.ea.to_out[0].weight.float()
        # Softmax over two tokens is sigmoid(logit_pooled - logit_box) per head; the output is
        # c_i + sum_h alpha_ih * D_ih with D_ih = W_o[:, head h] (v_pooled - v_box)[head h].
        dv = (ea_v[:, 0] - ea_v[:, 1]).reshape(-1, heads, d)
        ea_dir = torch.einsum("chd,nhd->nhc", wo_ea.reshape(channels, heads, d), dv)
        ea_base = ea_v[:, 1] @ wo_ea.T + block.ea.to_out[0].bias.float()
        return dict(
            ea_dk=((ea_k[:, 0] - ea_k[:, 1]).reshape(-1, heads, d) * d**-0.5).to(dt),
            ea_dir=ea_dir.to(dt),  # (N, h, C)
            ea_base=ea_base.to(dt),  # (N, C)
            ea_dir_f32=ea_dir,
            ea_base_f32=ea_base,
            ca=cond.ca.to(device=dev, dtype=dt),
            ea=cond.ea.to(device=dev, dtype=dt),
            sac=cond.sac.to(device=dev, dtype=dt),
        )

    # ---------------------------------------------------------------- the per-call computation
    def __call__(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        masks: FeatureMasks | None,
        mode: ShadingMode,
        perms: torch.Tensor | None = None,
        return_weights: bool = False,
        global_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """Cond rows ``x`` (B, HW, C) with their global ``context`` (B, L, D) -> output (B, HW, C).

        ``global_heads(q)``: replaces the global branch's attention (per head, before to_out), e.g.
        StructureDiffusion's; the instance branches are unchanged.

        ``perms`` (B, 28) — MIGC++: (B, 29): SAC slot permutations for MIGC mode (see
        :func:`draw_sac_permutations`). With ``return_weights`` MIGC mode also returns the SAC softmax
        weights: (B, N+2, H, W) for [background, instances..., template]; MIGC++ (B, N+1, H, W), no background.
        """
        if mode is ShadingMode.VANILLA or self.cond.count == 0:
            out = self.plain_forward(x, context)
            return (out, None) if return_weights else out
        if masks is None:
            raise ValueError("masks are required for the naive fuser and MIGC")
        if mode is ShadingMode.MIGC and self.block is None:
            raise ValueError("MIGC mode on a layer without MIGC weights")
        prep = self._prepared(x)
        attn, heads = self.attn, self.heads
        q = _heads(attn.to_q(x), heads)  # (B, h, HW, d): projected once for every context
        if global_heads is not None:
            a_global = global_heads(q)
        else:
            a_global = F.scaled_dot_product_attention(
                q, _heads(attn.to_k(context), heads), _heads(attn.to_v(context), heads)
            )
        a_inst = self._instance_attention(q, prep)  # (B, N, h, HW, d)
        a_all = _merge_heads(torch.cat([a_global[:, None], a_inst], dim=1))  # (B, N+1, HW, C)
        if mode is ShadingMode.NAIVE:
            out = self._naive(a_all, masks, prep)
            return (out, None) if return_weights else out
        if perms is None:
            raise ValueError("MIGC mode needs the SAC permutations (draw_sac_permutations)")
        migc = self._migc_plus if self.plus else self._migc
        out, weights = migc(x, a_all, masks, prep, perms)
        return (out, weights) if return_weights else out

    def _enhancement_alpha(self, x: torch.Tensor, prep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-head softmax weight of the pooled token against the box token, (B, N, HW, heads)."""
        q_ea = self.block.enhancement_query(x).unflatten(-1, (self.heads, -1))  # (B, HW, h, d)
        return torch.sigmoid(torch.einsum("bphd,nhd->bnph", q_ea, prep["ea_dk"]))

    @torch.no_grad()
    def enhancement(self, x: torch.Tensor, masks: FeatureMasks) -> torch.Tensor:
        """Each instance's masked Enhancement Attention output m_i * EA_i, (B, N, HW, C).

        The MIGC path never materialises this (it folds it into the SAC inputs and the final sum);
        it is here to inspect and visualise what the EA adds per instance.
        """
        prep = self._prepared(x)
        ea = torch.einsum("bnph,nhc->bnpc", self._enhancement_alpha(x, prep), prep["ea_dir"])
        return (ea + prep["ea_base"][:, None]) * masks.instances[None, :, :, None]

    def _instance_attention(self, q: torch.Tensor, prep: dict[str, torch.Tensor]) -> torch.Tensor:
        b, h, hw, d = q.shape
        n = self.cond.count
        k, v = prep["inst_k"], prep["inst_v"]
        q_n = q[:, None].expand(b, n, h, hw, d).reshape(b * n, h, hw, d)
        k_n = k[None].expand(b, *k.shape).reshape(b * n, *k.shape[1:])
        v_n = v[None].expand(b, *v.shape).reshape(b * n, *v.shape[1:])
        return F.scaled_dot_product_attention(q_n, k_n, v_n).reshape(b, n, h, hw, d)

    def _naive(self, a_all: torch.Tensor, masks: FeatureMasks, prep: dict[str, torch.Tensor]) -> torch.Tensor:
        """out = (R_0 + sum 10 m_i R_i) / (1 + sum 10 m_i + 1e-6) with R = to_out(A): to_out applied once."""
        inst_w = NAIVE_INSTANCE_WEIGHT * masks.instances  # (N, HW)
        weights = torch.cat([torch.ones_like(inst_w[:1]), inst_w])  # (N+1, HW)
        denom = weights.sum(0) + NAIVE_EPS  # (HW,)
        mix = torch.einsum("kp,bkpc->bpc", weights / denom, a_all)
        # to_out adds b once; the definition gives b * sum(w) / (sum(w) + eps).
        return self.attn.to_out(mix) - prep["out_bias"] * (NAIVE_EPS / denom)[:, None]

    def _migc(
        self,
        x: torch.Tensor,
        a_all: torch.Tensor,
        masks: FeatureMasks,
        prep: dict[str, torch.Tensor],
        perms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block
        b, hw, c = x.shape
        n = self.cond.count
        height, width = masks.size
        m_inst, m_bg = masks.instances, masks.background  # (N, HW), (HW,)

        alpha = self._enhancement_alpha(x, prep)  # (B, N, HW, h)

        template = self._layout_template(x, masks)  # (B, HW, C)

        # --- SAC conv1 of every phase, [S; mask] -> C, with conv1 . to_out folded for the CA part.
        ca = prep["ca"][:, None, None]
        ea = prep["ea"][:, None, None]
        ga = a_all @ prep["fold_t"] + prep["conv1_bias_o"]  # conv1_C(R) for background and instances
        mask_term = prep["conv1_mask"]
        y_bg = m_bg[:, None] * (ga[:, 0] + mask_term)
        ea_c1 = torch.einsum("bnph,nhc->bnpc", alpha, prep["ea_dir_c1"]) + prep["ea_base_c1"][:, None]
        y_inst = m_inst[..., None] * (ca * ga[:, 1:] + ea * ea_c1 + mask_term)
        y_tmp = F.linear(template, prep["conv1_c"], mask_term)
        phases = torch.cat([y_bg[:, None], y_inst, y_tmp[:, None]], dim=1) + prep["conv1_bias"]  # (B, P, HW, C)

        # --- CBAM1 per phase, then conv2 -> one score map per phase.
        scores = self._phase_scores(phases, height, width, prep)  # (B, N+2, HW)
        null_score = self._null_score(height, width, prep, x.dtype)  # (HW,)

        # --- CBAM2 over [bg, 28 shuffled slots (instances + null copies), template].
        pre_slots = torch.cat([scores[:, 1:-1], null_score.expand(b, SAC_SLOTS - n, hw)], dim=1)
        perms = perms.to(x.device)
        slots = pre_slots.gather(1, perms[:, :, None].expand(b, SAC_SLOTS, hw))
        stack = torch.cat([scores[:, :1], slots, scores[:, -1:]], dim=1).reshape(b, SAC_SLOTS + 2, height, width)
        refined = block.sac.cbam2(stack).reshape(b, SAC_SLOTS + 2, hw)
        inverse = torch.argsort(perms, dim=1)[:, :n]
        inst_logits = refined[:, 1:-1].gather(1, inverse[:, :, None].expand(b, n, hw)) * prep["sac"][:, None]
        logits = torch.cat([refined[:, :1], inst_logits, refined[:, -1:]], dim=1)
        weights = logits.float().softmax(dim=1).to(x.dtype)  # (B, N+2, HW)

        # --- Weighted sum of [m_bg R_0, ca m_i R_i + ea m_i EA_i, T] with to_out applied once.
        w_bg, w_inst, w_tmp = weights[:, 0], weights[:, 1:-1], weights[:, -1]
        kappa = torch.cat([(w_bg * m_bg)[:, None], w_inst * m_inst * prep["ca"][:, None]], dim=1)  # (B, N+1, HW)
        mix = torch.einsum("bkp,bkpc->bpc", kappa, a_all)
        out = self.attn.to_out(mix) + (kappa.sum(1) - 1.0)[..., None] * prep["out_bias"]
        beta = w_inst * m_inst * prep["ea"][:, None]  # (B, N, HW)
        out = out + torch.einsum("bnp,nc->bpc", beta, prep["ea_base"])
        out = out + torch.einsum("bnph,nhc->bpc", beta[..., None] * alpha, prep["ea_dir"])
        out = out + w_tmp[..., None] * template
        return out, weights.reshape(b, n + 2, height, width)

    def _layout_template(self, x: torch.Tensor, masks: FeatureMasks) -> torch.Tensor:
        """Layout Attention: self-attention restricted to pixels that share a region, (B, HW, C)."""
        la, heads = self.block.la, self.heads
        attended = F.scaled_dot_product_attention(
            _heads(la.to_q(x), heads), _heads(la.to_k(x), heads), _heads(la.to_v(x), heads),
            attn_mask=masks.layout_allowed,
        )
        return la.to_out(_merge_heads(attended))

    def _migc_plus(
        self,
        x: torch.Tensor,
        a_all: torch.Tensor,
        masks: FeatureMasks,
        prep: dict[str, torch.Tensor],
        perms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MIGC++: refined-shader base + tanh(gamma) * SAC over [EA_1..EA_N, template] (29 shuffled slots)."""
        b, hw, _ = x.shape
        n = self.cond.count
        height, width = masks.size
        slots_n = SAC_PLUS_SLOTS
        base = self._naive(a_all, masks, prep)
        alpha = self._enhancement_alpha(x, prep)  # (B, N, HW, h)
        template = self._layout_template(x, masks)
        ea_mask = masks.instances * prep["ea"][:, None]  # (N, HW): m_i * ea_scale_i
        bias = prep["conv2_bias"]
        ea_logit = prep["ea_base_w"][:, None] + torch.einsum("bnph,nh->bnp", alpha, prep["ea_dir_w"])
        inst_scores = ea_mask * ea_logit + bias  # (B, N, HW)
        template_score = template @ prep["conv2"] + bias  # (B, HW)
        # 29 slots: the instances then copies of the all-zero phase (logit = bias), shuffled.
        pre_slots = torch.cat([inst_scores, bias.expand(b, slots_n - n, hw)], dim=1)
        perms = perms.to(x.device)
        slots = pre_slots.gather(1, perms[:, :, None].expand(b, slots_n, hw))
        stack = torch.cat([slots, template_score[:, None]], dim=1).reshape(b, slots_n + 1, height, width)
        refined = self.block.sac.cbam2(stack).reshape(b, slots_n + 1, hw)
        inverse = torch.argsort(perms, dim=1)[:, :n]
        inst_logits = refined[:, :-1].gather(1, inverse[:, :, None].expand(b, n, hw)) * prep["sac"][:, None]
        logits = torch.cat([inst_logits, refined[:, -1:]], dim=1)
        weights = logits.float().softmax(dim=1).to(x.dtype)  # (B, N+1, HW)
        beta = weights[:, :-1] * ea_mask  # (B, N, HW): SAC weight of each (masked, scaled) EA map
        sac_out = torch.einsum("bnp,nc->bpc", beta, prep["ea_base"])
        sac_out = sac_out + torch.einsum("bnph,nhc->bpc", beta[..., None] * alpha, prep["ea_dir"])
        sac_out = sac_out + weights[:, -1, :, None] * template
        return base + prep["gate"] * sac_out, weights.reshape(b, n + 1, height, width)

    def _phase_scores(
        self, phases: torch.Tensor, height: int, width: int, prep: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        cbam = self.block.sac.cbam1
        b, p, hw, c = phases.shape
        phases = phases * cbam.ChannelGate.gate(phases.mean(2), phases.amax(2))[:, :, None, :]
        spatial = cbam.SpatialGate.gate(
            phases.amax(-1).reshape(b * p, height, width), phases.mean(-1).reshape(b * p, height, width)
        ).reshape(b, p, hw)
        return spatial * (phases @ prep["conv2"]) + prep["conv2_bias"]

    def _null_score(self, height: int, width: int, prep: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Score of the all-zero phase with a zero mask: conv1 gives its bias everywhere, so the channel
        gate acts on a constant; only the spatial gate's zero padding makes it vary near the borders."""
        cbam = self.block.sac.cbam1
        y = prep["conv1_bias"]
        y = y * cbam.ChannelGate.gate(y, y)
        const = lambda v: v.expand(1, height, width)  # noqa: E731
        spatial = cbam.SpatialGate.gate(const(y.amax()), const(y.mean())).reshape(-1)
        return spatial * (y @ prep["conv2"]) + prep["conv2_bias"]
