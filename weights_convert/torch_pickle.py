"""Read and write PyTorch ``.pth`` checkpoints without importing torch.

Handles the zip format that ``torch.save`` writes since torch 1.6: an archive
``<name>/data.pkl`` (the pickled object graph) plus one raw little-endian record
``<name>/data/<key>`` per tensor storage.

:func:`load_pth` unpickles ``data.pkl`` with an allowlist: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` /
``_rebuild_parameter_with_state`` and the ``torch.<Dtype>Storage`` /
``torch.UntypedStorage`` classes.  They map to local pure-Python rebuilders, so
tensors (and ``nn.Parameter``s) come back as ``numpy.ndarray`` copies with the
saved dtype, shape, strides and storage offset honoured.  Supported dtypes:
float64, float32, float16, bfloat16 (returned as **float32**, since numpy has no
native bfloat16), int64, int32, int16, int8, uint8 and bool.  Everything else
is refused with a one-line :class:`PthError` naming the file, including every
other pickled global (``os.system``, ``builtins.eval``, ...), so nothing in a
file can execute; tensor subclasses, quantized, complex, float8 and
uint16/32/64 tensors; views that read past their storage or hold more elements
than it (overlapping or stride-0, never weights); legacy pre-1.6 (non-zip) files;
big-endian archives; corrupt or truncated zips.

:func:`save_pth` writes nested dicts of arrays in the same layout (pickle
protocol 2, ZIP_STORED, 64-byte aligned records), readable by
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = ["PthError", "load_pth", "save_pth"]


class PthError(ValueError):
    """A ``.pth`` file could not be read or written; the message is one line naming the file."""


# torch storage class name -> numpy dtype name.  UntypedStorage holds raw bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
_DTYPE_STORAGES = {d: s for s, d in _STORAGE_DTYPES.items() if s != "UntypedStorage"}

# pickle of torch's legacy MAGIC_NUMBER, the first bytes of a pre-1.6 torch.save file.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ALIGNMENT = 64
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
# What zipfile raises for damaged archives (EOFError: a member cut short).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError)


def _oneline(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# --------------------------------------------------------------------------- reader


class _StorageType:
    """What ``torch.FloatStorage`` & co. unpickle to: just the element dtype name."""

    __slots__ = ("dtype",)

    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A loaded storage record: a flat little-endian array of its raw element type."""

    __slots__ = ("dtype", "flat")

    def __init__(self, dtype: str, flat: np.ndarray) -> None:
        self.dtype, self.flat = dtype, flat


def _raw_dtype(dtype: str) -> np.dtype:
    # bfloat16 and bool are read as their bit patterns and converted after striding.
    raw = {"bfloat16": "u2", "bool": "u1"}.get(dtype, dtype)
    return np.dtype(raw).newbyteorder("<")


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Pure-numpy stand-in for ``torch._utils._rebuild_tensor_v2``; returns a copy."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor data is a {type(storage).__name__}, not a storage")
    if metadata and any(metadata.values()):
        raise ValueError(f"tensors with conj/neg bits set are not supported ({metadata})")
    shape, strides = tuple(size), tuple(stride)
    ints = (storage_offset, *shape, *strides)
    if len(shape) != len(strides) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise ValueError(f"bad tensor view: offset {storage_offset}, size {size}, stride {stride}")
    flat = storage.flat
    numel = math.prod(shape)
    # Checked before copying: a stride-0 view of one element could otherwise make a few hundred bytes of
    # file allocate gigabytes.  Weights never overlap, so a view cannot hold more elements than its storage.
    if numel > flat.size:
        raise ValueError(
            f"tensor view (size {shape}, stride {strides}) has {numel} elements but its storage only "
            f"{flat.size}: overlapping or stride-0 views are not weights"
        )
    if numel == 0:
        view = flat[:0].reshape(shape)
    else:
        needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        if needed > flat.size:
            raise ValueError(
                f"tensor view (offset {storage_offset}, size {shape}, stride {strides}) "
                f"needs {needed} elements but its storage has {flat.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[storage_offset:], shape, tuple(s * flat.itemsize for s in strides), writeable=False
        )
    if storage.dtype == "bfloat16":
        return (view.astype(np.uint32) << 16).view(np.float32)
    if storage.dtype == "bool":
        return view != 0
    return view.astype(view.dtype.newbyteorder("="))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_REBUILDERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    _REBUILD_TENSOR: _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Fresh wrappers per lookup: a crafted BUILD opcode can then only mutate
        # objects of this load, never the module-level rebuilders.
        if (module, name) in _REBUILDERS:
            return functools.partial(_REBUILDERS[module, name])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        # torch pickles uint16/32/64, float8 and other exotic dtypes via _rebuild_tensor_v3.
        v3 = (module, name) == ("torch._utils", "_rebuild_tensor_v3")
        if v3 or (module == "torch" and name.endswith("Storage")):
            raise PthError(f"unsupported tensor dtype ({module}.{name}) in {self._path}")
        raise PthError(
            f"refusing to unpickle global '{module}.{name}' in {self._path}: "
            "only tensors and dicts are allowed"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthError(f"unknown persistent id {pid!r:.80} in {self._path}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise PthError(f"malformed storage reference {pid!r:.80} in {self._path}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise PthError(
                f"storage {key} is used as both {storage.dtype} and {storage_type.dtype} "
                f"in {self._path}"
            )
        return storage

    def _read_storage(self, key: str, dtype: str, numel: int) -> _Storage:
        info = _record_info(self._zf, f"{self._prefix}data/{key}", self._path)
        raw = _raw_dtype(dtype)
        # Checked before reading, so a bogus numel cannot make us over-read.
        if info.file_size < numel * raw.itemsize:
            raise PthError(
                f"storage record '{info.filename}' in {self._path} has {info.file_size} bytes, "
                f"expected {numel * raw.itemsize} ({numel} x {dtype})"
            )
        data = _read_record(self._zf, info, self._path)
        return _Storage(dtype, np.frombuffer(data, raw, count=numel))


def _record_info(zf: zipfile.ZipFile, name: str, path: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError:
        raise PthError(f"record '{name}' is missing from {path}") from None


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    try:
        return zf.read(info)
    except _ZIP_ERRORS as e:
        raise PthError(f"{path} is a truncated or corrupt zip archive: {_oneline(e)}") from None


def _archive_prefix(zf: zipfile.ZipFile, path: str) -> str:
    """The ``<name>/`` directory holding data.pkl (torch names it after the file)."""
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise PthError(
            f"{path} is a zip but not a torch.save archive ({len(pkls)} '<dir>/data.pkl' records)"
        )
    return pkls[0][: -len("data.pkl")]


def _not_zip_error(path: str) -> PthError:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        return PthError(
            f"{path} is a legacy (pre-1.6, non-zip) torch file, which is not supported; "
            "re-save it with torch>=1.6"
        )
    if head.startswith(b"PK\x03\x04"):
        return PthError(f"{path} is a truncated or corrupt zip archive (no central directory)")
    return PthError(f"{path} is not a zip archive, so not a torch.save (>=1.6) .pth file")


def _load_archive(zf: zipfile.ZipFile, path: str) -> Any:
    prefix = _archive_prefix(zf, path)
    if prefix + "byteorder" in zf.namelist():  # absent in old files, which are little-endian
        byteorder = _read_record(zf, zf.getinfo(prefix + "byteorder"), path)
        if byteorder != b"little":
            raise PthError(
                f"{path} was saved with byteorder {byteorder!r:.20}; "
                "only little-endian is supported"
            )
    pkl = _read_record(zf, zf.getinfo(prefix + "data.pkl"), path)
    unpickler = _Unpickler(pkl, zf, prefix, path)
    try:
        return unpickler.load()
    except PthError:
        raise
    except Exception as e:  # whatever the pickle VM or a rebuilder trips over
        raise PthError(f"cannot unpickle data.pkl in {path}: {_oneline(e)}") from None


def load_pth(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` zip checkpoint; tensors become ``numpy.ndarray`` copies.

    ``OrderedDict``s stay ``OrderedDict``s; bfloat16 tensors are widened to float32.
    Raises :class:`PthError` (a one-line message naming ``path``) on any problem.
    """
    path = os.fspath(path)
    try:
        if not zipfile.is_zipfile(path):  # also False for a missing file
            raise _not_zip_error(path)
        with zipfile.ZipFile(path) as zf:
            return _load_archive(zf, path)
    except FileNotFoundError:
        raise PthError(f"cannot read {path}: no such file") from None
    except OSError as e:
        raise PthError(f"cannot read {path}: {e.strerror or _oneline(e)}") from None
    except _ZIP_ERRORS as e:
        raise PthError(f"{path} is a truncated or corrupt zip archive: {_oneline(e)}") from None


# --------------------------------------------------------------------------- writer


class _PickleWriter:
    """Emits protocol-2 pickle opcodes by hand.

    The standard Pickler can only reference globals it can import, and torch is
    not installed, so ``torch._utils._rebuild_tensor_v2`` and ``torch.FloatStorage``
    are written as raw GLOBAL opcodes.  Arrays are collected into ``storages``.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: list[np.ndarray] = []

    def dump(self, obj: Any) -> bytes:
        self._save(obj)
        self.out += b"."  # STOP
        return bytes(self.out)

    def _global(self, module: str, name: str) -> None:
        self.out += f"c{module}\n{name}\n".encode()

    def _save(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            self.out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, dict):
            self._dict(obj)
        elif isinstance(obj, (list, tuple)):
            self.out += b"(" if isinstance(obj, tuple) else b"]("
            for item in obj:
                self._save(item)
            self.out += b"t" if isinstance(obj, tuple) else b"e"
        elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # also jax.Array
            self._tensor(np.asarray(obj))
        else:
            raise PthError(
                f"cannot save a {type(obj).__name__}: "
                "only dicts, lists, tuples, numbers, strings and arrays"
            )

    def _int(self, value: int) -> None:
        if -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:  # LONG1: little-endian two's complement
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def _dict(self, obj: dict) -> None:
        if isinstance(obj, collections.OrderedDict):
            self._global("collections", "OrderedDict")
            self.out += b")R"  # OrderedDict(), then SETITEMS like the stdlib pickler
        else:
            self.out += b"}"
        if obj:
            self.out += b"("
            for key, value in obj.items():
                self._save(key)
                self._save(value)
            self.out += b"u"

    def _tensor(self, array: np.ndarray) -> None:
        if array.dtype.name not in _DTYPE_STORAGES:
            raise PthError(f"cannot save a {array.dtype} array: unsupported dtype")
        key = str(len(self.storages))
        self.storages.append(array)
        self._global(*_REBUILD_TENSOR)
        self.out += b"(("  # args tuple, then the persistent-id tuple
        self._save("storage")
        self._global("torch", _DTYPE_STORAGES[array.dtype.name])
        for item in (key, "cpu", array.size):
            self._save(item)
        self.out += b"tQ"  # TUPLE, BINPERSID
        contiguous_strides = tuple(math.prod(array.shape[i + 1 :]) for i in range(array.ndim))
        for item in (0, tuple(array.shape), contiguous_strides, False):
            self._save(item)
        self._save(collections.OrderedDict())  # backward hooks, always empty
        self.out += b"tR"  # TUPLE, REDUCE


def _storage_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Store ``data`` with torch's 'FB' padding extra field so it starts 64-byte aligned.

    torch.load(mmap=True) needs the alignment; a plain torch.load does not care.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + extra-field header
    pad = -start % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def save_pth(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` (nested dicts/lists of arrays, numbers and strings) as a torch.save zip.

    Arrays are saved C-contiguous with their dtype (float64/32/16, bfloat16,
    int64/32/16/8, uint8, bool); dict and OrderedDict keep their types.
    Raises :class:`PthError` for unsupported objects or when ``path`` cannot be written.
    """
    path = os.fspath(path)
    writer = _PickleWriter()
    pkl = writer.dump(obj)
    records = [
        ("data.pkl", pkl),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", b"little"),
        *((f"data/{i}", _storage_bytes(a)) for i, a in enumerate(writer.storages)),
        ("version", b"3\n"),
    ]
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in records:
                _write_aligned(zf, f"archive/{name}", data)
    except OSError as e:
        raise PthError(f"cannot write {path}: {e.strerror or _oneline(e)}") from None
