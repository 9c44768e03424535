"""The NGswin authors' state dict <-> jaxquant Flax params, by an explicit key table.

Handles the layout of github.com/rami0205/NGramSwin (`my_model/ngswin_model/`), as its published
`NGswin_x{s}.pth` files hold it: a bare state dict, optionally with the derived buffers `relative_position_index`
(of both attentions of each block) and `attn_mask` (of the shifted blocks, built for the training size), which
are checked against their recomputed values and dropped. Everything else is refused by name, in one line:
missing keys, leftover keys (SwinIR keys mixed in among them), wrong shapes, non-float or non-finite weights.

Transposes by rule, as for SwinIR (`weights_convert.swinir`): Linear (out, in) -> (in, out); Conv2d (out, in,
kh, kw) -> (kh, kw, in, out), grouped ones included; both attentions' qkv Linear is split row-wise into q, k, v.
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant.ngswin import NGswinConfig, describe, param_shapes
from jaxquant.swinir import relative_position_index, shifted_window_mask
from weights_convert.swinir import ConversionError, Entry, _check_entries, _finite, _preview, _to_flax, _to_torch

# The key NGswin's state dicts are recognised by (SwinIR has no such module).
SIGNATURE_KEY = "shallow_extract.conv1.weight"
# The authors' training LR patch side, for which the stored `attn_mask` buffers were built.
TRAINING_SIZE = 64
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


def is_ngswin_state_dict(sd: dict) -> bool:
    return SIGNATURE_KEY in sd


def key_table(config: NGswinConfig) -> list[Entry]:
    """Every parameter of NGswin under `config`, PyTorch name first."""
    table = []

    def add(kind: str, torch_name: str, flax_name: str, weight: str = "kernel", bias: bool = True):
        table.append(Entry(f"{torch_name}.weight", (f"{flax_name}/{weight}",), kind))
        if bias:
            table.append(Entry(f"{torch_name}.bias", (f"{flax_name}/bias",), "vector"))

    def attention(t: str, f: str):
        for name in ("logit_scale", "relative_position_bias_table"):
            table.append(Entry(f"{t}.{name}", (f"{f}/{name}",), "vector"))
        table.append(Entry(f"{t}.qkv.weight", tuple(f"{f}/qkv/{n}/kernel" for n in "qkv"), "linear"))
        table.append(Entry(f"{t}.qkv.bias", tuple(f"{f}/qkv/{n}/bias" for n in "qkv"), "linear"))
        add("linear", f"{t}.proj", f"{f}/proj")

    def block(t: str, f: str):
        context_t = f"{t}.ngram_window_partition.ngram_context"
        context_f = f"{f}/ngram_window_partition/ngram_context"
        add("conv", f"{context_t}.unigram_embed", f"{context_f}/unigram_embed")
        attention(f"{context_t}.ngram_attn", f"{context_f}/ngram_attn")
        add("conv", f"{context_t}.merge", f"{context_f}/merge")
        attention(f"{t}.attn", f"{f}/attn")
        add("vector", f"{t}.norm1", f"{f}/norm1", weight="scale")
        add("linear", f"{t}.ffn.fc1", f"{f}/ffn/fc1")
        add("linear", f"{t}.ffn.fc2", f"{f}/ffn/fc2")
        add("vector", f"{t}.norm2", f"{f}/norm2", weight="scale")

    add("conv", "shallow_extract.conv1", "shallow_extract")
    for i, depth in enumerate(config.depths):
        stage = f"encoder_layer{i + 1}"
        if i:
            add("linear", f"{stage}.across_cascade_proj", f"{stage}/across_cascade_proj")
        for j in range(depth):
            block(f"{stage}.blocks.{j}", f"{stage}/blocks_{j}")
        if i + 1 < len(config.depths):
            add("vector", f"{stage}.downsample.norm", f"{stage}/downsample/norm", weight="scale")
            add("linear", f"{stage}.downsample.reduction", f"{stage}/downsample/reduction", bias=False)
    add("conv", "bottleneck.depthwise", "bottleneck/depthwise")
    add("linear", "bottleneck.pointwise", "bottleneck/pointwise")
    add("vector", "bottleneck.norm", "bottleneck/norm", weight="scale")
    for j in range(config.dec_depth):
        block(f"decoder_layer1.blocks.{j}", f"decoder_layer1/blocks_{j}")
    add("vector", "norm", "norm", weight="scale")
    add("conv", "to_target.before_shuffle", "to_target/before_shuffle")
    add("conv", "to_target.to_origin", "to_target/to_origin")
    return table


# ----------------------------------------------------------------------------------------------------------
# Config inference


def _shape(sd: dict, key: str, rank: int) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"missing {key!r}, which every NGswin state dict has")
    if sd[key].ndim != rank:
        raise ConversionError(f"{key!r} has shape {sd[key].shape}; NGswin needs {rank} dimensions there")
    return sd[key].shape


def _agreed(sd: dict, pattern: str, axis: int, first: str) -> int:
    """The size along `axis` most tensors whose key fully matches `pattern` agree on: read off one tensor, one
    damaged tensor would make the shape check blame its intact neighbours. `first` (one such key) must be there."""
    if first not in sd:
        raise ConversionError(f"missing {first!r}, which every NGswin state dict has")
    sizes = collections.Counter(v.shape[axis] for k, v in sd.items() if v.ndim > axis and re.fullmatch(pattern, k))
    if not sizes:
        raise ConversionError(f"{first!r} has shape {sd[first].shape}; NGswin needs more dimensions there")
    return sizes.most_common(1)[0][0]


def infer_config(sd: dict) -> NGswinConfig:
    """NGswin hyper-parameters read off the tensor shapes (every shape is then checked against them)."""
    _check_entries(sd)
    embed_dim, in_chans = _shape(sd, SIGNATURE_KEY, 4)[:2]
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder_layer(\d+)\.", k))})
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise ConversionError(f"NGswin encoder stages must be encoder_layer1..N, found {stages}")

    def blocks(stage: str) -> int:
        return len({int(m.group(1)) for k in sd if (m := re.match(rf"{stage}\.blocks\.(\d+)\.", k))})

    def table(stage: str, attention: str, axis: int) -> int:
        """Rows (axis 0) or heads (axis 1) of the stage's bias tables of one attention."""
        key = rf"{stage}\.blocks\.\d+\.{re.escape(attention)}\.relative_position_bias_table"
        return _agreed(sd, key, axis, f"{stage}.blocks.0.{attention}.relative_position_bias_table")

    def window(stage: str, attention: str) -> int:
        rows = table(stage, attention, 0)
        side = (math.isqrt(rows) + 1) // 2
        if (2 * side - 1) ** 2 != rows:
            raise ConversionError(f"{stage} {attention} bias tables have {rows} rows, not (2*window-1)**2")
        return side

    ngram_attention = "ngram_window_partition.ngram_context.ngram_attn"
    names = [f"encoder_layer{i}" for i in stages] + ["decoder_layer1"]
    hidden = _agreed(sd, r".*\.ffn\.fc1\.weight", 0, "encoder_layer1.blocks.0.ffn.fc1.weight")
    out_channels = _shape(sd, "to_target.before_shuffle.weight", 4)[0]
    scale = math.isqrt(out_channels // in_chans)
    if scale * scale * in_chans != out_channels:
        raise ConversionError(f"'to_target.before_shuffle.weight' has {out_channels} output channels; "
                              f"a PixelShuffle conv outputs {in_chans} * scale**2")
    fields = dict(
        upscale=scale, in_chans=int(in_chans), embed_dim=int(embed_dim),
        depths=tuple(blocks(n) for n in names[:-1]), num_heads=tuple(table(n, "attn", 1) for n in names[:-1]),
        dec_depth=blocks("decoder_layer1"), dec_num_heads=table("decoder_layer1", "attn", 1),
        ngrams=tuple(window(n, ngram_attention) for n in names), window_size=window("encoder_layer1", "attn"),
        mlp_ratio=hidden / embed_dim,
    )
    try:
        return NGswinConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"inconsistent NGswin shapes: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Conversion


def torch_shapes(config: NGswinConfig) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of NGswin's parameters, from their Flax shapes (the split qkv stacked back row-wise)."""
    flax_shapes, shapes = param_shapes(config), {}
    for e in key_table(config):
        rows, *rest = _to_torch(e.kind, np.broadcast_to(np.float32(0), flax_shapes[e.flax_paths[0]])).shape
        shapes[e.torch_key] = (rows * len(e.flax_paths), *rest)
    return shapes


def expected_buffers(config: NGswinConfig) -> dict[str, np.ndarray]:
    """The derived buffers the authors' model registers, by key, as it computes them: each attention's relative
    position index, and each shifted block's mask for the size it was built for (the training size at the
    stage's resolution; the decoder's is built for half the training size, though it runs at full)."""
    ws = config.window_size
    stages = [(f"encoder_layer{i + 1}", depth, TRAINING_SIZE >> i) for i, depth in enumerate(config.depths)]
    stages.append(("decoder_layer1", config.dec_depth, TRAINING_SIZE // 2))  # the authors' `2**(1-i)`, i = 0
    buffers = {}
    for (stage, depth, side), ngram in zip(stages, config.ngrams):
        for j in range(depth):
            t = f"{stage}.blocks.{j}"
            buffers[f"{t}.attn.relative_position_index"] = relative_position_index(ws)
            buffers[f"{t}.ngram_window_partition.ngram_context.ngram_attn.relative_position_index"] = (
                relative_position_index(ngram)
            )
            if j % 2:
                buffers[f"{t}.attn_mask"] = np.asarray(shifted_window_mask(side, side, ws, ws // 2))
    return buffers


def _check_buffer(key: str, value: np.ndarray, expected: np.ndarray) -> None:
    if value.shape != expected.shape:
        raise ConversionError(f"buffer {key!r} has shape {value.shape}; NGswin computes {expected.shape}")
    if not np.array_equal(value, expected):
        raise ConversionError(f"buffer {key!r} does not match the NGswin it belongs to")


def torch_to_flax(sd: dict[str, np.ndarray], config: NGswinConfig | None = None) -> tuple[NGswinConfig, dict]:
    """Convert the authors' NGswin state dict to `(config, params)`; every key, shape and value is checked."""
    _check_entries(sd)
    config = config or infer_config(sd)
    shapes, buffers = torch_shapes(config), expected_buffers(config)
    missing = sorted(set(shapes) - set(sd))
    leftover = sorted(set(sd) - set(shapes) - set(buffers))
    if missing or leftover:
        raise ConversionError(
            f"state dict does not match {describe(config)}: "
            + "; ".join(p for p in (missing and f"missing {_preview(missing)}",
                                    leftover and f"unexpected {_preview(leftover)}") if p)
        )
    for key, shape in shapes.items():
        if sd[key].shape != shape:
            raise ConversionError(f"{key!r} has shape {sd[key].shape}; {describe(config)} needs {shape}")
        if not np.issubdtype(sd[key].dtype, np.floating):
            raise ConversionError(f"{key!r} is {sd[key].dtype}; NGswin weights are floating point")
    for key in set(sd) & set(buffers):
        _check_buffer(key, sd[key], buffers[key])
    flat = {}
    for e in key_table(config):
        tensor = _finite(e.torch_key, np.asarray(sd[e.torch_key], np.float32))
        parts = np.split(tensor, len(e.flax_paths)) if len(e.flax_paths) > 1 else [tensor]
        flat.update({path: _to_flax(e.kind, part) for path, part in zip(e.flax_paths, parts)})
    return config, unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def flax_to_torch(config: NGswinConfig, params: dict) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: the authors' layout, a bare state dict without derived buffers."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flatten_dict(params).items()}
    sd = {}
    for e in key_table(config):
        parts = [_to_torch(e.kind, flat.pop(p)) for p in e.flax_paths]
        tensor = np.concatenate(parts) if len(parts) > 1 else parts[0]
        sd[e.torch_key] = _finite(e.torch_key, np.ascontiguousarray(tensor))
    if flat:
        raise ConversionError(f"params not in the NGswin key table: {_preview(flat)}")
    return sd
