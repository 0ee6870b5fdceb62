"""Stand-ins for the WebUI's ``modules.*`` objects, mirroring the real AUTOMATIC1111 v1.10 signatures.

Only the WebUI boundary is faked: the UNet is the real ldm UNet and the text encoder is a real (tiny,
random) transformers CLIPTextModel wrapped like A1111's FrozenCLIPEmbedderWithCustomWords (chunks of
75 tokens between BOS and EOS, EOS padding, one transformer call per chunk for the whole batch).
"""
from __future__ import annotations

import contextlib
import sys
import types
import zlib
from types import SimpleNamespace

import torch

VOCAB, BOS, EOS = 1000, 998, 999  # EOS is the largest id, as in CLIP (pooler = argmax of the ids)
CHUNK = 75


class OptionInfo:  # modules.options.OptionInfo
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args, self.section = default, label, component, component_args, section


class CFGDenoiserParams:  # modules.script_callbacks.CFGDenoiserParams
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:  # modules.script_callbacks.CFGDenoisedParams
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class CheckpointInfo:  # modules.sd_models.CheckpointInfo (the attributes MagicFusion reads)
    def __init__(self, filename, sha256="0123456789abcdef"):
        import os

        self.filename = filename
        self.name = os.path.basename(filename)
        self.model_name = os.path.splitext(self.name)[0]
        self.sha256 = sha256
        self.shorthash = sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"

    def calculate_shorthash(self):
        return self.shorthash


def register_checkpoint(path: str, sha256: str = "0123456789abcdef") -> CheckpointInfo:
    """Add a file to the fake ``modules.sd_models`` checkpoint list."""
    info = CheckpointInfo(path, sha256)
    sys.modules["modules.sd_models"].checkpoints_list[info.title] = info
    return info


class Options(SimpleNamespace):
    def add_option(self, key, info):
        setattr(self, key, info.default)
        self.added[key] = info


def install_fake_modules(models_dir: str) -> types.ModuleType:
    """Put ``modules``, ``modules.shared``, ``modules.devices``, ``modules.paths``, ``modules.script_callbacks``
    and ``modules.scripts`` into ``sys.modules``; return the package."""
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.opts = Options(added={}, batch_cond_uncond=True, migc_models_dir="")
    shared.cmd_opts = SimpleNamespace(migc_models_dir=models_dir)
    shared.loaded_hypernetworks = []
    shared.OptionInfo = OptionInfo
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.autocast = lambda disable=False: contextlib.nullcontext()
    paths = types.ModuleType("modules.paths")
    paths.models_path = models_dir
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.CFGDenoiserParams = CFGDenoiserParams
    callbacks.CFGDenoisedParams = CFGDenoisedParams
    callbacks.registered = {"cfg_denoiser": [], "cfg_denoised": [], "ui_settings": [], "model_loaded": [], "before_ui": [],
                            "app_started": []}
    callbacks.on_model_loaded = lambda fn, *, name=None: callbacks.registered["model_loaded"].append(fn)
    callbacks.on_cfg_denoiser = lambda fn, *, name=None: callbacks.registered["cfg_denoiser"].append(fn)
    callbacks.on_cfg_denoised = lambda fn, *, name=None: callbacks.registered["cfg_denoised"].append(fn)
    callbacks.on_ui_settings = lambda fn, *, name=None: callbacks.registered["ui_settings"].append(fn)
    callbacks.on_before_ui = lambda fn, *, name=None: callbacks.registered["before_ui"].append(fn)
    callbacks.on_app_started = lambda fn, *, name=None: callbacks.registered["app_started"].append(fn)
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()
    scripts.Script = type("Script", (), {})
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoints_list = {}

    def get_closet_checkpoint_match(search_string):
        for info in sd_models.checkpoints_list.values():
            if search_string in (info.title, info.name, info.model_name, info.shorthash, info.sha256):
                return info
        found = sorted((i for i in sd_models.checkpoints_list.values() if search_string in i.title), key=lambda i: len(i.title))
        return found[0] if found else None

    sd_models.get_closet_checkpoint_match = get_closet_checkpoint_match
    sd_models.checkpoint_tiles = lambda use_short=False: sorted(sd_models.checkpoints_list)
    samplers_common = types.ModuleType("modules.sd_samplers_common")
    samplers_common.images_tensor_to_samples = images_tensor_to_samples
    for name, module in (("shared", shared), ("devices", devices), ("paths", paths), ("script_callbacks", callbacks),
                         ("scripts", scripts), ("sd_models", sd_models), ("sd_samplers_common", samplers_common)):
        setattr(pkg, name, module)
        sys.modules[f"modules.{name}"] = module
    sys.modules["modules"] = pkg
    return pkg


def images_tensor_to_samples(image, approximation=None, model=None):
    """modules.sd_samplers_common.images_tensor_to_samples: image [0, 1] (B, 3, H, W) -> latent (B, 4, H/8, W/8).
    The stand-in VAE is a fixed linear map of the 8x8-averaged colour plus a random posterior sample
    (the real encoder samples its posterior too, from the global RNG)."""
    pooled = torch.nn.functional.avg_pool2d(image.float() * 2 - 1, 8)
    weight = torch.tensor([[0.3, 0.2, 0.1], [-0.2, 0.3, 0.1], [0.1, -0.1, 0.4], [0.2, 0.2, -0.3]])
    latent = torch.einsum("oc,bchw->bohw", weight, pooled)
    return (latent + 0.01 * torch.randn_like(latent)) * 0.18215


def remove_fake_modules() -> None:
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


def _token(word: str) -> int:
    return zlib.crc32(word.encode()) % (VOCAB - 3)


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """Mirrors modules.sd_hijack_clip's SD1 embedder: ``forward(texts) -> (B, 77*k, 768)``."""

    def __init__(self, transformer):
        super().__init__()
        self.wrapped = SimpleNamespace(transformer=transformer)
        self.id_start, self.id_end, self.id_pad = BOS, EOS, EOS

    def tokenize_chunks(self, text: str) -> list[list[int]]:
        ids = [_token(w) for w in text.replace(",", " , ").split()]
        chunks = [ids[i:i + CHUNK] for i in range(0, max(len(ids), 1), CHUNK)] or [[]]
        return [[self.id_start] + c + [self.id_end] * (CHUNK + 1 - len(c)) for c in chunks]

    def tokenize(self, texts):
        """Token ids without BOS/EOS, like the real ``tokenize`` (the tokenizer with add_special_tokens=False)."""
        return [[_token(w) for w in t.replace(",", " , ").split()] for t in texts]

    def tokenize_line(self, line):
        """``(chunks, token_count)`` with ``PromptChunk``-like chunks (``tokens``, ``multipliers``, ``fixes``)."""
        chunks = [SimpleNamespace(tokens=c, multipliers=[1.0] * len(c), fixes=[]) for c in self.tokenize_chunks(line)]
        return chunks, len(self.tokenize([line])[0])

    def forward(self, texts):
        batch = [self.tokenize_chunks(t) for t in texts]
        count = max(len(c) for c in batch)
        empty = [self.id_start] + [self.id_end] * (CHUNK + 1)
        zs = []
        for i in range(count):
            tokens = torch.tensor([c[i] if i < len(c) else empty for c in batch])
            zs.append(self.wrapped.transformer(input_ids=tokens).last_hidden_state)
        return torch.cat(zs, dim=1)


def tiny_text_model(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    return CLIPTextModel(config).eval().requires_grad_(False)


class FakeSDModel(torch.nn.Module):
    """The parts of A1111's loaded LatentDiffusion that MIGC touches."""

    def __init__(self, unet, text_model, family="sd1"):
        super().__init__()
        self.model = SimpleNamespace(diffusion_model=unet)
        self.first_stage_model = torch.nn.Module()  # tests that decode give it ldm's encoder and decoder
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(text_model)
        self.cond_stage_key = "txt"
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)

    def apply_model(self, x, t, cond):
        """LatentDiffusion.apply_model with A1111's condition dict (``c_crossattn`` list, or SDXL's
        ``crossattn``/``vector``): the UNet's eps."""
        context = cond["crossattn"] if "crossattn" in cond else cond["c_crossattn"][0]
        extra = {"y": cond["vector"]} if "vector" in cond else {}
        return self.model.diffusion_model(x, t, context=context, **extra)


class CompVisTimestepsDenoiser(torch.nn.Module):
    """modules.sd_samplers_timesteps.CompVisTimestepsDenoiser: the sampler's inner model for the timestep
    samplers (DDIM, PLMS, UniPC): VP latent and integer timesteps in, eps out."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class FakeProcessing:
    """The attributes of StableDiffusionProcessing(Txt2Img) that MIGC reads and writes."""

    def __init__(self, sd_model, width=256, height=256, seeds=(1,), prompts=("a room",)):
        self.sd_model, self.width, self.height = sd_model, width, height
        self.seeds = list(seeds)
        self.all_prompts = list(prompts)
        self.all_hr_prompts = list(prompts)
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.hr_upscale_to_x, self.hr_upscale_to_y = width * 2, height * 2

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        """StableDiffusionProcessing.close: the WebUI calls it after every job (``with closing(p)``), failed ones too."""
        self.sampler = None
        self.c = None
        self.uc = None
        self.closed = getattr(self, "closed", 0) + 1


class FakeFamilyModel(FakeSDModel):
    """A1111's loaded SD2.x or SDXL model as far as the training-free modes see it: the UNet and
    ``get_learned_conditioning``, which returns SD2's (N, 77k, 1024) tensor or SDXL's
    {"crossattn": (N, 77k, 2048), "vector": (N, 2816)} dict (both text encoders in the real model;
    here the tiny CLIP plus a fixed random projection, enough to give each prompt its own context)."""

    WIDTHS = {"sd2": 1024, "sdxl": 2048}

    def __init__(self, unet, text_model, family):
        super().__init__(unet, text_model, family)
        g = torch.Generator().manual_seed(17)
        self.projection = torch.randn((768, self.WIDTHS[family]), generator=g) / 768 ** 0.5
        self.vector_projection = torch.randn((768, 2816), generator=g) / 768 ** 0.5
        self.conditioning_calls = []

    def get_learned_conditioning(self, texts):
        self.conditioning_calls.append(texts)
        hidden = self.cond_stage_model(list(texts))
        context = hidden @ self.projection
        if not self.is_sdxl:
            return context
        return {"crossattn": context, "vector": hidden[:, 0] @ self.vector_projection}
