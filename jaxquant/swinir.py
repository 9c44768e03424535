"""SwinIR (Liang et al., ICCV-W 2021) in Flax linen, with quantization injection points.

Ports `basicsr/archs/swinir_arch.py` of the official 2DQuant code (github.com/Kai-Liu001/2DQuant), which is
SwinIR with the qkv linear split into q, k, v (its `qkv_separation`) and identity taps on the two inputs of
each attention matmul. Layout is NHWC throughout; parameter names mirror the PyTorch module names
(`layers_0/residual_group/blocks_0/attn/qkv/q/kernel` <-> `layers.0.residual_group.blocks.0.attn.qkv.weight`
rows 0:60), so conversion is a key table, not a search.

The model knows nothing about quantization. Every quantization site calls `site(module, name, x)`, a
`SiteFn` injected from outside: the identity for the FP model, fake quantization for the quantized model,
a bound search for calibration (see `jaxquant.quant`). The FP model and the quantized model are the same
module with the same params. The sites of a matmul's two operands are called through `site_dot_general`, so a
`MatmulSiteFn` can run the product itself (the integer forward, `jaxquant.integer`).

`__call__` returns `(output, stage_features)`: the four stage outputs (after each stage's Swin blocks, before
its 3x3 conv and residual add), shaped (B, H*W, C), which DQC uses for its feature loss. jit drops them when
they are unused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.scope import is_filter_empty

Array = jax.Array

RGB_MEAN = (0.4488, 0.4371, 0.4040)


class SiteFn(Protocol):
    """A quantization injection point: `(module, site_name, tensor) -> tensor`."""

    def __call__(self, module: nn.Module, name: str, x: Array) -> Array: ...


@runtime_checkable
class MatmulSiteFn(SiteFn, Protocol):
    """A `SiteFn` that also runs the matmuls its sites feed (`site_dot_general`), given both operands as they
    reach their sites: `jaxquant.integer` multiplies their integer codes."""

    def dot_general(
        self, module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array], dims: jax.lax.DotDimensionNumbers
    ) -> Array: ...


def site_dot_general(
    module: nn.Module, site: SiteFn, lhs: tuple[str, Array], rhs: tuple[str, Array],
    dims: jax.lax.DotDimensionNumbers, dtype: jnp.dtype | None = None,
) -> Array:
    """`lax.dot_general` of two `(site name, tensor)` operands, each through its site (then cast to `dtype`), or
    the whole product by a `MatmulSiteFn`. Every quantized matmul of the model goes through here."""
    if isinstance(site, MatmulSiteFn):
        return site.dot_general(module, lhs, rhs, dims)
    a, b = (site(module, name, x) for name, x in (lhs, rhs))
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    return jax.lax.dot_general(a, b, dims)


def full_precision(module: nn.Module, name: str, x: Array) -> Array:
    """The FP site: every tensor passes through untouched."""
    del module, name
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwinIRConfig:
    """Architecture hyper-parameters; field names follow the official SwinIR constructor."""

    upscale: int
    in_chans: int = 3
    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    img_range: float = 1.0
    upsampler: str = "pixelshuffledirect"  # or "pixelshuffle" (classical SR)
    num_feat: int = 64  # conv width before the "pixelshuffle" upsampler

    def __post_init__(self):
        if self.upsampler not in ("pixelshuffledirect", "pixelshuffle"):
            raise ValueError(f"unsupported upsampler {self.upsampler!r}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError("depths and num_heads must have the same length")
        if self.embed_dim % max(self.num_heads):
            raise ValueError("embed_dim must be divisible by every num_heads entry")
        if self.upsampler == "pixelshuffle" and not _is_power_of_two_or_three(self.upscale):
            raise ValueError(f"pixelshuffle upsampler needs scale 2^n or 3, got {self.upscale}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # as the official SwinIR rounds it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SwinIRConfig":
        d = dict(d)
        for key in ("depths", "num_heads"):
            d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


def mlp_ratio_for(hidden: int, embed_dim: int) -> float:
    """The mlp_ratio of a model whose MLP has `hidden` units: the smallest float whose product with `embed_dim`
    truncates to `hidden` (hidden / embed_dim alone can fall an ulp short: 42 * (51 / 42) < 51)."""
    ratio = hidden / embed_dim
    while int(embed_dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _is_power_of_two_or_three(s: int) -> bool:
    return s == 3 or (s >= 1 and s & (s - 1) == 0)


def swinir_light(scale: int) -> SwinIRConfig:
    """SwinIR-light ("SwinIR-S"), the model 2DQuant quantizes (spec section 1)."""
    return SwinIRConfig(upscale=scale)


def config_from_params(params: Mapping) -> SwinIRConfig:
    """The config SwinIR `params` were made with, read off their names and shapes (img_range is not stored:
    SwinIR's 1.0). A tree that is not SwinIR's params gets a one-line ValueError naming what does not fit."""

    def shape(*path: str, rank: int) -> tuple[int, ...]:
        node = params
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"not SwinIR params: no {'/'.join(path)}")
            node = node[key]
        if np.ndim(node) != rank:
            raise ValueError(f"not SwinIR params: {'/'.join(path)} has shape {np.shape(node)}, not {rank} dimensions")
        return np.shape(node)

    def count(tree: Mapping, prefix: str, step: int = 1) -> int:
        """How many of `prefix_0`, `prefix_<step>`, `prefix_<2 step>`, ... `tree` holds, from 0 without a gap."""
        return next(i for i in itertools.count() if f"{prefix}_{step * i}" not in tree)

    if isinstance(params, Mapping) and "params" in params and "conv_first" not in params:
        raise ValueError("not SwinIR params but Flax variables holding them: pass variables['params']")
    in_chans, embed_dim = shape("conv_first", "kernel", rank=4)[2:]
    table = ("residual_group", "blocks_0", "attn", "relative_position_bias_table")
    # max(.., 1), here and for the upsampler: the first one is looked up even when absent, so the error names it
    tables = [shape(f"layers_{i}", *table, rank=2) for i in range(max(count(params, "layers"), 1))]
    depths = tuple(count(params[f"layers_{i}"]["residual_group"], "blocks") for i in range(len(tables)))
    common = dict(
        in_chans=in_chans, embed_dim=embed_dim, depths=depths, num_heads=tuple(t[1] for t in tables),
        window_size=(math.isqrt(tables[0][0]) + 1) // 2,
        mlp_ratio=mlp_ratio_for(shape("layers_0", *table[:2], "mlp", "fc1", "kernel", rank=2)[1], embed_dim),
    )
    if "conv_before_upsample_0" not in params:  # pixelshuffledirect: one conv to in_chans * scale**2 channels
        config = SwinIRConfig(upscale=math.isqrt(shape("upsample_0", "kernel", rank=4)[3] // in_chans), **common)
    else:
        num_feat = shape("conv_before_upsample_0", "kernel", rank=4)[3]
        steps = range(max(count(params, "upsample", step=2), 1))  # convs at upsample_0, _2, ...: num_feat * r**2 out
        upscale = math.prod(math.isqrt(shape(f"upsample_{2 * i}", "kernel", rank=4)[3] // num_feat) for i in steps)
        config = SwinIRConfig(upscale=upscale, upsampler="pixelshuffle", num_feat=num_feat, **common)
    check_params(config, params)  # the few shapes read above set the config; every other one must fit it
    return config


def describe(config: SwinIRConfig) -> str:
    """One-line summary of a config, for CLI output and errors."""
    return (
        f"SwinIR x{config.upscale} (embed_dim {config.embed_dim}, depths {list(config.depths)}, "
        f"heads {list(config.num_heads)}, window {config.window_size}, {config.upsampler})"
    )


# ----------------------------------------------------------------------------------------------------------
# Window helpers (static shapes: computed with numpy at trace time)


def window_partition(x: Array, ws: int) -> Array:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C), windows in row-major order as in PyTorch."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def window_reverse(windows: Array, ws: int, h: int, w: int) -> Array:
    """Inverse of `window_partition`: (B*nW, ws*ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@functools.lru_cache(maxsize=None)
def relative_position_index(ws: int) -> np.ndarray:
    """(ws*ws, ws*ws) index into the (2ws-1)^2 bias table, as SwinIR's `relative_position_index` buffer."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> Array:
    """(nW, ws*ws, ws*ws) additive mask, -100 between tokens from different regions (`calculate_mask`).

    Built in the graph from each token's region id, not stored: as a constant it would be baked into every
    compiled program and kept per image size (43 MB for one Urban100 image at x2)."""

    def band(length: int) -> Array:  # 0 before the last window, 1 in it before the shift, 2 from the shift on
        i = jnp.arange(length)
        return (i >= length - ws).astype(jnp.int32) + (i >= length - shift).astype(jnp.int32)

    region = band(h)[:, None] * 3 + band(w)[None, :]
    ids = window_partition(region[None, :, :, None], ws)[..., 0]  # (nW, ws*ws)
    return jnp.where(ids[:, None, :] != ids[:, :, None], jnp.float32(-100.0), jnp.float32(0.0))


def flip_pad(x: Array, multiple: int) -> Array:
    """Pad H and W up to a multiple by appending the flipped image (2DQuant's test-time padding), again and again
    for an image shorter than half the multiple: x, flip(x), x, ..."""
    _, h, w, _ = x.shape
    return _mirror_extend(_mirror_extend(x, 1, h + -h % multiple), 2, w + -w % multiple)


def _mirror_extend(x: Array, axis: int, length: int) -> Array:
    while x.shape[axis] < length:
        x = jnp.concatenate([x, jnp.flip(x, axis)], axis)
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def pixel_shuffle(x: Array, r: int) -> Array:
    """NHWC PixelShuffle with PyTorch's channel order: channel c*r*r + i*r + j -> pixel (i, j) of c."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


# ----------------------------------------------------------------------------------------------------------
# Layers

LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)
Conv3x3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1)


class QuantDense(nn.Module):
    """A Linear layer with an input-activation site ("act") and a weight site ("weight")."""

    features: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.truncated_normal(0.02), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dims = (((x.ndim - 1,), (0,)), ((), ()))  # (..., in) x (in, out) -> (..., out)
        y = site_dot_general(self, self.site, ("act", x), ("weight", kernel), dims, self.dtype)
        return y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class QKV(nn.Module):
    """The qkv linear split into q, k, v, each with its own sites (official `qkv_separation: True`)."""

    dim: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        dense = functools.partial(QuantDense, self.dim, self.site, self.dtype)
        return dense(name="q")(x), dense(name="k")(x), dense(name="v")(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias and an optional shift mask."""

    dim: int
    num_heads: int
    window_size: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        ws, heads = self.window_size, self.num_heads
        bn, n, c = x.shape  # (B*nW, ws*ws, C)
        table = self.param(
            "relative_position_bias_table", nn.initializers.truncated_normal(0.02), ((2 * ws - 1) ** 2, heads)
        )

        def split_heads(t):  # (B*nW, n, C) -> (B*nW, heads, n, C/heads)
            return t.reshape(bn, n, heads, c // heads).transpose(0, 2, 1, 3)

        q, k, v = (split_heads(t) for t in QKV(self.dim, self.site, self.dtype, name="qkv")(x))
        qk = (((3,), (3,)), ((0, 1), (0, 1)))  # q k^T per window and head: (B*nW, heads, n, n)
        attn = site_dot_general(self, self.site, ("q_scaled", q * (c // heads) ** -0.5), ("k", k), qk)
        bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
        attn = attn + bias.astype(attn.dtype)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bn // nw, nw, heads, n, n) + mask.astype(attn.dtype)[None, :, None, :, :]
            attn = attn.reshape(bn, heads, n, n)
        attn = softmax(attn)
        # Heads-major output (B*nW, heads, n, d), then one transpose: XLA:CPU runs this batched matmul 2.5x
        # faster than one that writes (B*nW, n, heads, d) directly.
        pv = (((3,), (2,)), ((0, 1), (0, 1)))
        x = site_dot_general(self, self.site, ("probs", attn), ("v", v), pv).transpose(0, 2, 1, 3).reshape(bn, n, c)
        return QuantDense(self.dim, self.site, self.dtype, name="proj")(x)


@jax.custom_vjp
def softmax(x: Array) -> Array:
    """jax.nn.softmax over the last axis, differentiated from its output alone as PyTorch does:
    dx = y * (g - sum(g * y)). Autodiff through jax.nn.softmax's exp and sum reads more score-sized tensors
    in the backward pass: a DQC step about 4% longer (benchmarks/README.md)."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: Array) -> tuple[Array, Array]:
    y = softmax(x)
    return y, y


def _softmax_bwd(y: Array, g: Array) -> tuple[Array]:
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def gelu(x: Array) -> Array:
    """Exact GELU in PyTorch's erf form; jax.nn.gelu's erfc form compiles to a costlier two-branch polynomial."""
    return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


class Mlp(nn.Module):
    dim: int
    hidden: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = QuantDense(self.hidden, self.site, self.dtype, name="fc1")(x)
        x = gelu(x)
        return QuantDense(self.dim, self.site, self.dtype, name="fc2")(x)


class SwinBlock(nn.Module):
    """Swin Transformer block: (shifted) window attention and MLP, each pre-normed with a residual."""

    dim: int
    num_heads: int
    window_size: int
    shift: int
    mlp_hidden: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> Array:
        (h, w), ws, shift = hw, self.window_size, self.shift
        b, _, c = x.shape  # (B, H*W, C)
        y = LayerNorm(name="norm1", dtype=self.dtype)(x).reshape(b, h, w, c)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(h, w, ws, shift) if shift else None
        attn = WindowAttention(self.dim, self.num_heads, ws, self.site, self.dtype, name="attn")
        y = window_reverse(attn(window_partition(y, ws), mask), ws, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y.reshape(b, h * w, c)
        mlp = Mlp(self.dim, self.mlp_hidden, self.site, self.dtype, name="mlp")
        return x + mlp(LayerNorm(name="norm2", dtype=self.dtype)(x))


class BasicLayer(nn.Module):
    """One stage's stack of Swin blocks, shifting every other block by half a window."""

    config: SwinIRConfig
    depth: int
    num_heads: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> Array:
        cfg, ws = self.config, self.config.window_size
        # Inputs are flip-padded to a multiple of the window, so the window never shrinks: the official
        # model, built for 64x64 patches, keeps window 8 and shift 4 at every test size too.
        blocks = [
            SwinBlock(
                cfg.embed_dim, self.num_heads, ws, ws // 2 if j % 2 else 0, cfg.mlp_hidden, self.site,
                self.dtype, name=f"blocks_{j}",
            )
            for j in range(self.depth)
        ]
        return run_blocks(self, blocks, x, hw, remat=self.remat, scan=self.scan)


def run_blocks(
    parent: nn.Module, blocks: list[nn.Module], x: Array, hw: tuple[int, int], *, remat: bool, scan: bool
) -> Array:
    """`x = block(x, hw)` for each of a stage's blocks in turn.

    In a pure apply the blocks run as pure functions of their variables, and each (unshifted, shifted) pair
    that matches the first pair (variables of the same structure: the same sites at the same bits) is one
    iteration of a `lax.scan`. XLA compiles the pair once instead of once per pair: a DQC step compiles
    about 2.5x faster (x4, batch 4 of 32x32, 2-core CPU: 29 -> 11 s) and runs no slower there; on a GPU the
    scan's per-iteration bookkeeping costs run time instead (`DQCConfig.block_execution`). `remat` recomputes
    each block in the backward pass instead of storing its activations; inside the scan the recomputation
    can only run in the backward loop (unrolled, XLA:CPU drops `jax.checkpoint`'s barriers and schedules it
    back into the forward pass). Mutable applies (init, DOBI's bound search, `sow`) call the blocks one by
    one, since neither a scan nor a checkpoint can carry mutations out.
    """
    if not is_filter_empty(parent.scope.mutable):
        for block in blocks:
            x = block(x, hw)
        return x

    variables = [{col: tree[b.name] for col, tree in parent.variables.items() if b.name in tree} for b in blocks]

    def apply(j: int):
        fn = functools.partial(blocks[j].clone(parent=None, name=None).apply, hw=hw)
        return jax.checkpoint(fn) if remat else fn

    paired = len(blocks) // 2 * 2 if scan else 0
    if not all(jax.tree.structure(variables[j]) == jax.tree.structure(variables[j % 2]) for j in range(paired)):
        paired = 0
    if paired:
        stack = lambda group: jax.tree.map(lambda *leaves: jnp.stack(leaves), *group)
        pair = lambda x, v: (apply(1)(v[1], apply(0)(v[0], x)), None)
        x, _ = jax.lax.scan(pair, x, (stack(variables[0:paired:2]), stack(variables[1:paired:2])))
    for j in range(paired, len(blocks)):
        x = apply(j)(variables[j], x)
    return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: a stage of Swin blocks, a 3x3 conv, and a residual add."""

    config: SwinIRConfig
    depth: int
    num_heads: int
    site: SiteFn
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> tuple[Array, Array]:
        b, _, c = x.shape
        feature = BasicLayer(
            self.config, self.depth, self.num_heads, self.site, self.dtype, self.remat, self.scan,
            name="residual_group",
        )(x, hw)
        y = Conv3x3(c, name="conv", dtype=self.dtype)(feature.reshape(b, *hw, c))
        return y.reshape(b, -1, c) + x, feature


class SwinIR(nn.Module):
    """SwinIR for super-resolution. Input (B, H, W, C) in [0, 1], any H, W >= 1; output (B, sH, sW, C).

    Returns `(output, stage_features)` with the four stage features shaped (B, H'*W', embed_dim), where
    H', W' are H, W flip-padded up to a multiple of the window. `remat` recomputes each Swin block in the
    backward pass instead of storing its activations (see `run_blocks`): the same arithmetic, though XLA
    may round it differently.
    """

    config: SwinIRConfig
    site: SiteFn = full_precision
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan: bool = True

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, tuple[Array, ...]]:
        cfg, s = self.config, self.config.upscale
        _, h, w, _ = x.shape
        x = flip_pad(x, cfg.window_size)
        b, hp, wp, _ = x.shape
        mean = jnp.asarray(RGB_MEAN if cfg.in_chans == 3 else (0.0,) * cfg.in_chans, x.dtype).reshape(1, 1, 1, -1)
        x = (x - mean) * cfg.img_range

        x = Conv3x3(cfg.embed_dim, name="conv_first", dtype=self.dtype)(x)
        tokens = LayerNorm(name="patch_embed_norm", dtype=self.dtype)(x.reshape(b, hp * wp, -1))
        features = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            stage = RSTB(cfg, depth, heads, self.site, self.dtype, self.remat, self.scan, name=f"layers_{i}")
            tokens, feature = stage(tokens, (hp, wp))
            features.append(feature)
        tokens = LayerNorm(name="norm", dtype=self.dtype)(tokens)
        body = Conv3x3(cfg.embed_dim, name="conv_after_body", dtype=self.dtype)(tokens.reshape(b, hp, wp, -1))
        x = body + x

        if cfg.upsampler == "pixelshuffledirect":
            x = pixel_shuffle(Conv3x3(cfg.in_chans * s * s, name="upsample_0", dtype=self.dtype)(x), s)
        else:
            x = nn.leaky_relu(Conv3x3(cfg.num_feat, name="conv_before_upsample_0", dtype=self.dtype)(x), 0.01)
            for i, r in enumerate(_upsample_steps(s)):
                x = pixel_shuffle(Conv3x3(cfg.num_feat * r * r, name=f"upsample_{2 * i}", dtype=self.dtype)(x), r)
            x = Conv3x3(cfg.in_chans, name="conv_last", dtype=self.dtype)(x)

        x = x.astype(mean.dtype) / cfg.img_range + mean  # in the input dtype, whatever the compute dtype
        return x[:, : h * s, : w * s], tuple(features)


def _upsample_steps(scale: int) -> tuple[int, ...]:
    """PixelShuffle factors of SwinIR's `Upsample`: log2(scale) steps of 2, or one step of 3."""
    return (3,) if scale == 3 else (2,) * int(math.log2(scale))


# ----------------------------------------------------------------------------------------------------------
# Params against a config


@functools.lru_cache(maxsize=16)
def param_shapes(config: SwinIRConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter shapes of SwinIR under `config`, keyed by '/'-joined path (traced, no compute; once per
    config: the dict is shared, not to be changed)."""
    size = 2 * config.window_size
    x = jax.ShapeDtypeStruct((1, size, size, config.in_chans), jnp.float32)
    return _leaf_shapes(jax.eval_shape(SwinIR(config).init, jax.random.PRNGKey(0), x)["params"])


def check_params(config: SwinIRConfig, params: Mapping) -> None:
    """A one-line ValueError unless every param has the shape `config` implies, none missing or extra: params that
    do not fit would otherwise fail deep inside the model, or export as if sound."""
    saved = _leaf_shapes(params)
    # Tracing SwinIR for its shapes builds a module per block and (window**2, window**2) arrays, so a config
    # bigger than its params (an edited depths or window_size) is refused before it can exhaust time or memory.
    rows = [shape[0] if shape else 0 for path, shape in saved.items() if path.endswith("/relative_position_bias_table")]
    if len(rows) != sum(config.depths) or set(rows) != {(2 * config.window_size - 1) ** 2}:
        raise ValueError(
            f"config depths {list(config.depths)}, window {config.window_size} do not match its params "
            f"({len(rows)} blocks, bias tables of {sorted(set(rows))} rows)"
        )
    check_param_shapes(param_shapes(config), params, describe(config))


def check_param_shapes(expected: Mapping[str, tuple[int, ...]], params: Mapping, description: str) -> None:
    """A one-line ValueError unless `params` hold exactly the leaves of `expected` ('/'-joined path -> shape) at
    those shapes, naming the first missing, extra or misshapen one and the model `description`."""
    saved = _leaf_shapes(params)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match {description}: {len(missing)} missing {missing[:2]}, "
            f"{len(unexpected)} unexpected {unexpected[:2]}"
        )
    for path, shape in expected.items():
        if saved[path] != shape:
            raise ValueError(f"param {path} has shape {saved[path]}; {description} needs {shape}")


def _leaf_shapes(tree: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape, for every leaf of a nested mapping."""
    shapes = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            shapes |= _leaf_shapes(value, f"{prefix}{key}/")
        else:
            shapes[f"{prefix}{key}"] = tuple(np.shape(value))
    return shapes
