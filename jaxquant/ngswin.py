"""NGswin (Choi, Lee, Yang, "N-Gram in Swin Transformers for Efficient Lightweight Image Super-Resolution",
CVPR 2023) in Flax linen, with SwinIR's quantization injection points.

Ports `my_model/ngswin_model/` of the authors' code (github.com/rami0205/NGramSwin, Apache-2.0): our own code,
written from theirs. Layout is NHWC; parameter names mirror the PyTorch module names
(`encoder_layer1/blocks_0/attn/qkv/q/kernel` <-> `encoder_layer1.blocks.0.attn.qkv.weight` rows 0:60), so
conversion is a key table (`weights_convert/ngswin.py`).

The model, top down (spec section 9):
- input zero-padded bottom/right to a multiple of 4 x window (32), normalised by the DIV2K mean and std of its
  scale; a 3x3 conv ("shallow");
- a U-shaped encoder: 3 stages of N-Gram Swin Transformer Blocks (NSTB) at full, 1/2 and 1/4 resolution,
  patch merging between them; each stage's input is its predecessor's merged output concatenated with the
  max-pooled input of the predecessor (across-stage pooling cascade) and projected back to `embed_dim`;
- the SCDP bottleneck: each stage output plus the pooled shallow feature, pixel-shuffled to full resolution,
  concatenated, a depthwise 3x3 conv, GELU, a pointwise linear and a LayerNorm;
- a decoder stage of NSTBs on the bottleneck output plus the first stage's output, a LayerNorm, the shallow
  feature added back, and pixel-shuffle reconstruction; de-normalised and cropped to scale x the input.
Inside a stage, block j's input is block j-1's output plus block j-1's input; the stage passes its last
block's output on, and its patch merging sees that output plus the last block's input.

An NSTB: an N-gram context (a grouped window-sized conv to half the channels, a window attention over each
window's 2x2 neighbourhood of such "unigrams", looking forward and backward, averaged, then a 1x1 merge conv)
is added to every token of its window; then (shifted) window attention with cosine similarity (normalised q
and k, a learned per-head logit scale capped at 100, relative position bias), a post-LayerNorm and a residual,
then an MLP (fc1, GELU, fc2), a post-LayerNorm and a residual.

Quantization sites (2DQuant's rule carried over, spec section 9): every linear inside the blocks (both
attentions' q, k, v, proj; fc1, fc2), weights and inputs, and both operands of both matmuls of both attentions
(normalised q as `q_scaled`, k, the softmax output `probs`, v): 28 a block, 560 in all. The convs, patch
merging, cascade projections, bottleneck and reconstruction stay in full precision.

`__call__` returns `(output, stage_features)`: the outputs of the three encoder stages (before patch merging)
and of the decoder stage (before its LayerNorm), shaped (B, H'*W', embed_dim), the taps of DQC's feature loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.swinir import (
    QKV, LayerNorm, QuantDense, SiteFn, _leaf_shapes, check_param_shapes, full_precision, gelu, pixel_shuffle,
    relative_position_index, run_blocks, shifted_window_mask, site_dot_general, softmax, window_partition,
    window_reverse,
)

Array = jax.Array

# The authors' DIV2K input statistics, by scale (`NGswin.__init__`); not stored in the weights.
DIV2K_MEAN = (0.4485, 0.4375, 0.4045)
DIV2K_STD = {2: (0.2397, 0.2290, 0.2389), 3: (0.2373, 0.2265, 0.2367), 4: (0.2352, 0.2244, 0.2349)}
# F.normalize's floor on the norm; the logit scale's cap (log 100), both the authors'.
NORMALIZE_EPS = 1e-12
MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NGswinConfig:
    """Architecture hyper-parameters; names follow the authors' `NGswin` constructor (its defaults)."""

    upscale: int
    in_chans: int = 3
    embed_dim: int = 64  # also the decoder's width (`dec_dim`): the decoder adds the first stage's output
    depths: tuple[int, ...] = (6, 4, 4)
    num_heads: tuple[int, ...] = (6, 4, 4)
    dec_depth: int = 6
    dec_num_heads: int = 6
    ngrams: tuple[int, ...] = (2, 2, 2, 2)  # one per encoder stage, then the decoder's
    window_size: int = 8
    mlp_ratio: float = 2.0

    def __post_init__(self):
        if self.upscale not in DIV2K_STD:
            raise ValueError(f"NGswin has input statistics for scales {sorted(DIV2K_STD)}, not {self.upscale}")
        if self.in_chans != 3:
            raise ValueError(f"NGswin normalises RGB input (in_chans 3), got in_chans {self.in_chans}")
        if len(self.depths) != len(self.num_heads) or len(self.ngrams) != len(self.depths) + 1:
            raise ValueError("depths and num_heads need one entry per encoder stage, ngrams one more")
        if self.embed_dim % (4 ** (len(self.depths) - 1)) or self.embed_dim % 2:
            raise ValueError(f"embed_dim {self.embed_dim} must split into the bottleneck's pixel shuffles")

    @property
    def pad_unit(self) -> int:
        """The forward zero-pads H and W to a multiple of this (the authors' 4 x window)."""
        return 4 * self.window_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NGswinConfig":
        d = dict(d)
        for key in ("depths", "num_heads", "ngrams"):
            d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


def ngswin(scale: int) -> NGswinConfig:
    """NGswin as published (998,384 parameters at x2)."""
    return NGswinConfig(upscale=scale)


def describe(config: NGswinConfig) -> str:
    return (
        f"NGswin x{config.upscale} (embed_dim {config.embed_dim}, encoder depths {list(config.depths)}, "
        f"decoder depth {config.dec_depth}, window {config.window_size})"
    )


# ----------------------------------------------------------------------------------------------------------
# Padding and pooling helpers (static shapes)


def zero_pad(x: Array, multiple: int) -> Array:
    """Zeros appended bottom/right up to a multiple (the model's own padding)."""
    _, h, w, _ = x.shape
    return jnp.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)))


def symmetric_pad(x: Array, multiple: int) -> Array:
    """The authors' test protocol: LR padded bottom/right up to a multiple by mirroring (edge repeated)."""
    _, h, w, _ = x.shape
    return jnp.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)), mode="symmetric")


def max_pool2(x: Array) -> Array:
    """2x2 max pooling, stride 2, of (B, H, W, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def sequential_pad_indices(n: int, ngram: int, forward: bool) -> np.ndarray:
    """Row (or column) indices of the authors' `seq_refl_win_pad` of a length-n axis: `ngram - 1` extra entries,
    after the end (forward) copying entries n-ngram .. n-2, or before the start (backward) copying 1 .. ngram-1,
    each block in its own order. Where the authors' code fails (n < ngram: a one-window-wide grid, e.g. the
    third stage of a 32-pixel input), the indices are clamped, repeating the edge."""
    extra = np.arange(n - ngram, n - 1) if forward else np.arange(1, ngram)
    extra = np.clip(extra, 0, n - 1)
    return np.concatenate([np.arange(n), extra]) if forward else np.concatenate([extra, np.arange(n)])


# ----------------------------------------------------------------------------------------------------------
# Layers


class CosineWindowAttention(nn.Module):
    """Multi-head attention inside windows of `window_size`^2 tokens, by scaled cosine similarity (normalised
    q and k, a learned per-head logit scale capped at 100) plus relative position bias and an optional mask.
    Head width is dim // heads, so q, k, v may be narrower than the input (64 in, 6 heads of 10)."""

    dim: int
    num_heads: int
    window_size: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: np.ndarray | None) -> Array:
        ws, heads = self.window_size, self.num_heads
        head_dim = self.dim // heads
        bn, n, _ = x.shape  # (B*nW, ws*ws, dim)
        logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (heads, 1, 1))
        table = self.param(
            "relative_position_bias_table", nn.initializers.truncated_normal(0.02), ((2 * ws - 1) ** 2, heads)
        )

        def split_heads(t):  # (B*nW, n, heads*head_dim) -> (B*nW, heads, n, head_dim)
            return t.reshape(bn, n, heads, head_dim).transpose(0, 2, 1, 3)

        def unit(t):
            return t / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(t), axis=-1, keepdims=True)), NORMALIZE_EPS)

        q, k, v = (split_heads(t) for t in QKV(heads * head_dim, self.site, self.dtype, name="qkv")(x))
        qk = (((3,), (3,)), ((0, 1), (0, 1)))  # q k^T per window and head: (B*nW, heads, n, n)
        attn = site_dot_general(self, self.site, ("q_scaled", unit(q)), ("k", unit(k)), qk)
        attn = attn * jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE)).astype(attn.dtype)[None]
        bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
        attn = attn + bias.astype(attn.dtype)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bn // nw, nw, heads, n, n) + jnp.asarray(mask, attn.dtype)[None, :, None, :, :]
            attn = attn.reshape(bn, heads, n, n)
        attn = softmax(attn)
        pv = (((3,), (2,)), ((0, 1), (0, 1)))  # (B*nW, heads, n, head_dim)
        x = site_dot_general(self, self.site, ("probs", attn), ("v", v), pv)
        x = x.transpose(0, 2, 1, 3).reshape(bn, n, heads * head_dim)
        return QuantDense(self.dim, self.site, self.dtype, name="proj")(x)


class NGramContext(nn.Module):
    """Each window's context from its n-gram neighbourhood: (B, H, W, D) -> (B, H/ws, W/ws, D).

    A grouped conv with a window-sized kernel and stride embeds each window as a "unigram" of D/2 channels. The
    unigram grid is padded (`sequential_pad_indices`) forward (bottom/right) and backward (top/left); every
    window attends over the n x n unigrams starting at it in each padded grid (one attention call for both
    directions, so each site sees both), the n x n outputs are averaged, and a 1x1 conv merges the two
    directions' D/2 channels each into D."""

    dim: int
    window_size: int
    ngram: int
    num_heads: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ws, n, half = self.window_size, self.ngram, self.dim // 2
        unigram = nn.Conv(
            half, (ws, ws), strides=(ws, ws), padding="VALID", feature_group_count=half, dtype=self.dtype,
            name="unigram_embed",
        )(x)  # (B, wh, ww, D/2)
        b, wh, ww, _ = unigram.shape

        def neighbourhoods(forward: bool) -> Array:  # (B*wh*ww, n*n, D/2), tokens in row-major (dh, dw) order
            rows, cols = (sequential_pad_indices(size, n, forward) for size in (wh, ww))
            padded = unigram[:, rows][:, :, cols]  # (B, wh+n-1, ww+n-1, D/2)
            grams = [padded[:, dh : dh + wh, dw : dw + ww] for dh in range(n) for dw in range(n)]
            return jnp.stack(grams, axis=3).reshape(b * wh * ww, n * n, half)

        attn = CosineWindowAttention(half, self.num_heads, n, self.site, self.dtype, name="ngram_attn")
        context = attn(jnp.concatenate([neighbourhoods(True), neighbourhoods(False)]), None).mean(axis=1)
        forward, backward = context.reshape(2, b, wh, ww, half)
        return nn.Conv(self.dim, (1, 1), dtype=self.dtype, name="merge")(jnp.concatenate([forward, backward], -1))


class NGramWindowPartition(nn.Module):
    """Holds the N-gram context (named as the authors' module, which also partitions the windows)."""

    dim: int
    window_size: int
    ngram: int
    num_heads: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return NGramContext(
            self.dim, self.window_size, self.ngram, self.num_heads, self.site, self.dtype, name="ngram_context"
        )(x)


class Mlp(nn.Module):
    dim: int
    hidden: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = QuantDense(self.hidden, self.site, self.dtype, name="fc1")(x)
        return QuantDense(self.dim, self.site, self.dtype, name="fc2")(gelu(x))


class NSTB(nn.Module):
    """N-Gram Swin Transformer Block on (B, H*W, D) tokens: N-gram context added to each window, (shifted)
    cosine window attention, MLP; each post-normed with a residual.

    Carries the within-stage residual as the authors' block does: called on `(x, previous_input)`, it runs on
    `x + previous_input` and returns `(output, x + previous_input)`."""

    dim: int
    num_heads: int
    window_size: int
    shift: int
    ngram: int
    mlp_hidden: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], hw: tuple[int, int]) -> tuple[Array, Array]:
        (h, w), ws, shift, d = hw, self.window_size, self.shift, self.dim
        x = carry[0] + carry[1]
        b = x.shape[0]
        image = x.reshape(b, h, w, d)
        context = NGramWindowPartition(
            d, ws, self.ngram, self.num_heads, self.site, self.dtype, name="ngram_window_partition"
        )(image)  # (B, h/ws, w/ws, D)
        y = image.reshape(b, h // ws, ws, w // ws, ws, d) + context[:, :, None, :, None, :]
        y = y.reshape(b, h, w, d)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(h, w, ws, shift) if shift else None
        attn = CosineWindowAttention(d, self.num_heads, ws, self.site, self.dtype, name="attn")
        y = window_reverse(attn(window_partition(y, ws), mask), ws, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        out = x + LayerNorm(name="norm1", dtype=self.dtype)(y.reshape(b, h * w, d))
        mlp = Mlp(d, self.mlp_hidden, self.site, self.dtype, name="ffn")
        return out + LayerNorm(name="norm2", dtype=self.dtype)(mlp(out)), x


def stage_blocks(config: NGswinConfig, depth: int, num_heads: int, ngram: int, site: SiteFn, dtype) -> list[NSTB]:
    """A stage's NSTBs, every other one shifted by half a window (created inside the stage's compact call)."""
    ws = config.window_size
    return [
        NSTB(config.embed_dim, num_heads, ws, ws // 2 if j % 2 else 0, ngram, config.mlp_hidden, site, dtype,
             name=f"blocks_{j}")
        for j in range(depth)
    ]


def run_stage(parent: nn.Module, blocks: list[NSTB], x: Array, hw: tuple[int, int]) -> tuple[Array, Array]:
    """The blocks in turn by SwinIR's `run_blocks` (pairs as one `lax.scan` iteration, optionally recomputed in
    the backward pass), starting with no previous input. Returns the last block's output and that output plus
    the last block's input (what patch merging sees)."""
    out, last_input = run_blocks(parent, blocks, (x, jnp.zeros_like(x)), hw, remat=parent.remat, scan=parent.scan)
    return out, out + last_input


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (top-left, top-right, bottom-left, bottom-right: not Swin's order), LayerNorm,
    a linear."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> Array:
        (h, w), b, d = hw, x.shape[0], x.shape[-1]
        x = x.reshape(b, h // 2, 2, w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)  # (B, h/2, w/2, dh, dw, D)
        x = x.reshape(b, (h // 2) * (w // 2), 4 * d)
        x = LayerNorm(name="norm", dtype=self.dtype)(x)
        return nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="reduction")(x)


class EncoderLayer(nn.Module):
    """One encoder stage: cascade projection (from the second stage on), NSTBs, patch merging (but the last)."""

    config: NGswinConfig
    stage: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> tuple[Array, Array | None]:
        """(the last block's output, the patch-merged input of the next stage or None after the last)."""
        cfg, i = self.config, self.stage
        if i:
            x = nn.Dense(cfg.embed_dim, dtype=self.dtype, name="across_cascade_proj")(x)
        blocks = stage_blocks(cfg, cfg.depths[i], cfg.num_heads[i], cfg.ngrams[i], self.site, self.dtype)
        out, merge_input = run_stage(self, blocks, x, hw)
        if i + 1 == len(cfg.depths):
            return out, None
        return out, PatchMerging(cfg.embed_dim, self.dtype, name="downsample")(merge_input, hw)


class DecoderLayer(nn.Module):
    config: NGswinConfig
    site: SiteFn
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> Array:
        cfg = self.config
        blocks = stage_blocks(cfg, cfg.dec_depth, cfg.dec_num_heads, cfg.ngrams[-1], self.site, self.dtype)
        return run_stage(self, blocks, x, hw)[0]


class SCDPBottleneck(nn.Module):
    """pixel-Shuffle, Concatenate, Depthwise conv, Pointwise projection of the encoder stage outputs, each
    plus the shallow feature max-pooled to its resolution (and through a leaky ReLU)."""

    config: NGswinConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, shallow: Array, stage_outputs: list[Array]) -> Array:
        b, h, w, d = shallow.shape
        pooled, parts = shallow, []
        for i, out in enumerate(stage_outputs):  # stage i at 1/2^i resolution, shuffled back by 2^i
            side = (h >> i, w >> i)
            out = out + nn.leaky_relu(pooled, 0.01).reshape(b, -1, d)
            parts.append(pixel_shuffle(out.reshape(b, *side, d), 2**i))
            pooled = max_pool2(pooled)
        x = jnp.concatenate(parts, axis=-1)  # (B, H, W, sum of D/4^i)
        x = nn.Conv(x.shape[-1], (3, 3), padding=1, feature_group_count=x.shape[-1], dtype=self.dtype,
                    name="depthwise")(x)
        x = nn.Dense(self.config.embed_dim, dtype=self.dtype, name="pointwise")(gelu(x))
        return LayerNorm(name="norm", dtype=self.dtype)(x.reshape(b, h * w, -1))


class Reconstruction(nn.Module):
    config: NGswinConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = nn.Conv(cfg.in_chans * cfg.upscale**2, (3, 3), padding=1, dtype=self.dtype, name="before_shuffle")(x)
        x = pixel_shuffle(x, cfg.upscale)
        return nn.Conv(cfg.in_chans, (3, 3), padding=1, dtype=self.dtype, name="to_origin")(x)


class NGswin(nn.Module):
    """NGswin for super-resolution. Input (B, H, W, 3) in [0, 1], any H and W; output (B, sH, sW, 3), raw (not
    clamped), as the authors' forward returns it.

    Returns `(output, stage_features)`: the three encoder stage outputs, shaped (B, H'*W' / 4^i, embed_dim) for
    stage i, and the decoder stage output, (B, H'*W', embed_dim), with H', W' the input zero-padded to a multiple
    of `config.pad_unit`. `remat`
    and `scan` run the blocks as SwinIR's do (`swinir.run_blocks`).
    """

    config: NGswinConfig
    site: SiteFn = full_precision
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, tuple[Array, ...]]:
        cfg, s = self.config, self.config.upscale
        _, h, w, _ = x.shape
        x = zero_pad(x, cfg.pad_unit)
        b, hp, wp, _ = x.shape
        mean = jnp.asarray(DIV2K_MEAN, x.dtype).reshape(1, 1, 1, -1)
        std = jnp.asarray(DIV2K_STD[s], x.dtype).reshape(1, 1, 1, -1)
        x = (x - mean) / std

        shallow = nn.Conv(cfg.embed_dim, (3, 3), padding=1, dtype=self.dtype, name="shallow_extract")(x)
        blocks_run = (self.site, self.dtype, self.remat, self.scan)
        cascade, hw, features, merged = shallow.reshape(b, hp * wp, -1), (hp, wp), [], None
        for i in range(len(cfg.depths)):
            if i:  # the previous stage's input, max-pooled, beside its merged output
                pooled = max_pool2(cascade.reshape(b, *hw, -1)).reshape(b, -1, cascade.shape[-1])
                cascade, hw = jnp.concatenate([pooled, merged], axis=-1), (hw[0] // 2, hw[1] // 2)
            out, merged = EncoderLayer(cfg, i, *blocks_run, name=f"encoder_layer{i + 1}")(cascade, hw)
            features.append(out)
        x = SCDPBottleneck(cfg, self.dtype, name="bottleneck")(shallow, features)
        x = DecoderLayer(cfg, *blocks_run, name="decoder_layer1")(x + features[0], (hp, wp))
        features.append(x)
        x = LayerNorm(name="norm", dtype=self.dtype)(x) + shallow.reshape(b, hp * wp, -1)
        x = Reconstruction(cfg, self.dtype, name="to_target")(x.reshape(b, hp, wp, -1))
        x = x.astype(mean.dtype) * std + mean
        return x[:, : h * s, : w * s], tuple(features)


# ----------------------------------------------------------------------------------------------------------
# Params against a config


@functools.lru_cache(maxsize=16)
def param_shapes(config: NGswinConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter shapes of NGswin under `config`, keyed by '/'-joined path (traced, no compute)."""
    x = jax.ShapeDtypeStruct((1, config.pad_unit, config.pad_unit, config.in_chans), jnp.float32)
    return _leaf_shapes(jax.eval_shape(NGswin(config).init, jax.random.PRNGKey(0), x)["params"])


def config_from_params(params: Mapping) -> NGswinConfig:
    """The config NGswin `params` were made with, read off their names and shapes; a tree that is not NGswin's
    gets a one-line ValueError naming what does not fit."""
    flat = _leaf_shapes(params) if isinstance(params, Mapping) else {}

    def shape(path: str, rank: int) -> tuple[int, ...]:
        if path not in flat:
            raise ValueError(f"not NGswin params: no {path}")
        if len(flat[path]) != rank:
            raise ValueError(f"not NGswin params: {path} has shape {flat[path]}, not {rank} dimensions")
        return flat[path]

    def depth(stage: str) -> int:
        return len({p.split("/")[1] for p in flat if p.startswith(f"{stage}/blocks_")})

    def heads_and_window(path: str) -> tuple[int, int]:
        rows, heads = shape(path, 2)
        return heads, (math.isqrt(rows) + 1) // 2

    stages = []
    while f"encoder_layer{len(stages) + 1}/blocks_0/attn/logit_scale" in flat:
        stages.append(f"encoder_layer{len(stages) + 1}")
    names = [*stages, "decoder_layer1"]
    ngram = "ngram_window_partition/ngram_context/ngram_attn/relative_position_bias_table"
    attention = [heads_and_window(f"{n}/blocks_0/attn/relative_position_bias_table") for n in names]
    in_chans, embed_dim = shape("shallow_extract/kernel", 4)[2:]
    out_chans = shape("to_target/before_shuffle/kernel", 4)[3]
    config = NGswinConfig(
        upscale=math.isqrt(out_chans // in_chans), in_chans=in_chans, embed_dim=embed_dim,
        depths=tuple(depth(n) for n in stages), num_heads=tuple(h for h, _ in attention[:-1]),
        dec_depth=depth("decoder_layer1"), dec_num_heads=attention[-1][0],
        ngrams=tuple(heads_and_window(f"{n}/blocks_0/{ngram}")[1] for n in names), window_size=attention[0][1],
        mlp_ratio=shape(f"{names[0]}/blocks_0/ffn/fc1/kernel", 2)[1] / embed_dim,
    )
    check_params(config, params)  # the few shapes read above set the config; every other one must fit it
    return config


def check_params(config: NGswinConfig, params: Mapping) -> None:
    """A one-line ValueError unless every param has the shape `config` implies, none missing or extra."""
    check_param_shapes(param_shapes(config), params, describe(config))
