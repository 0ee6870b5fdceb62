"""Loading MIGC weights: strict, safe, with one error that lists everything wrong."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, official_subkeys, random_official_state
from lib_migc.core.errors import CheckpointError
from lib_migc.core.unet_layers import MIGC_LAYERS
from lib_migc.modes.migc.checkpoint import layer_of_key, load_migc_weights, read_state_dict


@pytest.fixture(scope="module")
def official_state():
    return random_official_state(seed=3)


def _save_ckpt(state, path):
    torch.save({"state_dict": state}, path)
    return str(path)


def _assert_loaded(weights, state):
    assert weights.kind == "migc"
    assert weights.layers == list(MIGC_LAYERS)
    for layer, block in weights.blocks.items():
        assert block.channels == 1280
        sd = block.state_dict()
        assert len(sd) == 32
        for sub, tensor in sd.items():
            key = f"model.diffusion_model.{layer}.transformer_blocks.0.attn2.migc.{sub}"
            assert torch.equal(tensor, state[key])


def test_official_layout_loads_strictly_from_ckpt_and_safetensors(tmp_path, official_state):
    assert len(official_state) == 4 * 32
    _assert_loaded(load_migc_weights(_save_ckpt(official_state, tmp_path / "MIGC_SD14.ckpt")), official_state)
    save_file(official_state, str(tmp_path / "MIGC_SD14.safetensors"))
    _assert_loaded(load_migc_weights(str(tmp_path / "MIGC_SD14.safetensors")), official_state)


def test_parameter_count_matches_the_published_checkpoint(tmp_path, official_state):
    weights = load_migc_weights(_save_ckpt(official_state, tmp_path / "m.ckpt"))
    assert sum(p.numel() for b in weights.blocks.values() for p in b.parameters()) == 4 * 14_341_977


def test_blocks_come_on_the_requested_dtype(tmp_path, official_state):
    weights = load_migc_weights(_save_ckpt(official_state, tmp_path / "m.ckpt"), dtype=torch.float16)
    assert {p.dtype for b in weights.blocks.values() for p in b.parameters()} == {torch.float16}
    assert not any(p.requires_grad for b in weights.blocks.values() for p in b.parameters())


def test_keys_without_prefix_or_wrapper_and_diffusers_names_load(tmp_path, official_state):
    bare = {k.replace("model.diffusion_model.", ""): v for k, v in official_state.items()}
    torch.save(bare, tmp_path / "bare.ckpt")
    assert load_migc_weights(str(tmp_path / "bare.ckpt")).layers == list(MIGC_LAYERS)
    diffusers = {"middle_block.1": "mid_block.attentions.0", "output_blocks.3.1": "up_blocks.1.attentions.0",
                 "output_blocks.4.1": "up_blocks.1.attentions.1", "output_blocks.5.1": "up_blocks.1.attentions.2"}
    renamed = {}
    for key, value in official_state.items():
        for ldm, diff in diffusers.items():
            key = key.replace(f"model.diffusion_model.{ldm}.", f"{diff}.")
        renamed[key] = value
    save_file(renamed, str(tmp_path / "community.safetensors"))
    _assert_loaded(load_migc_weights(str(tmp_path / "community.safetensors")), official_state)


@pytest.mark.parametrize("key,layer,sub", [
    ("model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.migc.sac.conv1.weight", "output_blocks.4.1", "sac.conv1.weight"),
    ("output_blocks.11.1.transformer_blocks.0.attn2.migc.norm.bias", "output_blocks.11.1", "norm.bias"),
    ("diffusion_model.middle_block.1.transformer_blocks.0.attn2.migc.la.to_q.weight", "middle_block.1", "la.to_q.weight"),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor.migc.gamma", "input_blocks.8.1", "gamma"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.migc.norm.bias", "output_blocks.11.1", "norm.bias"),
    ("model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_q.weight", None, None),
    ("output_blocks.4.1.transformer_blocks.1.attn2.migc.norm.bias", None, None),
])
def test_keys_are_parsed_by_their_tokens(key, layer, sub):
    assert layer_of_key(key) == (layer, sub)


def _error(tmp_path, state, name="bad.ckpt"):
    path = _save_ckpt(state, tmp_path / name)
    with pytest.raises(CheckpointError) as info:
        load_migc_weights(path)
    return str(info.value)


def test_missing_extra_and_misshaped_keys_are_reported_together(tmp_path, official_state):
    state = dict(official_state)
    prefix = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.migc."
    del state[prefix + "sac.conv2.bias"]
    state[prefix + "sac.conv3.weight"] = torch.zeros(3)
    state["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.migc.ea.to_k.weight"] = torch.zeros(1280, 1024)
    state["model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_q.weight"] = torch.zeros(2)
    message = _error(tmp_path, state)
    assert "output_blocks.4.1: missing 1 key(s): migc.sac.conv2.bias" in message
    assert "output_blocks.4.1: unexpected key(s): migc.sac.conv3.weight" in message
    assert "middle_block.1: wrong shape or dtype: ea.to_k.weight (1280, 1024) (expected (1280, 768))" in message
    assert "unexpected keys (no 'migc' token" in message and "attn2.to_q.weight" in message


def test_truncated_files_are_reported_not_crashed(tmp_path, official_state):
    for suffix, writer in ((".ckpt", lambda s, p: torch.save({"state_dict": s}, p)), (".safetensors", lambda s, p: save_file(s, p))):
        path = str(tmp_path / f"cut{suffix}")
        writer(official_state, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_migc_weights(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        load_migc_weights(str(tmp_path / "nope.ckpt"))
    assert info.value.status_code == 404


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_executed(tmp_path, official_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(official_state), "hook": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="not loaded for safety") as info:
        load_migc_weights(str(path))
    assert "--trust" in str(info.value)
    assert not marker.exists()


MIGCPLUS_LAYERS = {"mid_block.attentions.0": ("middle_block.1", 1280), "up_blocks.1.attentions.0": ("output_blocks.3.1", 1280),
                   "up_blocks.1.attentions.2": ("output_blocks.5.1", 1280), "down_blocks.0.attentions.1": ("input_blocks.2.1", 320)}


def _migcplus_state(seed=5, layers=MIGCPLUS_LAYERS):
    """A random file in the official MIGC++ layout: a flat dict, diffusers names, 26 sub-keys per layer."""
    from lib_migc.modes.migc.modules import expected_state_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for diffusers_name, (_, channels) in layers.items():
        for sub, shape in expected_state_shapes(channels, plus=True).items():
            state[f"{diffusers_name}.transformer_blocks.0.attn2.processor.migc.{sub}"] = torch.randn(shape, generator=g)
    return state


def test_a_migc_plus_file_loads_strictly_with_the_layers_its_keys_name(tmp_path):
    state = _migcplus_state()
    torch.save(state, tmp_path / "MIGC++_SD14.ckpt")  # flat dict, as the official file
    save_file(state, str(tmp_path / "MIGC++_SD14.safetensors"))
    for name in ("MIGC++_SD14.ckpt", "MIGC++_SD14.safetensors"):
        weights = load_migc_weights(str(tmp_path / name))
        assert weights.kind == "migc++" and weights.plus and weights.label == "MIGC++"
        assert set(weights.layers) == {ldm for ldm, _ in MIGCPLUS_LAYERS.values()}
        for diffusers_name, (ldm, channels) in MIGCPLUS_LAYERS.items():
            block = weights.blocks[ldm]
            assert block.plus and block.channels == channels and len(block.state_dict()) == 26
            for sub, tensor in block.state_dict().items():
                assert torch.equal(tensor, state[f"{diffusers_name}.transformer_blocks.0.attn2.processor.migc.{sub}"])
    c1280 = [b for b in weights.blocks.values() if b.channels == 1280][0]
    assert sum(p.numel() for p in c1280.parameters()) == 12_494_760


def test_a_truncated_or_misnamed_migc_plus_file_lists_every_problem(tmp_path):
    state = _migcplus_state()
    prefix = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.migc."
    del state[prefix + "sac.conv2.bias"]  # truncated
    state[prefix + "gama"] = state.pop(prefix + "gamma")  # misnamed
    state["mid_block.attentions.0.transformer_blocks.0.attn2.processor.migc.sac.cbam2.ChannelGate.mlp.1.weight"] = torch.zeros(29, 30)
    message = _error(tmp_path, state, "MIGC++_SD14.ckpt")
    assert "not a valid MIGC++ checkpoint" in message and "26 keys per layer" in message
    assert "output_blocks.3.1: missing 2 key(s): migc.gamma, migc.sac.conv2.bias" in message
    assert "output_blocks.3.1: unexpected key(s): migc.gama" in message
    assert "middle_block.1: wrong shape or dtype: sac.cbam2.ChannelGate.mlp.1.weight (29, 30) (expected (30, 30))" in message


def test_a_migc_file_with_a_gamma_is_checked_as_migc_plus(tmp_path, official_state):
    """A MIGC file is never half-loaded as the other kind: the kind decides the expected keys."""
    state = dict(official_state)
    state["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.migc.gamma"] = torch.zeros(1)
    message = _error(tmp_path, state)
    assert "not a valid MIGC++ checkpoint" in message and "unexpected key(s): migc.sac.cbam1" in message


def test_convert_cli_writes_a_safetensors_that_loads_the_same(tmp_path, official_state):
    src = _save_ckpt(official_state, tmp_path / "MIGC_SD14.ckpt")
    dst = str(tmp_path / "MIGC_SD14.safetensors")
    run = subprocess.run([sys.executable, "-m", "lib_migc.convert", src, dst], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_state_dict(dst).keys() == official_state.keys()
    _assert_loaded(load_migc_weights(dst), official_state)


def test_convert_cli_refuses_unsafe_files_unless_trusted(tmp_path, official_state):
    marker = tmp_path / "ran"
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(official_state), "x": _Payload(str(marker))}, src)
    dst = str(tmp_path / "out.safetensors")
    run = subprocess.run([sys.executable, "-m", "lib_migc.convert", str(src), dst], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "not loaded for safety" in run.stderr
    assert not marker.exists() and not os.path.exists(dst)
