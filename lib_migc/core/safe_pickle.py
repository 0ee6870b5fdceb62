"""Read torch pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) without ever running code from the file.

Why our own unpickler: A1111 v1.10 ships torch 2.1.2 and Forge torch 2.3.1, and ``torch.load(...,
weights_only=True)`` had published bypasses before torch 2.6, so "weights_only" is only as safe as the
host's torch. This reader depends on no torch loader at all: it opens the zip archive ``torch.save``
writes, unpickles ``data.pkl`` with an allow-list of our own, and builds every tensor itself from the raw
storage bytes. Allowed are exactly the names a state dict needs: torch's tensor and parameter rebuild
functions (replaced here by our own implementations), storage types and dtypes (used as markers, never
called), ``collections.OrderedDict`` and plain containers, and numpy scalars (Lightning's
``global_step``) built by a checked reimplementation. Any other global (``os.system``, ``builtins.open``,
a class of a training framework) stops the read with the global's name; nothing it names is imported.

The legacy (pre-1.6, non-zip) and tar formats are refused with a hint: converting such a file once is
the user's call (``python -m lib_migc.convert --trust``).
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
DTYPE_NAMES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside the allow-list (its name is in the message), or is malformed."""


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` & co. unpickle to here: only the element type, nothing callable."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorType:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as named by ``_rebuild_from_type_v2`` (a marker)."""

    name: str


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise UnsafePickleError(f"malformed tensor record: {name} {values!r:.80}")
    return tuple(values)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch's ``_rebuild_tensor_v2`` on a storage of our own: a strided view, bounds checked by torch."""
    if not isinstance(storage, torch.Tensor) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise UnsafePickleError("malformed tensor record: storage or offset")
    size, stride = _check_ints("size", size), _check_ints("stride", stride)
    if len(size) != len(stride):
        raise UnsafePickleError("malformed tensor record: size and stride differ in length")
    try:
        return storage.as_strided(size, stride, storage_offset)
    except RuntimeError as exc:  # out of the storage's bounds
        raise UnsafePickleError(f"malformed tensor record: {str(exc)[:200]}") from None


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
    """``_rebuild_tensor_v3``: an untyped (byte) storage viewed as ``dtype``."""
    if not isinstance(dtype, torch.dtype) or not isinstance(storage, torch.Tensor):
        raise UnsafePickleError("malformed tensor record: dtype")
    try:
        typed = storage.view(torch.uint8).view(dtype)
    except RuntimeError as exc:
        raise UnsafePickleError(f"malformed tensor record: {str(exc)[:200]}") from None
    return _rebuild_tensor_v2(typed, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> torch.Tensor:
    """A parameter comes back as its plain tensor (only the values matter for ``load_state_dict``)."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("malformed parameter record")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """``torch._tensor._rebuild_from_type_v2``: only for plain tensors/parameters rebuilt by the functions above."""
    if func not in _REBUILDER_FUNCTIONS or not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise UnsafePickleError("unsupported tensor subclass record")
    return func(*args)


def _numpy_dtype(name: Any, align: Any = False, copy: Any = True) -> Any:
    import numpy as np

    if not isinstance(name, str):
        raise UnsafePickleError("malformed numpy dtype record")
    dtype = np.dtype(name)
    if dtype.kind not in "biufc":
        raise UnsafePickleError(f"numpy dtype '{name}' is not numeric")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError("malformed numpy scalar record")
    return np.frombuffer(data, dtype=dtype)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol-2 pickles carry bytes (numpy scalars): only text to bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError("malformed bytes record")
    return text.encode(encoding)


_REBUILDERS: dict[str, Callable] = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
}
_REBUILDER_FUNCTIONS = frozenset(_REBUILDERS.values())
_CONTAINERS: dict[str, Any] = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict,
                               "bytearray": bytearray}


def _allowed(module: str, name: str) -> Any:
    """The object a global stands for, or None when it is not on the allow-list."""
    if module == "torch._utils" and name in _REBUILDERS:
        return _REBUILDERS[name]
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if module == "torch" and name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    if (module, name) in (("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter")):
        return _TensorType(name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in _CONTAINERS:
        return _CONTAINERS[name]
    if module in NUMPY_MODULES and name == "scalar":
        return _numpy_scalar
    if module == "numpy" and name == "dtype":
        return _numpy_dtype
    if module == "_codecs" and name == "encode":
        return _codecs_encode
    return None


class _AllowListUnpickler(pickle.Unpickler):
    """``find_class`` answers from the allow-list only; storages come from the archive's data records."""

    def __init__(self, file: io.BufferedIOBase, read_record: Callable[[str], bytes]) -> None:
        super().__init__(file)
        self._read_record = read_record
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name)
        if found is None:
            raise UnsafePickleError(f"refused global '{module}.{name}' (only tensors, storages and plain containers are loaded)")
        return found

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType):
            raise UnsafePickleError(f"unsupported persistent record {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self._storages:
            data = self._read_record(key)
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if not isinstance(numel, int) or len(data) != numel * itemsize:
                raise UnsafePickleError(f"storage {key} holds {len(data)} bytes, not {numel} x {itemsize}")
            flat = torch.frombuffer(bytearray(data), dtype=storage_type.dtype) if data else torch.empty(0, dtype=storage_type.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise UnsafePickleError("not a torch zip checkpoint (no single <name>/data.pkl)")
    return names[0][: -len("data.pkl")]


def load(path: str) -> Any:
    """The object a ``torch.save`` zip archive holds, tensors on the CPU; never executes file contents.

    Raises :class:`UnsafePickleError` (a ``pickle.UnpicklingError``) for a refused global or a malformed
    record, ``zipfile.BadZipFile`` for a file that is not a zip archive (legacy formats included)."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        names = set(archive.namelist())
        order = prefix + "byteorder"
        if order in names and archive.read(order).strip() not in (b"little", b""):
            raise UnsafePickleError("big-endian checkpoints are not supported")
        if sys.byteorder != "little":
            raise UnsafePickleError("loading on a big-endian machine is not supported")

        def read_record(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafePickleError(f"storage record {key} is missing")
            return archive.read(name)

        with archive.open(prefix + "data.pkl") as handle:
            return _AllowListUnpickler(io.BytesIO(handle.read()), read_record).load()


