"""Stand-ins for WebUI Forge's UnetPatcher and its transformer-block patch protocol, on the real ldm UNet.

Mirrors Forge (lllyasviel/stable-diffusion-webui-forge, backend/patcher/base.py and backend/nn/unet.py):
``clone()`` deep-copies ``model_options``; ``set_model_attn2_patch(fn)`` -> ``fn(n, context, value,
extra_options) -> (n, context, value)``; ``set_model_attn2_replace(fn, block_name, number,
transformer_index)`` -> ``fn(q, k, v, extra_options)`` returns the attention before ``to_out``;
``set_model_attn2_output_patch(fn)`` -> ``fn(n, extra_options) -> n``. ``extra_options`` carries
``block``, ``block_index``, ``transformer_index``, ``n_heads``, ``dim_head`` and the sampling
function's ``cond_or_uncond``/``cond_indices``/``uncond_indices``/``sigmas`` (uncond rows first).
"""
from __future__ import annotations

import copy
import re
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fake_webui import FrozenCLIPEmbedderWithCustomWords


def attention_function(q, k, v, heads, mask=None):
    """backend.attention.attention_pytorch: (B, L, H*d) in, (B, L, H*d) out."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask).transpose(1, 2).flatten(-2)


@contextmanager
def backend_modules():
    """``backend.attention`` as Forge has it, for the adapter's import of Forge's attention function."""
    backend = types.ModuleType("backend")
    backend.__path__ = []
    attention = types.ModuleType("backend.attention")
    attention.attention_function = attention_function
    backend.attention = attention
    sys.modules.update({"backend": backend, "backend.attention": attention})
    try:
        yield
    finally:
        del sys.modules["backend"], sys.modules["backend.attention"]


class UnetPatcher:
    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options or {"transformer_options": {}}

    def clone(self):
        return UnetPatcher(self.model, copy.deepcopy(self.model_options))

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        block = (block_name, number, transformer_index) if transformer_index is not None else (block_name, number)
        to["patches_replace"][name][block] = patch
        self.model_options = {**self.model_options, "transformer_options": to}

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")


_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.1)?\.transformer_blocks\.0$")


def _blocks(unet):
    found = []
    for name, module in unet.named_modules():
        m = _NAME.match(name)
        if m:
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
            found.append((module, (kind, 0 if kind == "middle" else int(m.group(2)))))
    return found


@contextmanager
def forge_protocol(unet, options_holder):
    """Make the ldm transformer blocks call patches like Forge's BasicTransformerBlock._forward."""
    saved = []
    for index, (blk, block) in enumerate(_blocks(unet)):
        def forward(x, context=None, blk=blk, block=block, index=index):
            options = options_holder["options"]
            extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
            extra.update(block=block, block_index=0, transformer_index=index, n_heads=blk.attn2.heads,
                         dim_head=blk.attn2.to_q.out_features // blk.attn2.heads)
            patches = options.get("patches", {})
            replace = options.get("patches_replace", {}).get("attn2", {})
            x = blk.attn1(blk.norm1(x)) + x
            n, ctx, value = blk.norm2(x), context, None
            if "attn2_patch" in patches:
                value = ctx
                for p in patches["attn2_patch"]:
                    n, ctx, value = p(n, ctx, value, extra)
            key = (block[0], block[1], 0) if (block[0], block[1], 0) in replace else block
            if key in replace:
                value = ctx if value is None else value
                n = blk.attn2.to_out(replace[key](blk.attn2.to_q(n), blk.attn2.to_k(ctx), blk.attn2.to_v(value), extra))
            else:  # Forge's CrossAttention.forward
                a = blk.attn2
                n = a.to_out(attention_function(a.to_q(n), a.to_k(ctx), a.to_v(ctx if value is None else value), a.heads))
            for p in patches.get("attn2_output_patch", []):
                n = p(n, extra)
            x = n + x
            return blk.ff(blk.norm3(x)) + x

        blk._forward = forward
        saved.append(blk)
    try:
        yield
    finally:
        for blk in saved:
            del blk._forward


def run_unet(patcher, x, context, cond_or_uncond, t=500.0):
    """One UNet call of Forge's sampling function: rows grouped per entry of ``cond_or_uncond``."""
    per = x.shape[0] // len(cond_or_uncond)
    cond = [i * per + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(per)]
    uncond = [i * per + j for i, c in enumerate(cond_or_uncond) if c == 1 for j in range(per)]
    options = dict(patcher.model_options["transformer_options"])
    options.update(cond_or_uncond=list(cond_or_uncond), cond_indices=cond, uncond_indices=uncond,
                   sigmas=torch.full((per,), 1.0), original_shape=list(x.shape))
    holder = {"options": options}
    unet = patcher.model.diffusion_model
    with forge_protocol(unet, holder), torch.no_grad():
        return unet(x, torch.full((x.shape[0],), t), context=context)


class ClassicTextProcessingEngine(FrozenCLIPEmbedderWithCustomWords):
    """Forge's SD1 text engine: ``text_encoder.transformer`` called with the tokens positionally."""

    def __init__(self, transformer):
        super().__init__(transformer)
        self.text_encoder = SimpleNamespace(transformer=transformer)
        self.wrapped = SimpleNamespace(transformer=lambda input_ids: transformer(input_ids, output_hidden_states=True))


class ForgeSDModel(torch.nn.Module):
    def __init__(self, unet, text_model, family="sd1"):
        super().__init__()
        self.forge_objects = SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=unet)))
        self.text_processing_engine = ClassicTextProcessingEngine(text_model)
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"

    def get_learned_conditioning(self, prompts):
        return self.text_processing_engine(prompts)
