"""The MIGC block's trainable parts, with parameter names that load the official sub-keys strictly.

Written from the method description (docs/migc-spec.md), not from the official code. The modules hold
weights and give a plain, readable ``forward`` for the small pieces (box embedding, CBAM gates); the
fast, batched per-layer computation that uses them lives in :mod:`lib_migc.modes.migc.shading`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTEXT_DIM = 768  # CLIP ViT-L/14 width of SD1.x text contexts and pooled embeddings
HEADS = 8
FOURIER_FREQS = 8
SAC_CHANNELS = 30  # background + 28 instance slots + layout template
SAC_SLOTS = SAC_CHANNELS - 2
#: MIGC++ has no background channel: 29 instance slots + the template in the same 30 channels.
SAC_PLUS_SLOTS = SAC_CHANNELS - 1


def fourier_box_embedding(boxes_xyxy: torch.Tensor, num_freqs: int = FOURIER_FREQS) -> torch.Tensor:
    """(N, 4) boxes [x0, y0, x1, y1] -> (N, 8 * num_freqs) Fourier features.

    The official position net reads boxes in the order (x0, x1, y0, y1); for each frequency
    f_k = 100^(k/8) it emits sin(f_k b) for the 4 values, then cos(f_k b).
    """
    b = boxes_xyxy[:, [0, 2, 1, 3]].float()
    freqs = 100.0 ** (torch.arange(num_freqs, dtype=torch.float32, device=b.device) / num_freqs)
    angles = freqs[:, None, None] * b[None]  # (F, N, 4)
    feats = torch.stack([angles.sin(), angles.cos()], dim=1)  # (F, 2, N, 4)
    return feats.permute(2, 0, 1, 3).reshape(b.shape[0], -1)


class PositionNet(nn.Module):
    """Box -> one 768-d "box token": Fourier features, then an MLP 64 -> 512 -> 512 -> 768 with SiLU."""

    def __init__(self, out_dim: int = CONTEXT_DIM, num_freqs: int = FOURIER_FREQS) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.linears_position = nn.Sequential(
            nn.Linear(8 * num_freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, out_dim)
        )

    def forward(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        first = self.linears_position[0].weight
        feats = fourier_box_embedding(boxes_xyxy.to(first.device), self.num_freqs).to(first.dtype)
        return self.linears_position(feats)


class Attention(nn.Module):
    """Projections of a multi-head attention (no q/k/v bias, output Linear with bias), ldm-style names."""

    def __init__(self, query_dim: int, context_dim: int, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))


class ChannelGate(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avg-pool) + MLP(max-pool)) scales each channel."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def gate(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """(..., C) pooled statistics -> (..., C) gate; ``mlp[0]`` (Flatten) is skipped for any batch shape."""
        mlp = self.mlp[1:]
        return torch.sigmoid(mlp(avg) + mlp(mx))


class _SpatialConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)


class SpatialGate(nn.Module):
    """CBAM spatial gate: [max, mean] over channels -> 7x7 conv -> sigmoid scales each pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = _SpatialConv()

    def gate(self, channel_max: torch.Tensor, channel_mean: torch.Tensor) -> torch.Tensor:
        """(K, H, W) per-pixel channel max and mean -> (K, H, W) gate."""
        stacked = torch.stack([channel_max, channel_mean], dim=1)
        return torch.sigmoid(self.spatial.conv(stacked))[:, 0]


class CBAM(nn.Module):
    """Channel gate then spatial gate, no residual (``x * g_channel * g_spatial``)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (K, C, H, W)."""
        x = x * self.ChannelGate.gate(x.mean((2, 3)), x.amax((2, 3)))[:, :, None, None]
        return x * self.SpatialGate.gate(x.amax(1), x.mean(1))[:, None]


class ShadingAggregationController(nn.Module):
    """Scores every shading phase per pixel and mixes them (weights only; the math is in shading.py)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, channels, kernel_size=1)
        self.cbam1 = CBAM(channels, reduction=16)
        self.conv2 = nn.Conv2d(channels, 1, kernel_size=1)
        self.cbam2 = CBAM(SAC_CHANNELS, reduction=1)


class MIGCBlock(nn.Module):
    """One layer's MIGC weights: Enhancement Attention, Layout Attention, norm, SAC and position net."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.ea = Attention(channels, CONTEXT_DIM)
        self.la = Attention(channels, channels)
        self.norm = nn.LayerNorm(channels, eps=1e-5)
        self.sac = ShadingAggregationController(channels)
        self.pos_net = PositionNet()

    def enhancement_query(self, x: torch.Tensor) -> torch.Tensor:
        """EA queries from LayerNorm_migc(x) (only the EA uses MIGC's own norm; LA takes x as is)."""
        return self.ea.to_q(F.layer_norm(x, (self.channels,), self.norm.weight, self.norm.bias, self.norm.eps))


class ShadingAggregationControllerPlus(nn.Module):
    """MIGC++'s SAC: only the per-phase logit (conv2) and the 30-channel CBAM; no mask channel, no CBAM1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(channels, 1, kernel_size=1)
        self.cbam2 = CBAM(SAC_CHANNELS, reduction=1)


class MIGCPlusBlock(nn.Module):
    """One layer's MIGC++ weights. Same EA, LA, norm and position net as MIGC; a lighter SAC and the
    learned output gate ``gamma`` (the SAC output is added to the refined shader's as tanh(gamma) times)."""

    plus = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.gamma = nn.Parameter(torch.zeros(1))
        self.ea = Attention(channels, CONTEXT_DIM)
        self.la = Attention(channels, channels)
        self.norm = nn.LayerNorm(channels, eps=1e-5)
        self.sac = ShadingAggregationControllerPlus(channels)
        self.pos_net = PositionNet()

    enhancement_query = MIGCBlock.enhancement_query


MIGCBlock.plus = False
BlockType = MIGCBlock | MIGCPlusBlock


def block_class(kind_plus: bool) -> type[nn.Module]:
    return MIGCPlusBlock if kind_plus else MIGCBlock


def expected_state_shapes(channels: int, plus: bool = False) -> dict[str, tuple[int, ...]]:
    """Sub-key -> shape of an MIGC (or MIGC++) block with ``channels`` channels (the per-layer keys)."""
    return {k: tuple(v.shape) for k, v in block_class(plus)(channels).to("meta").state_dict().items()}
