"""PyTorch SwinIR state dict <-> jaxquant Flax params, by an explicit key table.

Handles the official SwinIR / 2DQuant layout (`swinir_arch.py`): `{"params": sd}`, `{"params_ema": sd}` or a
bare state dict, with or without a `module.` prefix (DataParallel) and with or without the derived buffers
`relative_position_index` and `attn_mask` (checked against their recomputed values, then dropped).
Refuses everything else by name: missing keys, leftover keys, wrong shapes (checked in one pass against the
shapes the inferred config implies), non-string keys, zero-size, non-float or non-finite weights, and state dicts
that are not SwinIR.

Transposes by rule: Linear weight (out, in) -> kernel (in, out); Conv2d weight (out, in, kh, kw) -> kernel
(kh, kw, in, out); the qkv Linear is split row-wise into the q, k, v linears (rows 0:C, C:2C, 2C:3C).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import re
from typing import Iterator

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant.swinir import (SwinIRConfig, describe, mlp_ratio_for, param_shapes, relative_position_index,
                             shifted_window_mask)


class ConversionError(ValueError):
    """A state dict that cannot be converted; the message is one line naming the offending keys."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor and the Flax leaves it becomes (three for the split qkv linear)."""

    torch_key: str
    flax_paths: tuple[str, ...]
    kind: str  # "linear" | "conv" | "vector"


def _to_flax(kind: str, t: np.ndarray) -> np.ndarray:
    if kind == "linear" and t.ndim == 2:
        return t.T
    if kind == "conv":
        return t.transpose(2, 3, 1, 0)
    return t


def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear" and a.ndim == 2:
        return a.T
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    return a


def key_table(config: SwinIRConfig) -> list[Entry]:
    """Every parameter of SwinIR under `config`, PyTorch name first."""
    table = []

    def conv(torch_name, flax_name):
        table.extend(
            [Entry(f"{torch_name}.weight", (f"{flax_name}/kernel",), "conv"),
             Entry(f"{torch_name}.bias", (f"{flax_name}/bias",), "vector")]
        )

    def norm(torch_name, flax_name):
        table.extend(
            [Entry(f"{torch_name}.weight", (f"{flax_name}/scale",), "vector"),
             Entry(f"{torch_name}.bias", (f"{flax_name}/bias",), "vector")]
        )

    def linear(torch_name, flax_names):
        table.extend(
            [Entry(f"{torch_name}.weight", tuple(f"{n}/kernel" for n in flax_names), "linear"),
             Entry(f"{torch_name}.bias", tuple(f"{n}/bias" for n in flax_names), "linear")]
        )

    conv("conv_first", "conv_first")
    norm("patch_embed.norm", "patch_embed_norm")
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            t, f = f"layers.{i}.residual_group.blocks.{j}", f"layers_{i}/residual_group/blocks_{j}"
            norm(f"{t}.norm1", f"{f}/norm1")
            table.append(
                Entry(f"{t}.attn.relative_position_bias_table", (f"{f}/attn/relative_position_bias_table",), "vector")
            )
            linear(f"{t}.attn.qkv", tuple(f"{f}/attn/qkv/{n}" for n in "qkv"))
            linear(f"{t}.attn.proj", (f"{f}/attn/proj",))
            norm(f"{t}.norm2", f"{f}/norm2")
            linear(f"{t}.mlp.fc1", (f"{f}/mlp/fc1",))
            linear(f"{t}.mlp.fc2", (f"{f}/mlp/fc2",))
        conv(f"layers.{i}.conv", f"layers_{i}/conv")
    norm("norm", "norm")
    conv("conv_after_body", "conv_after_body")
    if config.upsampler == "pixelshuffledirect":
        conv("upsample.0", "upsample_0")
    else:
        conv("conv_before_upsample.0", "conv_before_upsample_0")
        steps = 1 if config.upscale == 3 else int(math.log2(config.upscale))
        for k in range(steps):
            conv(f"upsample.{2 * k}", f"upsample_{2 * k}")
        conv("conv_last", "conv_last")
    return table


# ----------------------------------------------------------------------------------------------------------
# Reading the container


def unwrap_state_dict(obj, param_key: str | None = None) -> dict[str, np.ndarray]:
    """The state dict inside a loaded `.pth`: `obj[param_key]`, `params`, `params_ema`, or `obj` itself."""
    if not isinstance(obj, dict):
        raise ConversionError(f"expected a dict at the top of the file, found {type(obj).__name__}")
    keys = [param_key] if param_key else ["params", "params_ema"]
    for key in keys:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    else:
        if param_key:
            raise ConversionError(f"no {param_key!r} entry; top-level keys: {_preview(obj)}")
    sd = {}
    for k, v in obj.items():
        _check_entry(k, v)
        key = k[len("module."):] if k.startswith("module.") else k
        if key in sd:
            raise ConversionError(f"both {key!r} and 'module.{key}': which one is the weight?")
        sd[key] = v
    return sd


def _check_entries(sd: dict) -> None:
    """Every entry passes `_check_entry` (checked before inference, which reads keys and shapes)."""
    for k, v in sd.items():
        _check_entry(k, v)


def _check_entry(key, value) -> None:
    """A state dict entry is a string key and a tensor with no zero-size dimension."""
    if not isinstance(key, str):
        raise ConversionError(f"key {key!r} ({type(key).__name__}) is not a string; is this a state dict?")
    if not isinstance(value, np.ndarray):
        raise ConversionError(f"entry {key!r} is a {type(value).__name__}, not a tensor; is this a state dict?")
    if 0 in value.shape:
        raise ConversionError(f"{key!r} has shape {value.shape}, with a zero-size dimension")


def _preview(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------------------
# Config inference


# Dimension names of the tensors inference reads: their count is the rank the tensor must have.
_CONV = ("out", "in", "kh", "kw")
_LINEAR = ("out", "in")
_BIAS_TABLE = ("(2*window-1)**2", "heads")


def infer_config(sd: dict[str, np.ndarray]) -> SwinIRConfig:
    """SwinIR hyper-parameters read off the tensor shapes (img_range is not stored: SwinIR's 1.0)."""
    _check_entries(sd)
    table0 = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
    missing = [k for k in ("conv_first.weight", table0) if k not in sd]
    if missing:
        raise ConversionError(f"not a SwinIR state dict: no {missing[0]!r} (keys: {_preview(sd)})")
    if "layers.0.residual_group.blocks.0.attn.qkv.weight" not in sd:
        raise ConversionError("not a plain SwinIR state dict: no fused 'attn.qkv.weight' (a quantized model?)")
    embed_dim, in_chans = _dims(sd, "conv_first.weight", _CONV)[:2]
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    depths, heads = [], []
    for i in range(len(stages)):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        heads.append(_dims(sd, f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table", _BIAS_TABLE)[1])
    table_rows = sd[table0].shape[0]
    window = (math.isqrt(table_rows) + 1) // 2
    if (2 * window - 1) ** 2 != table_rows:
        raise ConversionError(
            f"{table0!r} has shape {sd[table0].shape}; SwinIR needs ((2*window-1)**2, heads), e.g. (225, {heads[0]})"
        )
    mlp_hidden = _mlp_hidden(sd)
    # The layout is told by its key prefixes, so that a missing conv is named rather than the layout refused.
    if any(k.startswith("conv_before_upsample.") for k in sd):
        num_feat = _dims(sd, "conv_before_upsample.0.weight", _CONV)[0]
        convs = {"upsample.0.weight"} | {k for k in sd if re.fullmatch(r"upsample\.\d+\.weight", k)}
        upsampler, scale = "pixelshuffle", math.prod(_shuffle_factor(sd, k, num_feat) for k in sorted(convs))
    elif any(k.startswith("upsample.") for k in sd):
        num_feat, upsampler = 64, "pixelshuffledirect"
        scale = _shuffle_factor(sd, "upsample.0.weight", in_chans)
    else:
        raise ConversionError(
            "SwinIR without a supported upsampler: no 'upsample.*' keys (pixelshuffledirect) "
            "nor 'conv_before_upsample.*' keys (pixelshuffle)"
        )
    try:
        return SwinIRConfig(
            upscale=scale, in_chans=int(in_chans), embed_dim=int(embed_dim), depths=tuple(depths),
            num_heads=tuple(int(h) for h in heads), window_size=window, mlp_ratio=mlp_ratio_for(mlp_hidden, embed_dim),
            upsampler=upsampler, num_feat=int(num_feat),
        )
    except ValueError as e:
        raise ConversionError(f"inconsistent SwinIR shapes: {e}") from None


def _dims(sd: dict[str, np.ndarray], key: str, layout: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of `sd[key]`, which inference reads, so it must be there with one dimension per `layout` name."""
    if key not in sd:
        raise ConversionError(f"missing {key!r}, which every SwinIR state dict has")
    shape = sd[key].shape
    if len(shape) != len(layout):
        raise ConversionError(f"{key!r} has shape {shape}; SwinIR needs {len(layout)} dimensions ({', '.join(layout)})")
    return shape


def _mlp_hidden(sd: dict[str, np.ndarray]) -> int:
    """The MLP width most of the tensors that carry it agree on (fc1 rows and bias, fc2 columns, in every block):
    read off a single tensor, one damaged tensor would make the shape check blame its intact neighbours."""
    _dims(sd, "layers.0.residual_group.blocks.0.mlp.fc1.weight", _LINEAR)  # there, and a matrix
    carriers = ((r"fc1\.weight", 0), (r"fc1\.bias", 0), (r"fc2\.weight", 1))  # (tensor, axis of the width)
    widths = collections.Counter(
        v.shape[axis] for k, v in sd.items() for name, axis in carriers
        if v.ndim > axis and re.fullmatch(rf"layers\.\d+\.residual_group\.blocks\.\d+\.mlp\.{name}", k)
    )
    return widths.most_common(1)[0][0]


def _shuffle_factor(sd: dict[str, np.ndarray], key: str, channels: int) -> int:
    """The factor r of the PixelShuffle after conv `key`, which outputs `channels` * r**2 channels."""
    out = _dims(sd, key, _CONV)[0]
    r = math.isqrt(out // channels)
    if r < 1 or r * r * channels != out:
        raise ConversionError(
            f"{key!r} has shape {sd[key].shape}; a PixelShuffle conv outputs {channels} * r**2 channels"
        )
    return r


# ----------------------------------------------------------------------------------------------------------
# Conversion


@contextlib.contextmanager
def naming_source(source) -> Iterator[None]:
    """Prefix conversion errors with the file they came from: the converter sees only the state dict."""
    try:
        yield
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None


def torch_shapes(config: SwinIRConfig, flax_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of SwinIR's parameters, from their Flax shapes (the split qkv stacked back row-wise)."""
    shapes = {}
    for e in key_table(config):
        rows, *rest = _to_torch(e.kind, np.broadcast_to(np.float32(0), flax_shapes[e.flax_paths[0]])).shape
        shapes[e.torch_key] = (rows * len(e.flax_paths), *rest)
    return shapes


def _check_dropped_buffer(key: str, value: np.ndarray, window: int) -> None:
    if key.endswith("relative_position_index"):
        expected = relative_position_index(window)
    elif value.ndim != 3:
        area = window * window
        raise ConversionError(f"buffer {key!r} has shape {value.shape}; window {window} needs (windows, {area}, {area})")
    else:  # attn_mask of a shifted block, built by the official code for its training resolution
        side = math.isqrt(value.shape[0]) * window
        expected = shifted_window_mask(side, side, window, window // 2)
    if value.shape != expected.shape:
        raise ConversionError(f"buffer {key!r} has shape {value.shape}; window {window} needs {expected.shape}")
    if not np.array_equal(value, expected):
        raise ConversionError(f"buffer {key!r} does not match the SwinIR it belongs to")


def _finite(key: str, tensor: np.ndarray) -> np.ndarray:
    if not np.isfinite(tensor).all():
        raise ConversionError(f"{key!r} holds NaN or infinite values; a model with them computes nothing")
    return tensor


def torch_to_flax(sd: dict[str, np.ndarray], config: SwinIRConfig | None = None) -> tuple[SwinIRConfig, dict]:
    """Convert a PyTorch SwinIR state dict to `(config, params)`; every key, shape and value is checked."""
    _check_entries(sd)
    config = config or infer_config(sd)
    flax_shapes = param_shapes(config)
    shapes = torch_shapes(config, flax_shapes)
    dropped = [k for k in sd if k.endswith(("relative_position_index", "attn_mask"))]
    leftover = sorted(set(sd) - set(shapes) - set(dropped))
    missing = sorted(set(shapes) - set(sd))
    if missing or leftover:
        raise ConversionError(
            f"state dict does not match {describe(config)}: "
            + "; ".join(p for p in (missing and f"missing {_preview(missing)}", leftover and f"unexpected {_preview(leftover)}") if p)
        )
    for key, shape in shapes.items():
        if sd[key].shape != shape:
            raise ConversionError(f"{key!r} has shape {sd[key].shape}; {describe(config)} needs {shape}")
        if not np.issubdtype(sd[key].dtype, np.floating):  # the int64 buffers are dropped, not weights
            raise ConversionError(f"{key!r} is {sd[key].dtype}; SwinIR weights are floating point")
    for k in dropped:
        _check_dropped_buffer(k, sd[k], config.window_size)
    flat = {}
    for e in key_table(config):
        tensor = _finite(e.torch_key, np.asarray(sd[e.torch_key], np.float32))
        parts = np.split(tensor, len(e.flax_paths)) if len(e.flax_paths) > 1 else [tensor]
        flat.update({path: _to_flax(e.kind, part) for path, part in zip(e.flax_paths, parts)})
    if set(flat) != set(flax_shapes):
        raise ConversionError(f"key table misses Flax params: {_preview(set(flax_shapes) - set(flat))}")
    return config, unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def flax_to_torch(config: SwinIRConfig, params: dict) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: an official-layout state dict (no derived buffers)."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flatten_dict(params).items()}
    sd = {}
    for e in key_table(config):
        parts = [_to_torch(e.kind, flat.pop(p)) for p in e.flax_paths]
        tensor = np.concatenate(parts) if len(parts) > 1 else parts[0]
        sd[e.torch_key] = _finite(e.torch_key, np.ascontiguousarray(tensor))  # exported NaN would fail to load back
    if flat:
        raise ConversionError(f"params not in the SwinIR key table: {_preview(flat)}")
    return sd

