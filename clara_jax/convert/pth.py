"""PyTorch `.pth` files (torch.save's zip format) read and written without torch.

    tree = read_pth("adapters.pth")          # nested dicts of numpy arrays
    write_pth("adapters.pth", tree)           # the inverse; torch.load(weights_only=True) reads it

Reading uses a restricted unpickler: the only globals a pickle may name are the tensor-rebuild
functions, the storage types and `collections.OrderedDict`, what torch's `weights_only=True`
admits for a state dict. Any other global (a class, `os.system`, ...) is refused before it is
looked up, so reading runs no code from the file. Tensors come back as numpy arrays (bfloat16
as `ml_dtypes.bfloat16`, which numpy and jax share); `torch.nn.Parameter`s as their data.

The zip archive holds `<name>/data.pkl` (the pickle; each tensor names its storage by a
persistent id `('storage', storage type, key, location, numel)`), `<name>/data/<key>` (the raw
storage bytes), `<name>/byteorder` and `<name>/version`.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import ml_dtypes  # jax's own bfloat16 (jnp.bfloat16 is ml_dtypes.bfloat16)
import numpy as np

# Storage type (as torch pickles it) -> element dtype.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {v: k for k, v in STORAGE_DTYPES.items()}
ALIGN = 64  # torch aligns every storage record to 64 bytes in the archive


class PthError(ValueError):
    """A `.pth` file that is not a plain tensor pickle; the message names the file."""


class _Storage:
    """A storage named by a persistent id: its dtype and its bytes in the archive."""

    def __init__(self, dtype: np.dtype, data: bytes, numel: int):
        self.dtype, self.data, self.numel = dtype, data, numel


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    """The numpy array torch's `_rebuild_tensor_v2` would view: `size` elements of `storage`
    from `offset` with `stride` (in elements), copied out so it owns its memory."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a persistent storage id")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise pickle.UnpicklingError(f"tensor size {size} / stride {stride} / offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel:
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset} "
                                     f"reads past its storage of {storage.numel} elements")
    flat = np.frombuffer(storage.data, storage.dtype, count=storage.numel)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:] if flat.size else flat, size,
                                           tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


# (module, name) -> what it unpickles to. Nothing else is ever looked up.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, records: dict[str, bytes], big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._records, self._big = records, big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"the pickle names the global {module}.{name}; only tensors and their "
                "containers are read (as torch.load(weights_only=True))") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a storage reference")
        key = pid[2]
        if key not in self._storages:
            dtype = STORAGE_DTYPES[pid[1].name]
            data = self._records.get(f"data/{key}")
            if data is None:
                raise pickle.UnpicklingError(f"storage record data/{key} is missing")
            if len(data) < pid[4] * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage data/{key} holds {len(data)} bytes, "
                                             f"fewer than {pid[4]} x {dtype}")
            if self._big and dtype.itemsize > 1:
                data = np.frombuffer(data, dtype.newbyteorder(">"), pid[4]).astype(dtype)
                data = data.tobytes()
            self._storages[key] = _Storage(dtype, data, pid[4])
        return self._storages[key]


def read_pth(path: str | os.PathLike):
    """The object a torch.save zip file holds, with tensors as numpy arrays. Refuses (PthError
    naming the file) a non-zip or legacy file, and any pickle that names a global other than
    the tensor-rebuild ones (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise PthError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise PthError(f"{path}: not a torch.save zip archive (the legacy format, saved with "
                       "_use_new_zipfile_serialization=False, is not read)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise PthError(f"{path}: no single <name>/data.pkl in the archive (not written by "
                           "torch.save)")
        prefix = pkl[0][: -len("data.pkl")]
        records = {n[len(prefix):]: z.read(n) for n in names
                   if n.startswith(prefix + "data/") and not n.endswith("/")}
        data = z.read(pkl[0])
        order = z.read(prefix + "byteorder").decode().strip() if (prefix + "byteorder") in \
            names else "little"
    try:
        return _Unpickler(data, records, order == "big").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
        raise PthError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- writing


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_tuple_of_ints(values) -> bytes:
    return b"(" + b"".join(_op_int(int(v)) for v in values) + b"t"


def _pickle_tree(obj, storages: list[np.ndarray]) -> bytes:
    """Protocol-2 opcodes for a tree of dicts with string keys and numpy-array leaves, in the
    form torch.save gives a state dict: each array a `_rebuild_tensor_v2` of its own storage.
    Written by hand because pickling a reference to `torch._utils` needs torch imported."""
    if isinstance(obj, dict):
        out = b"}"
        if obj:
            out += b"("
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise TypeError(f"dict key {key!r} is not a string")
                out += _op_str(key) + _pickle_tree(value, storages)
            out += b"u"
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype not in _STORAGE_NAMES:
            raise TypeError(f"arrays of dtype {obj.dtype} have no torch storage type")
        key = str(len(storages))
        storages.append(obj)
        strides = [math.prod(obj.shape[i + 1:]) for i in range(obj.ndim)]  # contiguous
        storage = (b"(" + _op_str("storage") + b"ctorch\n" + _STORAGE_NAMES[obj.dtype].encode()
                   + b"\n" + _op_str(key) + _op_str("cpu") + _op_int(obj.size) + b"tQ")
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _op_int(0)
                + _op_tuple_of_ints(obj.shape) + _op_tuple_of_ints(strides)
                + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    raise TypeError(f"cannot write a {type(obj).__name__} to a .pth (dicts and arrays only)")


def write_pth(path: str | os.PathLike, tree: dict) -> Path:
    """Writes `tree` (nested dicts of numpy arrays) as torch.save would: torch.load, with or
    without weights_only, and `read_pth` read it back. Storage records are 64-byte aligned."""
    path = Path(path)
    storages: list[np.ndarray] = []
    data = b"\x80\x02" + _pickle_tree(tree, storages) + b"."
    prefix = path.stem or "archive"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            def put(name: str, payload: bytes, align: bool = False):
                info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                if align:
                    # Local header: 30 bytes + name + extra; pad the extra field (id 0xFFFF,
                    # as torch's writer does) so the data starts on an ALIGN boundary.
                    start = z.fp.tell() + 30 + len(info.filename.encode())
                    pad = -(start + 4) % ALIGN
                    info.extra = struct.pack("<HH", 0xFFFF, pad) + b"Z" * pad
                z.writestr(info, payload)

            put("data.pkl", data)
            put(".format_version", b"1")
            put(".storage_alignment", str(ALIGN).encode())
            put("byteorder", b"little")
            for key, array in enumerate(storages):
                raw = np.ascontiguousarray(array)
                if sys.byteorder == "big":  # the archive says little-endian
                    raw = raw.byteswap()
                put(f"data/{key}", raw.tobytes(), align=True)
            put("version", b"3\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
