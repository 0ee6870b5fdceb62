"""The allow-list unpickler: state dicts come back exactly, anything else is refused by name, and no
code from the file ever runs — whatever torch's own ``weights_only`` would do on the host."""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from helpers import random_official_state
from lib_migc.core import safe_pickle
from lib_migc.core.errors import CheckpointError
from lib_migc.modes.magicfusion.weights import load_unet_state
from lib_migc.modes.migc.checkpoint import load_migc_weights, read_state_dict


class _WritesAFile:
    """Unpickling this with a plain unpickler would create ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def no_torch_load(monkeypatch):
    """Any call of torch's loader fails the test: the safe path must not need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", refuse)


def test_every_dtype_view_and_container_comes_back_exactly(tmp_path, no_torch_load):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    value = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(), "i64": base.long(),
        "u8": base.to(torch.uint8), "bool": base > 5, "view": base[1:, ::2], "transposed": base.t(),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "ordered": collections.OrderedDict(a=torch.ones(1)), "nested": {"list": [1, 2.5, "x"], "tuple": (None, True)},
        "global_step": 470000,
    }
    path = tmp_path / "all.ckpt"
    torch.save(value, path)
    loaded = safe_pickle.load(str(path))
    assert loaded.keys() == value.keys()
    for key, tensor in value.items():
        if isinstance(tensor, torch.Tensor):
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor.detach()), key
    assert isinstance(loaded["ordered"], collections.OrderedDict)
    assert loaded["nested"] == value["nested"] and loaded["global_step"] == 470000


def test_shared_storages_stay_shared(tmp_path):
    base = torch.arange(10.0)
    torch.save({"a": base, "b": base[2:5]}, tmp_path / "shared.pt")
    loaded = safe_pickle.load(str(tmp_path / "shared.pt"))
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert torch.equal(loaded["b"], torch.tensor([2.0, 3.0, 4.0]))


def test_numpy_scalars_from_lightning_checkpoints_load(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": np.int64(7), "loss": np.float32(0.25)}, tmp_path / "l.ckpt",
               pickle_protocol=2)
    loaded = safe_pickle.load(str(tmp_path / "l.ckpt"))
    assert loaded["epoch"] == 7 and loaded["loss"] == np.float32(0.25)


@pytest.mark.parametrize("payload", [_WritesAFile, _RunsAShellCommand])
def test_a_pickle_that_would_run_code_is_refused_by_name_and_runs_nothing(tmp_path, payload, no_torch_load):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": payload(str(marker))}, path)
    with pytest.raises(safe_pickle.UnsafePickleError) as info:
        safe_pickle.load(str(path))
    target = open if payload is _WritesAFile else os.system
    name = f"{target.__module__}.{target.__name__}"  # how pickle names it (io.open, posix.system)
    assert f"'{name}'" in str(info.value)
    assert not marker.exists()


def test_refusal_reaches_every_loader_with_the_global_name(tmp_path, no_torch_load):
    marker = tmp_path / "pwned"
    state = random_official_state(seed=2)
    migc = tmp_path / "MIGC_SD14.ckpt"
    torch.save({"state_dict": state, "hook": _WritesAFile(str(marker))}, migc)
    with pytest.raises(CheckpointError, match=r"refused global 'io\.open'") as info:
        load_migc_weights(str(migc))
    assert "MIGC_SD14.ckpt" in str(info.value) and "--trust" in str(info.value)
    model_b = tmp_path / "b.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "cb": _WritesAFile(str(marker))}, model_b)
    with pytest.raises(CheckpointError, match=r"refused global 'io\.open'") as info:
        load_unet_state(str(model_b))
    assert "b.ckpt" in str(info.value) and ".safetensors" in str(info.value)
    assert not marker.exists()


def test_the_official_layouts_load_through_it_without_torch_load(tmp_path, no_torch_load):
    state = random_official_state(seed=4)
    path = tmp_path / "MIGC_SD14.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = read_state_dict(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert load_migc_weights(str(path)).kind == "migc"
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3), "cond_stage_model.x": torch.ones(1)}
    torch.save({"state_dict": unet, "global_step": 1}, tmp_path / "b.ckpt")
    assert list(load_unet_state(str(tmp_path / "b.ckpt"))) == ["input_blocks.0.0.weight"]


def _rewrite_pickle(path, new_pickle: bytes):
    """The same archive with ``data.pkl`` replaced (a hand-made malicious or malformed record)."""
    with zipfile.ZipFile(path) as src:
        entries = {name: src.read(name) for name in src.namelist()}
    prefix = next(n for n in entries if n.endswith("/data.pkl"))
    entries[prefix] = new_pickle
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in entries.items():
            dst.writestr(name, data)


def test_out_of_bounds_tensor_records_are_refused(tmp_path):
    path = tmp_path / "oob.pt"
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as archive:
        original = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # the same record claiming 1000 elements of a 4-element storage
    assert b"K\x04\x85" in original  # the pickled size tuple (4,)
    _rewrite_pickle(path, original.replace(b"K\x04\x85", b"M\xe8\x03\x85", 1))
    with pytest.raises(safe_pickle.UnsafePickleError, match="malformed tensor record"):
        safe_pickle.load(str(path))


def test_not_a_zip_checkpoint_is_reported_not_unpickled(tmp_path, no_torch_load):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps({"x": _WritesAFile(str(marker))}))
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        read_state_dict(str(path))
    assert not marker.exists()
