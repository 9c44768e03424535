"""Low-bit model files: bit packing against hand-made streams, the file's codes against the fake quantizer's, the
loaders, and one-line errors for truncated, tampered and foreign files."""

from __future__ import annotations

import json
import re
import runpy
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxquant
from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.lowbit import (fp_bytes, kernel_path, load_lowbit, pack_codes, packed_size, save_lowbit, to_lowbit,
                             unpack_codes)
from jaxquant.quant import QuantRules, fake_quant, flat_bounds, init_bounds, is_weight_site, quantize
from jaxquant.swinir import SwinIR, SwinIRConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 5, 7, 13, 64])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(bits * 100 + count).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (packed_size(count, bits),) == ((count * bits + 7) // 8,)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_packing_is_an_lsb_first_bit_stream():
    # 2 bits: 1, 2, 3 -> bits (1,0), (0,1), (1,1) -> stream 100111 -> byte 0b00111001
    assert pack_codes(np.array([1, 2, 3]), 2).tolist() == [0b00111001]
    # 3 bits: 5, 6, 7 -> (1,0,1), (0,1,1), (1,1,1) -> stream 101011111 -> bytes 0b11110101, 0b00000001
    assert pack_codes(np.array([5, 6, 7]), 3).tolist() == [0b11110101, 0b00000001]
    # 4 bits: 0xA, 0x3 -> low nibble first
    assert pack_codes(np.array([0xA, 0x3]), 4).tolist() == [0x3A]


@pytest.fixture(scope="module")
def quantized(x2_minmax):
    """The x2 model at W3A3 (3-bit codes straddle bytes), MinMax bounds."""
    return x2_minmax(3)


@pytest.fixture(scope="module")
def x2(t291_model):
    return t291_model(2)


@pytest.fixture(scope="module")
def files(quantized, x2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lowbit")
    paths = {"w3": folder / "w3.safetensors", "half": folder / "w3_half.safetensors", "fp": folder / "fp.safetensors"}
    save_lowbit(paths["w3"], quantized)
    save_lowbit(paths["half"], quantized, half=True)
    save_lowbit(paths["fp"], x2)
    return paths


def test_weight_codes_in_the_file_are_the_fake_quant_codes(quantized, files):
    """Against Eq. 1 in numpy float32 (each step rounded as XLA rounds it; round half to even as jnp.round)."""
    lowbit = load_lowbit(files["w3"])
    params, bounds = flatten_dict(quantized.params, sep="/"), flat_bounds(quantized.bounds)
    weight_sites = [site for site in bounds if is_weight_site(site)]
    assert sorted(lowbit.codes) == sorted(weight_sites) and len(weight_sites) == 144
    for site in weight_sites:
        (lower, upper), bits = np.asarray(bounds[site].lu, np.float32), bounds[site].bits
        kernel = np.asarray(params[kernel_path(site)], np.float32)
        step = (upper - lower) / np.float32(2**bits - 1)
        expected = np.round((np.clip(kernel, lower, upper) - lower) / step)
        assert lowbit.codes[site].dtype == np.uint8, site
        np.testing.assert_array_equal(lowbit.codes[site], expected, err_msg=site)


def test_every_dequantized_weight_is_the_fake_quantized_weight(quantized, files):
    params, bounds = flatten_dict(quantized.params, sep="/"), flat_bounds(quantized.bounds)
    loaded = flatten_dict(load_model(files["w3"]).params, sep="/")
    assert set(loaded) == set(params)
    for path, value in params.items():
        site = path.removesuffix("kernel") + "weight"
        expected = fake_quant(jnp.asarray(value), bounds[site].lu, bounds[site].bits) if site in bounds else value
        np.testing.assert_array_equal(loaded[path], np.asarray(expected), err_msg=path)


def test_the_loaded_file_runs_the_same_fake_quant_forward(quantized, files, x2_crop):
    expected = quantize(quantized.params, quantized.bounds, quantized.config)(x2_crop)
    np.testing.assert_array_equal(np.asarray(jaxquant.quantize(str(files["w3"]))(x2_crop)), np.asarray(expected))
    model = load_model(files["w3"])
    assert model.config == quantized.config
    loaded, original = flat_bounds(model.bounds), flat_bounds(quantized.bounds)
    assert set(loaded) == set(original)
    for path, b in original.items():
        assert loaded[path].bits == b.bits == 3, path
        np.testing.assert_array_equal(np.asarray(loaded[path].lu), np.asarray(b.lu), err_msg=path)


def test_half_stores_the_float_remainder_in_float16(quantized, files):
    half, full = load_lowbit(files["half"]), load_lowbit(files["w3"])
    halves, fulls = flatten_dict(half.params, sep="/"), flatten_dict(full.params, sep="/")
    assert set(halves) == set(fulls)
    for path, value in fulls.items():
        assert halves[path].dtype == np.float32, path
        np.testing.assert_array_equal(halves[path], value.astype(np.float16).astype(np.float32), err_msg=path)
    for site, codes in full.codes.items():
        np.testing.assert_array_equal(half.codes[site], codes, err_msg=site)
    assert files["half"].stat().st_size < files["w3"].stat().st_size


def test_an_fp_model_file_holds_plain_float_params(x2, files):
    lowbit = load_lowbit(files["fp"])
    assert lowbit.bounds is None and not lowbit.codes
    model = load_model(files["fp"])
    assert model.bounds is None and model.config == x2.config
    loaded, original = flatten_dict(model.params, sep="/"), flatten_dict(x2.params, sep="/")
    assert set(loaded) == set(original)
    for path, value in original.items():
        np.testing.assert_array_equal(loaded[path], np.asarray(value), err_msg=path)
    with pytest.raises(ValueError, match="is an FP model: it has no bounds"):
        jaxquant.quantize(files["fp"])


def test_the_file_holds_the_colsums_of_the_codes(files):
    tensors, lowbit = load_file(str(files["w3"])), load_lowbit(files["w3"])
    assert tensors["colsums"].dtype == np.uint16
    expected = np.concatenate([codes.astype(np.int64).sum(axis=0) for codes in lowbit.codes.values()])
    np.testing.assert_array_equal(tensors["colsums"], expected)
    for site, codes in lowbit.codes.items():
        np.testing.assert_array_equal(lowbit.colsums[site], codes.astype(np.int64).sum(axis=0), err_msg=site)


def test_a_version_1_file_is_read_with_its_colsums_computed(files, tmp_path):
    """Version 1 had no colsums tensor; its files (written by runs before version 2) still load."""
    with safe_open(str(files["w3"]), framework="numpy") as f:
        metadata = f.metadata() | {"version": "1"}
    tensors = load_file(str(files["w3"]))
    del tensors["colsums"]
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    old, new = load_lowbit(tmp_path / "v1.safetensors"), load_lowbit(files["w3"])
    for site in new.codes:
        np.testing.assert_array_equal(old.codes[site], new.codes[site], err_msg=site)
        np.testing.assert_array_equal(old.colsums[site], new.colsums[site], err_msg=site)


def test_file_size_is_the_packed_codes_plus_the_float_remainder(quantized, files):
    lowbit = load_lowbit(files["w3"])
    codes = sum(packed_size(c.size, 3) for c in lowbit.codes.values())
    colsums = 2 * sum(c.shape[1] for c in lowbit.codes.values())  # uint16
    floats = sum(v.size for v in jax.tree.leaves(lowbit.params))
    data = codes + colsums + 4 * floats + 4 * 2 * len(flat_bounds(quantized.bounds))
    header = struct.unpack("<Q", files["w3"].read_bytes()[:8])[0]
    assert files["w3"].stat().st_size == 8 + header + data


# ----------------------------------------------------------------------------------------------------------
# Bad files


def _rewrite(source: Path, target: Path, edit_header=None, edit_data=None) -> Path:
    """A copy of a safetensors file with its JSON header and/or its data bytes edited."""
    raw = source.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), bytearray(raw[8 + size:])
    if edit_header:
        edit_header(header)
    if edit_data:
        edit_data(header, data)
    text = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))
    return target


def _edit_metadata(key, fn):
    def edit(header):
        header["__metadata__"][key] = json.dumps(fn(json.loads(header["__metadata__"][key])))
    return edit


def _set_padding_bits(header, data):
    start, _ = header["codes"]["data_offsets"]
    data[start + packed_size(36, 3) - 1] |= 0xF0  # the first kernel's 6 x 6 codes of 3 bits end at bit 4 of this byte


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """A W3A3 file of a SwinIR with 6 channels: its 36-value kernels end inside a byte (SwinIR-light's never do:
    a b-bit field cannot hold a code out of range, and padding is the only slack a stream has). Its bounds are
    set, not calibrated: only the file's layout matters here."""
    config = SwinIRConfig(upscale=2, embed_dim=6, depths=(2,), num_heads=(1,), window_size=4)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
    params = SwinIR(config).init(jax.random.PRNGKey(1), x)["params"]
    bounds = init_bounds(config, QuantRules.uniform(3), fill=(-0.1, 0.1))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_lowbit(path, Model(config, params, bounds))
    return path


def _change_a_colsum_by_one(header, data):
    start, _ = header["colsums"]["data_offsets"]
    data[start + 2 * 70] ^= 1  # the low byte of the 71st uint16 colsum: blocks_0's proj has 60, then k's 11th


def _fc1_shape_swapped(packing):
    site = "layers_0/residual_group/blocks_0/mlp/fc1/weight"
    packing["shapes"][site] = packing["shapes"][site][::-1]  # (60, 120) -> (120, 60): as many codes
    return packing


@pytest.mark.parametrize("case, expected", [
    ("truncated", r"not a readable safetensors file"),
    ("foreign", r"not a jaxquant model file"),
    ("codes tampered", r"the codes of layers_0/residual_group/blocks_0/attn/proj/weight have bits set past their last"),
    ("bits edited", r"codes holds \(\d+,\) uint8; the packing metadata needs \(\d+,\) uint8"),
    ("shape edited", r"param layers_0/residual_group/blocks_0/mlp/fc1/kernel has shape \(120, 60\); SwinIR x2 .* "
                     r"needs \(60, 120\)"),
    ("colsum tampered", r"the colsums of layers_0/residual_group/blocks_0/attn/qkv/k/weight are not the sums of "
                        r"its codes"),
    ("version unknown", r"format version '3'; this version reads 1 and 2"),
    ("config edited", r"params do not match|param .* has shape|config depths"),
    ("header garbled", r"not a readable safetensors file"),
    ("bounds not finite", r"bounds of .*: non-finite bounds \[1.0, inf\]"),
])
def test_a_bad_file_is_a_one_line_error_naming_it(files, tiny_file, tmp_path, case, expected):
    source, target = files["w3"], tmp_path / f"{case.replace(' ', '_')}.safetensors"
    if case == "truncated":
        target.write_bytes(source.read_bytes()[:-100])
    elif case == "foreign":
        save_file({"weight": np.zeros((3, 3), np.float32)}, str(target))
    elif case == "codes tampered":
        _rewrite(tiny_file, target, edit_data=_set_padding_bits)
    elif case == "bits edited":
        _rewrite(source, target, _edit_metadata("bits", lambda bits: {site: 4 for site in bits}))
    elif case == "shape edited":
        _rewrite(source, target, _edit_metadata("packing", _fc1_shape_swapped))
    elif case == "colsum tampered":
        _rewrite(source, target, edit_data=_change_a_colsum_by_one)
    elif case == "version unknown":
        _rewrite(source, target, lambda header: header["__metadata__"].update(version="3"))
    elif case == "config edited":
        _rewrite(source, target, _edit_metadata("config", lambda config: config | {"embed_dim": 48}))
    elif case == "header garbled":
        raw = bytearray(source.read_bytes())
        raw[20:24] = b"\x00\x00\x00\x00"
        target.write_bytes(bytes(raw))
    elif case == "bounds not finite":
        def infinite(header, data):
            start, _ = header["bounds"]["data_offsets"]
            data[start:start + 8] = np.array([1.0, np.inf], np.float32).tobytes()
        _rewrite(source, target, edit_data=infinite)
    with pytest.raises(ValueError) as error:
        load_model(target)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{target}: "), message
    assert re.search(expected, message), message


# ----------------------------------------------------------------------------------------------------------
# scripts/export.py


def _export() -> dict:
    """scripts/export.py's globals."""
    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "export.py"))


def test_export_script_writes_a_low_bit_file(quantized, tmp_path, capsys):
    checkpoint = save_model(tmp_path / "w3", quantized)
    out = tmp_path / "model_w3a3.safetensors"
    _export()["main"]([str(checkpoint), "-o", str(out)])
    printed = capsys.readouterr().out
    size, fp = out.stat().st_size, fp_bytes(quantized)
    assert f"{size:,} bytes, {fp / size:.2f}x smaller than the FP params in float32 ({fp:,} bytes)" in printed
    assert fp == 4 * sum(np.size(v) for v in jax.tree.leaves(quantized.params))
    np.testing.assert_array_equal(load_lowbit(out).codes[next(iter(load_lowbit(out).codes))],
                                  to_lowbit(quantized).codes[next(iter(load_lowbit(out).codes))])


@pytest.mark.parametrize("argv, message", [
    (["-o", "model.bin"], r"the extension picks the format, \.pth or \.safetensors"),
    (["-o", "model.pth", "--half"], r"--half is for a \.safetensors file"),
])
def test_export_script_refuses_what_it_cannot_write(quantized, tmp_path, argv, message):
    checkpoint = save_model(tmp_path / "w3", quantized)
    argv = [str(checkpoint), *(str(tmp_path / a) if a.startswith("model.") else a for a in argv)]
    with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
        _export()["main"](argv)


def test_export_script_refuses_half_where_it_moves_set5(quantized, tmp_path, capsys):
    checkpoint = save_model(tmp_path / "w3", quantized)
    out = tmp_path / "half.safetensors"
    script = _export()
    script["main"].__wrapped__.__globals__["half_psnr_shift"] = lambda model, set5: (30.0, 29.99)
    with pytest.raises(SystemExit, match=r"^error: --half moves Set5 PSNR by -0\.0100 dB \(more than 0\.005 dB\)"):
        script["main"]([str(checkpoint), "-o", str(out), "--half"])
    assert "in float32 30.0000 dB, in float16 29.9900 dB (-0.0100 dB)" in capsys.readouterr().out
    assert not out.exists()
