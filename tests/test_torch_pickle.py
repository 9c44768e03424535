"""Tests for weights_convert.torch_pickle, the torch-free .pth reader/writer."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from weights_convert.torch_pickle import PthError, load_pth, save_pth


def _data_root() -> Path:
    env = os.environ.get("JAXQUANT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def real_pth() -> Path:
    path = _data_root() / "weights" / "swinir_light_x2_t291.pth"
    if not path.is_file():
        pytest.skip(f"real checkpoint not found at {path} (set JAXQUANT_DATA)")
    return path


def _load_error(path) -> str:
    """load_pth(path) must fail with a one-line PthError naming the file."""
    with pytest.raises(PthError) as info:
        load_pth(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


# Hand-written protocol-2 pickle pieces, so the reader is tested independently of the writer.
def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _tensor_pkl(storage: str, numel: int, offset: int, shape, stride) -> bytes:
    """data.pkl of {'x': tensor}, laid out exactly as torch.save writes it."""
    pid = _tuple(_str("storage"), _global("torch", storage), _str("0"), _str("cpu"), _int(numel))
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(
        pid + b"Q", _int(offset), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)), b"\x89", hooks
    )
    return b"\x80\x02}" + _str("x") + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs."


def _archive(path: Path, pkl: bytes, storage: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        if storage is not None:
            zf.writestr("archive/data/0", storage)
    return path


# --------------------------------------------------------------------------- round trip


def test_round_trip_dtypes_and_nesting(tmp_path):
    rng = np.random.default_rng(0)
    obj = {
        "params": collections.OrderedDict(
            f64=rng.standard_normal((2, 3)),
            f32=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            f16=np.array([1.5, -2.25, 65504], np.float16),
            i64=np.arange(-6, 6, dtype=np.int64).reshape(3, 4),
            i32=np.array([2**31 - 1, -(2**31)], np.int32),
            i16=np.array([-300], np.int16),
            i8=np.array([-128, 127], np.int8),
            u8=np.array([0, 255], np.uint8),
            b=np.array([[True, False], [False, True]]),
            scalar=np.array(3.25, np.float32),
            empty=np.zeros((0, 4), np.float32),
        ),
        "nested": {"a": {"b": np.ones(2, np.float32)}, "n": [1, 2.5, "s", None, True, 2**40, -(2**70)]},
    }
    save_pth(tmp_path / "m.pth", obj)
    got = load_pth(tmp_path / "m.pth")

    assert type(got["params"]) is collections.OrderedDict and type(got["nested"]) is dict
    assert list(got["params"]) == list(obj["params"])
    for key, want in obj["params"].items():
        have = got["params"][key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        np.testing.assert_array_equal(have, want)
    np.testing.assert_array_equal(got["nested"]["a"]["b"], [1.0, 1.0])
    assert got["nested"]["n"] == [1, 2.5, "s", None, True, 2**40, -(2**70)]


def test_round_trip_non_contiguous_big_endian_and_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {
        "t": base.T,
        "strided": base[1:, ::2],
        "big_endian": np.arange(5, dtype=">f8"),
        "bf16": np.array([1.5, -3.0, 0.0078125], ml_dtypes.bfloat16),
    }
    save_pth(tmp_path / "m.pth", obj)
    got = load_pth(tmp_path / "m.pth")

    np.testing.assert_array_equal(got["t"], [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]])
    np.testing.assert_array_equal(got["strided"], [[4, 6], [8, 10]])
    assert got["big_endian"].dtype == np.float64 and got["big_endian"].dtype.isnative
    np.testing.assert_array_equal(got["big_endian"], [0, 1, 2, 3, 4])
    assert got["bf16"].dtype == np.float32  # bfloat16 is widened on load
    np.testing.assert_array_equal(got["bf16"], [1.5, -3.0, 0.0078125])


def test_written_layout_matches_torch(tmp_path, real_pth):
    save_pth(tmp_path / "m.pth", {"params": {"w": np.ones((3, 5), np.float32), "i": np.arange(3)}})
    with zipfile.ZipFile(tmp_path / "m.pth") as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == [
            "archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
            "archive/byteorder", "archive/data/0", "archive/data/1", "archive/version",
        ]  # fmt: skip
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert zf.read("archive/byteorder") == b"little"
        assert zf.read("archive/.storage_alignment") == b"64"
        assert zf.read("archive/data/0") == np.ones(15, "<f4").tobytes()
        assert b"ctorch\nFloatStorage\n" in zf.read("archive/data.pkl")
        assert b"ctorch\nLongStorage\n" in zf.read("archive/data.pkl")
    raw = (tmp_path / "m.pth").read_bytes()
    for info in infos:  # torch.load(mmap=True) relies on 64-byte aligned records
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    with zipfile.ZipFile(real_pth) as zf:
        real = {n.split("/", 1)[1] for n in zf.namelist() if "/data/" not in n}
    assert {n.split("/", 1)[1] for n in names if "/data/" not in n} == real - {".data/serialization_id"}


# --------------------------------------------------------------------------- reading


def test_real_checkpoint(real_pth):
    ckpt = load_pth(real_pth)
    assert list(ckpt) == ["params"]
    params = ckpt["params"]
    assert len(params) == 354
    qkv = params["layers.0.residual_group.blocks.0.attn.qkv.weight"]
    assert qkv.shape == (180, 60) and qkv.dtype == np.float32
    assert np.isfinite(qkv).all() and 0.01 < float(qkv.std()) < 1.0
    index = params["layers.0.residual_group.blocks.0.attn.relative_position_index"]
    assert index.shape == (64, 64) and index.dtype == np.int64
    assert index.min() == 0 and index.max() == 224 and index[0, 0] == 112  # (2*8-1)**2 offsets
    assert params["conv_first.weight"].shape == (60, 3, 3, 3)


def test_reader_honours_offset_and_strides(tmp_path):
    flat = np.arange(12, dtype="<f4")
    path = _archive(tmp_path / "v.pth", _tensor_pkl("FloatStorage", 12, 2, (2, 3), (1, 4)), flat.tobytes())
    got = load_pth(path)["x"]
    np.testing.assert_array_equal(got, [[2, 6, 10], [3, 7, 11]])
    assert got.flags.writeable and got.flags.owndata  # a copy, not a view of the file buffer


def test_view_beyond_storage_is_refused(tmp_path):
    pkl = _tensor_pkl("FloatStorage", 6, 1, (2, 3), (3, 1))
    path = _archive(tmp_path / "v.pth", pkl, np.zeros(6, "<f4").tobytes())
    assert "needs 7 elements but its storage has 6" in _load_error(path)


@pytest.mark.parametrize(
    ("numel", "shape", "stride", "elements"),
    [(1, (4000, 4000), (0, 0), 16_000_000), (5, (3, 3), (1, 1), 9)],
    ids=["stride_0_bomb", "overlapping"],
)
def test_view_with_more_elements_than_its_storage_is_refused(tmp_path, numel, shape, stride, elements):
    # A file of a few hundred bytes; the audit's (40000, 40000) bomb allocated 6.4 GB, this one (kept small so
    # that a regression cannot exhaust a CI machine) would allocate 64 MB.
    pkl = _tensor_pkl("FloatStorage", numel, 0, shape, stride)
    path = _archive(tmp_path / "v.pth", pkl, np.zeros(numel, "<f4").tobytes())
    msg = _load_error(path)
    assert f"has {elements} elements but its storage only {numel}: overlapping or stride-0 views" in msg


def test_short_storage_record_is_refused(tmp_path):
    pkl = _tensor_pkl("FloatStorage", 6, 0, (6,), (1,))
    path = _archive(tmp_path / "v.pth", pkl, np.zeros(5, "<f4").tobytes())
    assert "has 20 bytes, expected 24" in _load_error(path)


def test_missing_storage_record_is_refused(tmp_path):
    path = _archive(tmp_path / "v.pth", _tensor_pkl("FloatStorage", 6, 0, (6,), (1,)))
    assert "record 'archive/data/0' is missing" in _load_error(path)


def test_unsupported_dtype_is_refused(tmp_path):
    pkl = _tensor_pkl("ComplexFloatStorage", 2, 0, (2,), (1,))
    path = _archive(tmp_path / "v.pth", pkl, bytes(16))
    assert "unsupported tensor dtype (torch.ComplexFloatStorage)" in _load_error(path)


# --------------------------------------------------------------------------- security


def _touch_command(marker: Path) -> dict[str, str]:
    """The argument that makes os.system / eval create ``marker``."""
    return {"system": f"touch '{marker}'", "eval": f"__import__('pathlib').Path({str(marker)!r}).touch()"}


class _Evil:
    """Pickles (with the stdlib pickler, any protocol) as a call to ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("posix", "system"), ("builtins", "eval")])
def test_malicious_global_is_refused_without_side_effect(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = b"\x80\x02" + _global(module, name) + _str(_touch_command(marker)[name]) + b"\x85R."
    path = _archive(tmp_path / "evil.pth", payload)

    assert f"refusing to unpickle global '{module}.{name}'" in _load_error(path)
    assert not marker.exists()
    pickle.loads(payload)  # control: the same payload is live for a plain unpickler
    assert marker.exists()


def test_malicious_global_hidden_in_tensor_and_stack_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # protocol 4 names os.system (module 'posix') through STACK_GLOBAL instead of GLOBAL
    evil = pickle.dumps({"y": _Evil(f"touch '{marker}'")}, protocol=4)
    assert b"\x93" in evil  # STACK_GLOBAL
    assert "refusing to unpickle global 'posix.system'" in _load_error(_archive(tmp_path / "e4.pth", evil))

    hooks = _global("collections", "OrderedDict") + b")R"
    hidden = _tensor_pkl("FloatStorage", 1, 0, (1,), (1,)).replace(
        hooks, _global("posix", "system") + _str(f"touch '{marker}'") + b"\x85R"
    )
    path = _archive(tmp_path / "evil_hooks.pth", hidden, bytes(4))
    assert "refusing to unpickle global 'posix.system'" in _load_error(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- broken files


def test_truncated_copy_is_refused(tmp_path, real_pth):
    raw = real_pth.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        assert "truncated or corrupt zip" in _load_error(path)


def test_corrupted_storage_bytes_fail_crc(tmp_path, real_pth):
    raw = bytearray(real_pth.read_bytes())
    with zipfile.ZipFile(real_pth) as zf:
        info = zf.getinfo("swinir_light_x2_t291/data/8")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    path = tmp_path / "flipped.pth"
    path.write_bytes(raw)
    assert "Bad CRC-32" in _load_error(path)


def test_non_zip_legacy_and_missing_files_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    assert "is not a zip archive" in _load_error(text)

    legacy = tmp_path / "legacy.pth"  # what torch.save(..., _use_new_zipfile_serialization=False) starts with
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    assert "legacy (pre-1.6, non-zip) torch file" in _load_error(legacy)

    assert "no such file" in _load_error(tmp_path / "absent.pth")


def test_garbage_data_pkl_is_refused(tmp_path):
    msg = _load_error(_archive(tmp_path / "g.pth", b"\x80\x02this is not a pickle"))
    assert msg.startswith("cannot unpickle data.pkl in ")

    with zipfile.ZipFile(tmp_path / "nopkl.pth", "w") as zf:
        zf.writestr("archive/weights.bin", b"1234")
    assert "not a torch.save archive" in _load_error(tmp_path / "nopkl.pth")


def test_save_refuses_unsupported_objects(tmp_path):
    with pytest.raises(PthError, match="cannot save a set"):
        save_pth(tmp_path / "s.pth", {"x": {1, 2}})
    with pytest.raises(PthError, match="unsupported dtype"):
        save_pth(tmp_path / "c.pth", {"x": np.zeros(2, np.complex64)})
    assert not (tmp_path / "s.pth").exists() and not (tmp_path / "c.pth").exists()


# --------------------------------------------------------------------------- real torch


def test_cross_check_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    base = torch.randn(5, 6)
    tensors = {
        **{f"sd.{k}": v for k, v in model.state_dict().items()},
        **{f"param.{k}": v for k, v in model.named_parameters()},  # nn.Parameter pickles differently
        "t": base.t(), "slice": base[1:, 2::2], "f16": torch.randn(3).half(), "i64": torch.arange(-3, 3),
        "bool": torch.tensor([True, False]), "u8": torch.tensor([7, 255], dtype=torch.uint8),
    }  # fmt: skip
    torch.save({"params": tensors}, tmp_path / "torch.pth")
    got = load_pth(tmp_path / "torch.pth")["params"]
    for key, tensor in tensors.items():
        want = tensor.detach().numpy()
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want)

    ours = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).T, "i": np.arange(4), "h": np.ones(2, np.float16)}
    save_pth(tmp_path / "ours.pth", {"params": ours})
    loaded = torch.load(tmp_path / "ours.pth", weights_only=True)["params"]
    for key, array in ours.items():
        np.testing.assert_array_equal(loaded[key].numpy(), array)
        assert loaded[key].numpy().dtype == array.dtype
