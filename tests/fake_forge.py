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


class CONDCrossAttn:  # backend.conditioning's cross-attention condition: the context tensor in ``.cond``
    def __init__(self, cond):
        self.cond = cond


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """backend.sampling.sampling_function.calc_cond_uncond_batch for whole-image conditions: every cond and
    uncond entry's ``model_conds['c_crossattn']`` through ``model.apply_model`` in one batch (uncond first,
    as Forge batches them), returning the (cond, uncond) denoised predictions."""
    entries = [(1, e) for e in (uncond or [])] + [(0, e) for e in cond]
    n = x_in.shape[0]
    x = torch.cat([x_in] * len(entries))
    t = torch.cat([timestep] * len(entries))
    ctx = torch.cat([e["model_conds"]["c_crossattn"].cond for _, e in entries])
    marks = [c for c, _ in entries]
    options = dict(model_options.get("transformer_options", {}), cond_or_uncond=marks)
    c = {"c_crossattn": ctx, "transformer_options": options}
    vectors = [e["model_conds"]["y"].cond for _, e in entries if "y" in e["model_conds"]]
    if vectors:
        c["y"] = torch.cat(vectors)
    if "model_function_wrapper" in model_options:
        out = model_options["model_function_wrapper"](model.apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": marks})
    else:
        out = model.apply_model(x, t, **c)
    out = out.chunk(len(entries))
    pick = lambda which: torch.stack([o for (c, _), o in zip(entries, out) if c == which]).mean(0) if any(c == which for c, _ in entries) else None  # noqa: E731
    return pick(0), (pick(1) if uncond is not None else torch.zeros_like(x_in[:n]))


def sampling_function_inner(patcher, x, timestep, uncond, cond, cond_scale):
    """The order of Forge's sampling function: conditioning modifiers, A's predictions, CFG, post-CFG functions."""
    model, options, seed = patcher.model, patcher.model_options, None
    for modifier in options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, options, seed = modifier(model, x, timestep, uncond, cond, cond_scale, options, seed)
    uncond_ = None if cond_scale == 1.0 else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, options)
    if "sampler_cfg_function" in options:  # another extension's CFG (e.g. Dynamic Thresholding)
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model,
                "model_options": options}
        result = x - options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond_, "model": model, "uncond_denoised": uncond_pred,
                     "cond_denoised": cond_pred, "sigma": timestep, "model_options": options, "input": x})
    return result


class EpsPredictor:
    """backend.modules.k_prediction for SD1 (ε, scaled-linear β 0.00085..0.012): σ <-> t by log-σ interpolation."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1 - betas, 0)
        self.log_sigmas = (((1 - alphas) / alphas) ** 0.5).log().float()

    def timestep(self, sigma):
        log_sigma = torch.as_tensor(sigma).float().log()
        dists = log_sigma.reshape(-1, 1) - self.log_sigmas[None]
        low = dists.ge(0).cumsum(1).argmax(1).clamp(max=998)
        w = ((self.log_sigmas[low] - log_sigma.reshape(-1)) / (self.log_sigmas[low] - self.log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(torch.as_tensor(sigma).shape)

    def calculate_input(self, sigma, x):
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(-1, 1, 1, 1)


class KModel(torch.nn.Module):
    """backend.modules.k_model.KModel: the UNet behind an ε predictor (``apply_model`` returns denoised x0)."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = EpsPredictor()
        self.computation_dtype = next(diffusion_model.parameters()).dtype

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        extra = {"y": kwargs["y"]} if kwargs.get("y") is not None else {}
        out = self.diffusion_model(self.predictor.calculate_input(t, x), self.predictor.timestep(t).float(), context=c_crossattn, **extra)
        return self.predictor.calculate_denoised(t, out, x)

    def memory_required(self, input_shape):
        return 0


@contextmanager
def backend_modules():
    """``backend.attention`` and ``backend.sampling.sampling_function`` as Forge has them."""
    backend = types.ModuleType("backend")
    backend.__path__ = []
    attention = types.ModuleType("backend.attention")
    attention.attention_function = attention_function
    backend.attention = attention
    sampling = types.ModuleType("backend.sampling")
    sampling.__path__ = []
    sampling_function = types.ModuleType("backend.sampling.sampling_function")
    sampling_function.calc_cond_uncond_batch = calc_cond_uncond_batch
    memory_management = types.ModuleType("backend.memory_management")
    memory_management.current_loaded_models = []  # LoadedModel entries: .model is a ModelPatcher, .model.model the module
    backend.memory_management = memory_management
    modules = {"backend": backend, "backend.attention": attention, "backend.sampling": sampling,
               "backend.sampling.sampling_function": sampling_function, "backend.memory_management": memory_management}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            del sys.modules[name]


def sampling_prepare(unet):
    """backend.sampling.sampling_function.sampling_prepare: ``load_models_gpu([unet] + extras)``. Forge's
    memory manager keeps a LoadedModel of each patcher (the sampled clone included) at the front of
    ``current_loaded_models`` until it needs the memory (on a CPU host: never)."""
    loaded = sys.modules["backend.memory_management"].current_loaded_models
    for patcher in [unet] + unet.extra_model_patchers_during_sampling:
        known = [i for i, entry in enumerate(loaded) if entry.model is patcher]  # LoadedModel.__eq__ compares .model
        loaded.insert(0, loaded.pop(known[0]) if known else types.SimpleNamespace(model=patcher))


class UnetPatcher:
    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options or {"transformer_options": {}}
        self.extra_model_patchers_during_sampling = []

    def clone(self):
        clone = UnetPatcher(self.model, copy.deepcopy(self.model_options))
        clone.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        return clone

    def append_model_option(self, k, v, ensure_uniqueness=False):
        if k not in self.model_options:
            self.model_options[k] = []
        if ensure_uniqueness and v in self.model_options[k]:
            return
        self.model_options[k].append(v)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = sampler_cfg_function

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_extra_torch_module_during_sampling(self, m, cast_to_unet_dtype=True):
        """Forge wraps ``m`` in a ModelPatcher that ``sampling_prepare`` loads beside the UNet."""
        patcher = types.SimpleNamespace(model=m)
        self.extra_model_patchers_during_sampling.append(patcher)
        return patcher

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

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")


_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.1)?\.transformer_blocks\.(\d+)$")


def _blocks(unet):
    found = []
    for name, module in unet.named_modules():
        m = _NAME.match(name)
        if m:
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
            found.append((module, (kind, 0 if kind == "middle" else int(m.group(2))), int(m.group(3))))
    return found


@contextmanager
def forge_protocol(unet, options_holder):
    """Make the ldm transformer blocks call patches like Forge's BasicTransformerBlock._forward."""
    saved = []
    for index, (blk, block, block_index) in enumerate(_blocks(unet)):
        def forward(x, context=None, blk=blk, block=block, index=index, block_index=block_index):
            options = options_holder["options"]
            extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
            extra.update(block=block, block_index=block_index, transformer_index=index, n_heads=blk.attn2.heads,
                         dim_head=blk.attn2.to_q.out_features // blk.attn2.heads)
            patches = options.get("patches", {})
            replace = options.get("patches_replace", {}).get("attn2", {})
            if patches.get("attn1_patch") or patches.get("attn1_output_patch"):  # Forge's attn1 with its patches
                n = blk.norm1(x)
                ctx1 = value1 = n
                for p in patches.get("attn1_patch", []):
                    n, ctx1, value1 = p(n, ctx1, value1, extra)
                a = blk.attn1
                n = a.to_out(attention_function(a.to_q(n), a.to_k(ctx1), a.to_v(value1), a.heads))
                for p in patches.get("attn1_output_patch", []):
                    n = p(n, extra)
                x = n + x
            else:
                x = blk.attn1(blk.norm1(x)) + x
            n, ctx, value = blk.norm2(x), context, None
            if "attn2_patch" in patches:
                value = ctx
                for p in patches["attn2_patch"]:
                    n, ctx, value = p(n, ctx, value, extra)
            key = (block[0], block[1], block_index) if (block[0], block[1], block_index) in replace else block
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


def run_unet(patcher, x, context, cond_or_uncond, t=500.0, **extra):
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
        return unet(x, torch.full((x.shape[0],), t), context=context, **extra)


class ClassicTextProcessingEngine(FrozenCLIPEmbedderWithCustomWords):
    """Forge's SD1 text engine: ``text_encoder.transformer`` called with the tokens positionally."""

    def __init__(self, transformer):
        super().__init__(transformer)
        self.text_encoder = SimpleNamespace(transformer=transformer)
        self.wrapped = SimpleNamespace(transformer=lambda input_ids: transformer(input_ids, output_hidden_states=True))


class ForgeSDModel(torch.nn.Module):
    def __init__(self, unet, text_model, family="sd1"):
        super().__init__()
        # forge_objects.vae is backend.patcher.vae.VAE; tests that decode give its module an encoder and decoder
        self.forge_objects = SimpleNamespace(unet=UnetPatcher(KModel(unet)), vae=SimpleNamespace(first_stage_model=torch.nn.Module()))
        self.text_processing_engine = ClassicTextProcessingEngine(text_model)
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"

    def get_learned_conditioning(self, prompts):
        return self.text_processing_engine(prompts)


class ForgeFamilyModel(ForgeSDModel):
    """Forge's SD2.x / SDXL model: ``get_learned_conditioning`` as the A1111 fake's (tensor or dict)."""

    def __init__(self, unet, text_model, family):
        super().__init__(unet, text_model, family)
        from fake_webui import FakeFamilyModel

        self._a1111 = FakeFamilyModel(unet, text_model, family)

    def get_learned_conditioning(self, prompts):
        return self._a1111.get_learned_conditioning(prompts)
