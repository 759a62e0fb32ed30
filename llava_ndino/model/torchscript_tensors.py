"""Read the tensors of a TorchScript archive without running it.

OpenAI released its CLIP checkpoints (ViT-L/14-336 included) as TorchScript archives, whose normal
loader, ``torch.jit.load``, compiles and runs the archive's code: a crafted file runs whatever it
holds. This reader opens the zip, unpickles ``data.pkl`` with an allow-list (tensor rebuilders,
storage types, ``OrderedDict``; TorchScript classes become inert attribute holders) and reads the
storages' raw bytes. Anything else in the pickle (``os.system``, ``builtins.eval``, ...) is refused.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch._utils

_TENSOR_REBUILDERS = {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}


class UnsafeArchiveError(ValueError):
    """The archive asks for something other than tensors and inert module objects."""


class _ScriptObject:
    """Stands for a TorchScript module or object: keeps its attributes, has no behaviour."""

    def __setstate__(self, state: object) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _TensorsOnly(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise UnsafeArchiveError(f"refused {module}.{name}: a weights archive may hold tensors only")

    def persistent_load(self, pid: tuple) -> torch.TypedStorage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise UnsafeArchiveError(f"unknown persistent id {kind!r}")
        with warnings.catch_warnings():  # TypedStorage is what the rebuilders take, deprecated or not
            warnings.simplefilter("ignore", UserWarning)
            dtype = storage_type.dtype
        raw = self.archive.read(f"{self.root}/data/{key}")
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        if untyped.nbytes() != numel * torch.empty((), dtype=dtype).element_size():
            raise UnsafeArchiveError(f"storage {key}: {untyped.nbytes()} bytes for {numel} {dtype} values")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _flatten(value: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix.rstrip(".")] = value.detach().clone()
    elif isinstance(value, _ScriptObject):
        for name, attribute in getattr(value, "attributes", {}).items():
            _flatten(attribute, f"{prefix}{name}.", out)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl`` beside ``data.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The module's tensors by dotted attribute name (as ``state_dict()`` names them), read as data."""
    with zipfile.ZipFile(path) as archive:
        data = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(data) != 1:
            raise UnsafeArchiveError(f"{path}: expected one data.pkl at the archive's top level")
        root = data[0].split("/", 1)[0]
        module = _TensorsOnly(archive.read(data[0]), archive, root).load()
    state: dict[str, torch.Tensor] = {}
    _flatten(module, "", state)
    return state
