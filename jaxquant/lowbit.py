"""Low-bit model files: packed weight codes, every site's bounds and the float params in one safetensors file.

2DQuant (Liu et al., NeurIPS 2024) reports compression ratios of a W4/W3/W2 SwinIR-light; this makes them real
bytes. A quantized weight is stored as its b-bit codes (the fake quantizer's, `quant.integer_view`), packed
densely: an LSB-first bit stream (value i, bit j at stream bit i*b + j) in uint8, ceil(n*b/8) bytes for n values.

    save_lowbit("model_w2a2.safetensors", model)          # model: a `checkpoint.Model` with bounds, or FP
    lowbit = load_lowbit("model_w2a2.safetensors")        # codes, bounds, float params
    model = lowbit.dequantized()                          # a `Model` for the FP / fake-quant forward

Tensors:
    param/<path>    every float param but the quantized weights ('/'-joined Flax path; float32, or float16 with
                    `half`, read back as float32)
    codes           every quantized weight's packed codes, one stream after another (each from a byte boundary),
                    in the order of the `packing` metadata
    colsums         each quantized weight's codes summed over its input axis (one per output; the integer
                    forward's colsum(q_w), `jaxquant.integer`), one weight after another in the same order; uint16
                    (uint32 where a sum exceeds 65535: K (2^b - 1) does not for SwinIR-light, K <= 120)
    bounds          every site's [l, u], (sites, 2) float32, rows in the order of the `bits` metadata
Metadata (safetensors' string -> string): `format`, `version`, and JSON `config`, `bits` ({site: b}) and
`packing` ({"order": "lsb-first", "shapes": {weight site: kernel shape}}). No pickle anywhere: a JSON header and
raw bytes. One tensor for the codes and one for the bounds keep the header small: a tensor per site made it
139 KB, a sixth of a W2 file with a float16 remainder. The colsums cost 20 KB (3% of that file); a reader can
use them as they are. This one checks them against the codes (a numpy sum as the codes are unpacked, about a
millisecond): a wrong colsum would shift every output of its layer by l_x s_w times the error and still run.
Version 1 files (no colsums) are read with the colsums computed from their codes.

Reading checks everything against the config before anything uses it (a truncated, tampered or foreign file is
one ValueError naming what is wrong): the header and its metadata, the config, each bit width, the tensor names,
dtypes and shapes (every param's and kernel's against the config), the codes' length and zero padding after each
weight's last code, colsums equal to the codes' sums, finite bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jaxquant import models
from jaxquant.checkpoint import Model
from jaxquant.quant import (Bounds, check_bits, check_finite_pair, flat_bounds, integer_affine, integer_view,
                            is_weight_site, nest_bounds)

FORMAT = "jaxquant-lowbit"
VERSION = 2  # 2 added `colsums`
READABLE_VERSIONS = ("1", "2")


# ----------------------------------------------------------------------------------------------------------
# Bit packing


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """`codes` (any shape, values in [0, 2^bits - 1]) as a dense LSB-first stream of ceil(n*bits/8) uint8 bytes."""
    flat = np.asarray(codes, np.uint8).reshape(-1)
    stream = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits): bit j of value i
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` codes of a `pack_codes` stream, as uint8."""
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# ----------------------------------------------------------------------------------------------------------
# The model in low-bit form


def column_sums(codes: np.ndarray) -> np.ndarray:
    """A kernel's codes (in, out) summed over the input axis: (out,) int32."""
    return np.sum(codes, axis=0, dtype=np.int32)


def kernel_path(site: str) -> str:
    """The param a weight site quantizes: '.../q/weight' -> '.../q/kernel' (`swinir.QuantDense`)."""
    return site.removesuffix("weight") + "kernel"


class LowBitModel(NamedTuple):
    """A model as the file holds it: `params` without the quantized kernels (float32), and each quantized kernel
    as its uint8 `codes` (the kernel's shape) and their `colsums` (`column_sums`) by weight site."""

    config: models.ModelConfig
    params: Mapping
    codes: Mapping[str, np.ndarray]
    colsums: Mapping[str, np.ndarray]
    bounds: Mapping | None  # None: the FP model

    def dequantized(self) -> Model:
        """The `Model` with each quantized kernel as codes * s + l: the fake-quantized kernel, which the fake
        quantizer maps back onto the same codes."""
        flat, bounds = flatten_dict(self.params, sep="/"), flat_bounds(self.bounds or {})
        for site, codes in self.codes.items():
            scale, offset = integer_affine(bounds[site].lu, bounds[site].bits)
            flat[kernel_path(site)] = np.asarray(jnp.asarray(codes, jnp.float32) * scale + offset)
        return Model(self.config, unflatten_dict(flat, sep="/"), self.bounds)


def to_lowbit(model: Model) -> LowBitModel:
    """`model` with its quantized weights as codes (exactly the fake quantizer's), the rest as it is."""
    flat = {path: np.asarray(v, np.float32) for path, v in flatten_dict(model.params, sep="/").items()}
    codes = {}
    for site, b in flat_bounds(model.bounds or {}).items():
        if is_weight_site(site):
            codes[site] = np.asarray(integer_view(jnp.asarray(flat.pop(kernel_path(site))), b.lu, b.bits)[0])
    colsums = {site: column_sums(c) for site, c in codes.items()}
    return LowBitModel(model.config, unflatten_dict(flat, sep="/"), codes, colsums, model.bounds)


# ----------------------------------------------------------------------------------------------------------
# The file


def save_lowbit(path: str | Path, model: Model | LowBitModel, *, half: bool = False) -> int:
    """Write `model` (a `Model`, quantized or FP, or a `LowBitModel`) as a low-bit safetensors file; `half` stores
    the float params in float16. Returns the file's size in bytes."""
    lowbit = model if isinstance(model, LowBitModel) else to_lowbit(model)
    float_dtype = np.float16 if half else np.float32
    # contiguous: safetensors writes a strided view's buffer as it lies in memory
    tensors = {f"param/{p}": np.ascontiguousarray(v, float_dtype)
               for p, v in flatten_dict(lowbit.params, sep="/").items()}
    bounds = flat_bounds(lowbit.bounds or {})
    bits = {site: b.bits for site, b in bounds.items()}
    if bounds:
        tensors["bounds"] = np.stack([np.asarray(b.lu, np.float32) for b in bounds.values()])
    if lowbit.codes:
        tensors["codes"] = np.concatenate([pack_codes(c, bits[site]) for site, c in lowbit.codes.items()])
        colsums = np.concatenate([lowbit.colsums[site] for site in lowbit.codes])
        tensors["colsums"] = colsums.astype(np.uint16 if colsums.max() <= np.iinfo(np.uint16).max else np.uint32)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(models.config_to_json(lowbit.config)),
        "bits": json.dumps(bits),
        "packing": json.dumps({"order": "lsb-first", "shapes": {s: list(c.shape) for s, c in lowbit.codes.items()}}),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path).stat().st_size


def load_lowbit(path: str | Path) -> LowBitModel:
    """The low-bit model in a file `save_lowbit` wrote, every part checked (module docstring); a file that fails
    a check is one ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        return _read(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _read(path: Path) -> LowBitModel:
    metadata = _read_metadata(path)
    has_colsums = metadata["version"] != "1"
    config = models.config_from_json(_json_field(metadata, "config"))
    bits = _json_field(metadata, "bits")
    packing = _json_field(metadata, "packing")
    if not isinstance(bits, dict) or not isinstance(packing, dict) or packing.get("order") != "lsb-first":
        raise ValueError("metadata bits or packing is not what this version writes")
    for site, width in bits.items():
        check_bits(width, where=site)
    shapes = packing.get("shapes")
    if not isinstance(shapes, dict) or set(shapes) != {s for s in bits if is_weight_site(s)}:
        raise ValueError("packing shapes do not name exactly the quantized weight sites")

    tensors = load_file(str(path))
    params = {name.removeprefix("param/"): v for name, v in tensors.items() if name.startswith("param/")}
    expected = {"bounds"} if bits else set()
    expected |= ({"codes", "colsums"} if has_colsums else {"codes"}) if shapes else set()
    others = set(tensors) - {f"param/{name}" for name in params}
    if others != expected:
        raise ValueError(f"tensors {sorted(others)} besides the params; the metadata implies {sorted(expected)}")
    for name, value in params.items():
        if value.dtype not in (np.float16, np.float32):
            raise ValueError(f"param/{name} is {value.dtype}, not float16 or float32")
    flat_params = {name: value.astype(np.float32) for name, value in params.items()}
    bounds = _bounds(tensors["bounds"], bits) if bits else None
    codes = _unpack_all(tensors["codes"], shapes, bits) if shapes else {}
    # Kernels back in their place (as zeros: only their shapes are checked), so the whole tree fits the config.
    full = flat_params | {kernel_path(s): np.zeros(c.shape, np.float32) for s, c in codes.items()}
    if len(full) != len(flat_params) + len(codes):
        raise ValueError("a quantized kernel is also stored as a float param")
    models.check_params(config, unflatten_dict(full, sep="/"))
    colsums = {site: column_sums(c) for site, c in codes.items()}
    if has_colsums and shapes:
        _check_colsums(tensors["colsums"], colsums)
    return LowBitModel(config, unflatten_dict(flat_params, sep="/"), codes, colsums, bounds)


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a jaxquant model file (safetensors without {FORMAT!r} metadata)")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"format version {metadata.get('version')!r}; this version reads "
                         f"{' and '.join(READABLE_VERSIONS)}")
    return metadata


def _json_field(metadata: Mapping[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"metadata {key!r} is missing or not JSON ({e})") from None


def _bounds(lus: np.ndarray, bits: dict[str, int]) -> dict:
    """The bounds pytree from the (sites, 2) float32 tensor, rows in the order of the `bits` metadata."""
    if lus.dtype != np.float32 or lus.shape != (len(bits), 2):
        raise ValueError(f"bounds holds {lus.shape} {lus.dtype}; the bits metadata names {len(bits)} sites: "
                         f"({len(bits)}, 2) float32")
    for site, lu in zip(bits, lus):  # crossed bounds load as saved, as a checkpoint's (`quant.integer_affine`)
        check_finite_pair(lu, where=f"bounds of {site}")
    return nest_bounds({site: Bounds(jnp.asarray(lu), bits[site]) for site, lu in zip(bits, lus)})


def _unpack_all(stream: np.ndarray, shapes: dict, bits: dict[str, int]) -> dict[str, np.ndarray]:
    """Each weight site's codes from the concatenated packed streams (each starting on a byte), checked: the
    shapes, the stream's length, zero padding after each site's last code."""
    for site, shape in shapes.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
            raise ValueError(f"packing shape of {site} is {shape!r}, not [in, out]")
    sizes = [packed_size(math.prod(shape), bits[site]) for site, shape in shapes.items()]
    if stream.dtype != np.uint8 or stream.shape != (sum(sizes),):
        raise ValueError(f"codes holds {stream.shape} {stream.dtype}; the packing metadata needs ({sum(sizes)},) uint8")
    codes, start = {}, 0
    for (site, shape), size in zip(shapes.items(), sizes):
        packed, start = stream[start:start + size], start + size
        count = math.prod(shape)
        if np.unpackbits(packed[-1:], bitorder="little")[count * bits[site] - 8 * (size - 1):].any():
            raise ValueError(f"the codes of {site} have bits set past their last code (tampered?)")
        codes[site] = unpack_codes(packed, bits[site], count).reshape(shape)
    return codes


def _check_colsums(stored: np.ndarray, computed: Mapping[str, np.ndarray]) -> None:
    """The stored colsums (one weight after another) against the sums of the codes as unpacked."""
    count = sum(c.size for c in computed.values())
    if stored.dtype not in (np.uint16, np.uint32) or stored.shape != (count,):
        raise ValueError(f"colsums holds {stored.shape} {stored.dtype}; the packing metadata needs ({count},) uint16 "
                         "or uint32")
    start = 0
    for site, sums in computed.items():
        if not np.array_equal(stored[start:start + sums.size], sums):
            raise ValueError(f"the colsums of {site} are not the sums of its codes (tampered?)")
        start += sums.size


# ----------------------------------------------------------------------------------------------------------
# Sizes and the float16 remainder

HALF_PSNR_TOLERANCE = 0.005  # dB of Set5 PSNR a float16 remainder may move a model by


def fp_bytes(model: Model | LowBitModel) -> int:
    """Bytes of the model's FP params in float32 (every kernel a float): what the compression ratio divides."""
    floats = sum(np.size(v) for v in jax.tree.leaves(model.params))
    return 4 * (floats + sum(np.size(c) for c in getattr(model, "codes", {}).values()))


def with_half_remainder(lowbit: LowBitModel) -> LowBitModel:
    """`lowbit` as a `half` file holds it: the float params rounded to float16 (and read back as float32)."""
    return lowbit._replace(params=jax.tree.map(lambda v: np.asarray(v, np.float16).astype(np.float32), lowbit.params))


def half_psnr_shift(model: Model, set5) -> tuple[float, float]:
    """Set5 PSNR of `model` as a low-bit file holds it with a float32 and with a float16 remainder (the forward
    `evaluate` runs: fake-quant, or FP without bounds). `set5`: `data.load_benchmark(root, "Set5", scale)`."""
    from jaxquant.evaluation import evaluate  # which imports this module through jaxquant.integer

    lowbit = to_lowbit(model)
    return tuple(evaluate(m.dequantized(), {"Set5": set5}, show_progress=False)["Set5"]["psnr"]
                 for m in (lowbit, with_half_remainder(lowbit)))
