"""The 2DQuant quantizer and its sites, as pure functions over a pytree of bounds.

Paper: Liu et al., "2DQuant: Low-bit Post-Training Quantization for Image Super-Resolution", NeurIPS 2024,
Eq. 1-2. Official code: github.com/Kai-Liu001/2DQuant, `basicsr/archs/quant_arch.py` (`FakeQuantizerAct`,
`FakeQuantizerWeight`, `Differentiable_Clip`, `Differentiable_Round`).

    s = (u - l) / (2^N - 1),    x_hat = s * round((clip(x, l, u) - l) / s) + l

One (l, u) pair per site (per-tensor, asymmetric). Gradients: round is straight-through; clip follows the
official rule (dx = g inside [l, u]; dl = sum of g where x <= l; du = sum of g where x >= u; ties count for
both); autodiff through s and the affine terms then gives the paper's Eq. 2.

Bounds are data: a nested dict mirroring the model's module tree, one `Bounds(lu, bits)` per quantized site,
passed to the model as the Flax variable collection "bounds". A site without an entry stays full precision,
so the FP model is the quantized model with no bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Iterable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant import models
from jaxquant.models import ModelConfig

Array = jax.Array

# The smallest step a clamped bound pair may have: keeps s > 0 (no NaN) if optimisation crosses u below l.
MIN_RANGE = 1e-8
# The bit widths a site may have: 2DQuant's W2..W4 and up to 8, whose codes still fit a uint8 (1 bit is not a
# grid of the paper's quantizer: its single step spans [l, u]).
BIT_WIDTHS = range(2, 9)


@flax.struct.dataclass
class Bounds:
    """Clipping bounds of one site: `lu = [lower, upper]` (shape (2,)); `bits` is static."""

    lu: Array
    bits: int = flax.struct.field(pytree_node=False)

    def __post_init__(self):
        check_bits(self.bits)


# ----------------------------------------------------------------------------------------------------------
# The quantizer


def check_bits(bits, where: str | None = None) -> None:
    """A one-line ValueError unless `bits` is a Python int in `BIT_WIDTHS` (exactly int: not True, not 4.0)."""
    if type(bits) is not int or bits not in BIT_WIDTHS:
        raise ValueError(f"bit width {bits!r}{f' of {where}' if where else ''}: expected an integer "
                         f"{BIT_WIDTHS[0]}..{BIT_WIDTHS[-1]}")


def is_traced(x) -> bool:
    """Whether `x` is a tracer (under jit, grad or vmap): its values cannot be checked, only its shape."""
    return isinstance(x, jax.core.Tracer)


def check_finite_pair(lu, where: str = "bounds") -> np.ndarray:
    """`lu` as an array; a one-line ValueError unless it is a finite [lower, upper] pair."""
    lu = np.asarray(lu)
    if lu.shape != (2,):
        raise ValueError(f"{where}: expected [lower, upper], got shape {lu.shape}")
    if np.all(np.isnan(lu)):
        raise ValueError(f"{where}: uncalibrated bounds (init_bounds leaves them NaN): calibrate them first")
    if not np.all(np.isfinite(lu)):
        raise ValueError(f"{where}: non-finite bounds {lu.tolist()}")
    return lu


def check_bounds(lu, where: str = "bounds") -> None:
    """Raise a one-line ValueError unless `lu` is a finite pair with lower < upper. Traced bounds (under jit,
    grad or vmap) are let through: only their shape is known, and the traced quantizer keeps its step positive."""
    if is_traced(lu):
        if jnp.shape(lu) != (2,):
            raise ValueError(f"{where}: expected [lower, upper], got shape {jnp.shape(lu)}")
        return
    lu = check_finite_pair(lu, where)
    if not lu[0] < lu[1]:
        raise ValueError(f"{where}: upper bound {lu[1]} must exceed lower bound {lu[0]}")


def step_size(lu: Array, bits: int) -> Array:
    """s = (u - l) / (2^bits - 1), kept positive when traced bounds cross (checked eagerly otherwise)."""
    return true_divide(jnp.maximum(lu[1] - lu[0], MIN_RANGE), jnp.asarray(2**bits - 1, lu.dtype))


def true_divide(x: Array, s: Array) -> Array:
    """x / s as a real division. XLA's simplifier turns division by a constant or a broadcast scalar into
    multiplication by its reciprocal, which rounds differently from PyTorch in about 15% of elements and
    flips quantization codes; a divisor that depends on x (s + 0 * x, not folded for floats) stays a
    division."""
    return x / (s + 0 * x)


def fake_quant(x: Array, lu: Array, bits: int) -> Array:
    """Quantize-dequantize `x` on the uniform `bits`-bit grid spanning `lu = [l, u]` (paper Eq. 1)."""
    check_bits(bits)
    check_bounds(lu)
    s = step_size(lu, bits).astype(x.dtype)  # autodiff through s gives the affine terms of Eq. 2
    return _quantize_dequantize(x, lu[0].astype(x.dtype), lu[1].astype(x.dtype), s)


def _sum_together(*arrays: Array) -> tuple[Array, ...]:
    """The sums of same-shaped arrays in one pass over their inputs, accumulated in at least float32. Separate
    sums make XLA:CPU write each masked array out before reducing it (~4% of a DQC step). A variadic reduce
    over the last axis, then a sum of the rows: one running sum over the whole tensor would lose precision."""
    dtype = jnp.promote_types(arrays[0].dtype, jnp.float32)
    rows = jax.lax.reduce(
        tuple(a.astype(dtype).reshape(-1, a.shape[-1] if a.ndim else 1) for a in arrays),
        (jnp.zeros((), dtype),) * len(arrays),
        lambda acc, a: tuple(p + q for p, q in zip(acc, a)),
        (1,),
    )
    return tuple(jnp.sum(r) for r in rows)


@jax.custom_vjp
def _quantize_dequantize(x: Array, lower: Array, upper: Array, s: Array) -> Array:
    """s * round((clip(x, l, u) - l) / s) + l, with s an independent input."""
    return s * jnp.round(true_divide(jnp.clip(x, lower, upper) - lower, s)) + lower


def _quantize_dequantize_fwd(x, lower, upper, s):
    # Only x is kept and t is recomputed from it: cheaper than storing t and the clip masks.
    return _quantize_dequantize(x, lower, upper, s), (x, lower, upper, s)


def _quantize_dequantize_bwd(res, g):
    """Straight-through round and the official clip rule, summed by hand: with t = (clip(x) - l) / s,
    dx = g [l <= x <= u], dl = sum g [x <= l], du = sum g [x >= u], ds = sum g (round t - t).
    (The +l and the -l inside cancel for dl; ties count for both bounds.)"""
    x, lower, upper, s = res
    zero = jnp.zeros_like(g)
    t = true_divide(jnp.clip(x, lower, upper) - lower, s)
    dx = jnp.where((x >= lower) & (x <= upper), g, zero)
    dl, du, ds = _sum_together(
        jnp.where(x <= lower, g, zero), jnp.where(x >= upper, g, zero), g * (jnp.round(t) - t)
    )
    return dx, dl.astype(lower.dtype), du.astype(upper.dtype), ds.astype(s.dtype)


_quantize_dequantize.defvjp(_quantize_dequantize_fwd, _quantize_dequantize_bwd)


def integer_affine(lu: Array, bits: int) -> tuple[Array, Array]:
    """`(scale, offset)` of a site's codes: x_hat = scale * code + offset. Crossed bounds (l > u: DQC can reach
    them, and a checkpoint keeps them) clip every value to u, so the fake quantizer maps everything onto one point
    s round((u - l) / s) + l; that point is the offset, and every code is 0."""
    lu = jnp.asarray(lu)
    s = step_size(lu, bits)
    point = s * jnp.round(true_divide(lu[1] - lu[0], s)) + lu[0]
    return s, jnp.where(lu[0] > lu[1], point, lu[0])


def integer_view(x: Array, lu: Array, bits: int) -> tuple[Array, Array, Array]:
    """`(codes, scale, offset)` with uint8 codes in [0, 2^bits - 1] and `fake_quant(x) == codes * scale + offset`
    (jittable: `bits` static; crossed bounds as `integer_affine` says)."""
    check_bits(bits)
    if not is_traced(lu):
        check_finite_pair(lu)
    lu = jnp.asarray(lu)
    lower = lu[0].astype(x.dtype)
    s, offset = (t.astype(x.dtype) for t in integer_affine(lu, bits))
    codes = jnp.round(true_divide(jnp.clip(x, lower, lu[1].astype(x.dtype)) - lower, s))
    return jnp.where(lu[0] > lu[1], 0, codes).astype(jnp.uint8), s, offset


# ----------------------------------------------------------------------------------------------------------
# Sites


def site_path(module: nn.Module, name: str) -> str:
    return "/".join((*module.scope.path, name))


def quantized_site(module: nn.Module, name: str, x: Array) -> Array:
    """The quantized model's `SiteFn`: fake-quantize where the "bounds" collection has an entry."""
    if not module.has_variable("bounds", name):
        return x
    b = module.get_variable("bounds", name)
    return fake_quant(x, b.lu, b.bits)


def _recording_site(module: nn.Module, name: str, x: Array) -> Array:
    module.sow("sites", name, jax.ShapeDtypeStruct(x.shape, x.dtype), reduce_fn=lambda _, v: v, init_fn=lambda: None)
    return x


def list_sites(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every quantization site of the model under `config`: '/'-joined path -> tensor shape (for a small input:
    16x16 for SwinIR-light, 32x32 for NGswin)."""
    return dict(_traced_sites(config))


@functools.lru_cache(maxsize=16)
def _traced_sites(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`list_sites`, traced once per config (a trace of the whole model takes about half a second)."""
    size = models.architecture(config).probe_size(config)
    x = jax.ShapeDtypeStruct((1, size, size, config.in_chans), jnp.float32)

    def run(x):
        model = models.build(config, site=_recording_site)
        params = model.init(jax.random.PRNGKey(0), x)["params"]
        return model.apply({"params": params}, x, mutable=["sites"])[1]["sites"]

    sites = jax.eval_shape(run, x)
    return {"/".join(k): v.shape for k, v in flatten_dict(sites).items()}


def is_weight_site(path: str) -> bool:
    return path.endswith("/weight")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRules:
    """Which sites are quantized, at which bits: `(regex, bits or None)` pairs, first full match wins.

    Every site must match a rule (None keeps it in full precision), so a new site can never be skipped
    silently. `QuantRules.uniform(4)` is 2DQuant's W4A4 on all 384 sites.
    """

    rules: tuple[tuple[str, int | None], ...]

    def __post_init__(self):
        for pattern, bits in self.rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"quantization rule {pattern!r} is not a regular expression: {e}") from None
            if bits is not None:
                check_bits(bits, where=f"quantization rule {pattern!r}")

    @classmethod
    def uniform(cls, bits: int) -> "QuantRules":
        return cls(rules=((r".*", bits),))

    def rule_for(self, path: str) -> tuple[str, int | None]:
        """The first rule whose pattern fully matches `path`."""
        for pattern, bits in self.rules:
            if re.fullmatch(pattern, path):
                return pattern, bits
        raise ValueError(f"no quantization rule covers site {path!r}")

    def bits_by_site(self, sites: Iterable[str]) -> dict[str, int | None]:
        """Each site's bits; a ValueError names a rule that no site reaches (a typo, or an official quantizer
        name such as `.*mymodule_a` where site paths are meant), which would otherwise change nothing silently."""
        chosen = {path: self.rule_for(path) for path in sites}
        unused = [pattern for pattern, _ in self.rules if pattern not in {p for p, _ in chosen.values()}]
        if unused:
            example = next(iter(chosen), "")
            raise ValueError(f"quantization rule {unused[0]!r} applies to no site (earlier rules take them, or it "
                             f"matches none: rules match site paths such as {example!r})")
        return {path: bits for path, (_, bits) in chosen.items()}


def init_bounds(config: ModelConfig, rules: QuantRules, fill=(np.nan, np.nan)) -> dict:
    """A bounds pytree with one `Bounds` per quantized site. Its values are `fill`: NaN by default, to be
    calibrated (`dobi.calibrate`) or set; `quantize` refuses bounds left uncalibrated."""
    flat = {
        tuple(path.split("/")): Bounds(jnp.asarray(fill, jnp.float32), bits)
        for path, bits in rules.bits_by_site(list_sites(config)).items()
        if bits is not None
    }
    return unflatten_dict(flat)


def flat_bounds(bounds: Mapping) -> dict[str, Bounds]:
    """'/'-joined site path -> Bounds."""
    return {"/".join(k): v for k, v in flatten_dict(bounds, is_leaf=lambda _, v: isinstance(v, Bounds)).items()}


def nest_bounds(flat: Mapping[str, Bounds]) -> dict:
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def validate_bounds(bounds: Mapping) -> None:
    """Eager check of every site's bounds; the error names the site."""
    for path, b in flat_bounds(bounds).items():
        check_bounds(b.lu, where=path)


# ----------------------------------------------------------------------------------------------------------
# Official quantizer names (for exchanging bounds with the PyTorch code)

_OFFICIAL_LEAF = {
    "act": "act_quantizer", "weight": "weight_quantizer",
    "q_scaled": "mymodule_q", "k": "mymodule_k", "probs": "mymodule_a", "v": "mymodule_v",
}
_LOCAL_LEAF = {v: k for k, v in _OFFICIAL_LEAF.items()}


def official_name(path: str) -> str:
    """'layers_0/residual_group/blocks_1/attn/qkv/q/act' -> 'layers.0.residual_group.blocks.1.attn.qkv.q.act_quantizer'."""
    *parents, leaf = path.split("/")
    parents = [re.sub(r"^(layers|blocks)_(\d+)$", r"\1.\2", p) for p in parents]
    return ".".join([*parents, _OFFICIAL_LEAF[leaf]])


def local_path(official: str) -> str:
    """The inverse of `official_name`."""
    head, _, leaf = official.rpartition(".")
    if not head or leaf not in _LOCAL_LEAF:
        raise ValueError(f"not an official quantizer name: {official!r}")
    head = re.sub(r"(layers|blocks)\.(\d+)", r"\1_\2", head)
    return "/".join([*head.split("."), _LOCAL_LEAF[leaf]])


def bounds_to_official(bounds: Mapping) -> dict[str, list[float]]:
    return {official_name(p): [float(v) for v in np.asarray(b.lu)] for p, b in flat_bounds(bounds).items()}


def bounds_from_official(
    named: Mapping[str, Iterable[float]], config: ModelConfig, bits: int | Mapping[str, int]
) -> dict:
    """Bounds from `{official quantizer name: [l, u]}` at `bits` (one width, or one per name); every name must
    be a site of `config`."""
    sites = list_sites(config)
    flat = {}
    for name, lu in named.items():
        path = local_path(name)
        if path not in sites:
            raise ValueError(f"{name!r} is not a quantization site of this model")
        try:
            with np.errstate(over="ignore"):  # checked as stored: 1e300 is finite, but not in float32
                lu = np.asarray(lu, np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: bounds must be two numbers, got {lu!r}") from e
        check_bounds(lu, where=name)
        width = bits[name] if isinstance(bits, Mapping) else bits
        check_bits(width, where=name)
        flat[path] = Bounds(jnp.asarray(lu), width)
    return nest_bounds(flat)


# ----------------------------------------------------------------------------------------------------------
# The public entry point


@dataclasses.dataclass(frozen=True)
class QuantizedSwinIR:
    """A model (SwinIR or NGswin) with fake-quantized sites, run from plain pytrees:
    `y = QuantizedSwinIR(cfg, params, bounds)(x)`."""

    config: ModelConfig
    params: Mapping
    bounds: Mapping

    @property
    def module(self) -> nn.Module:
        return models.build(self.config, site=quantized_site)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "bounds": self.bounds}

    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) in [0, 1] -> (B, sH, sW, C)."""
        check_images(x, self.config.in_chans)
        return _apply_quantized(self.config, self.variables, x)


def check_images(x: Array, channels: int) -> None:
    """A one-line ValueError unless `x` is what the model takes: a float batch (B, H, W, channels), NHWC, with values
    in [0, 1] (checked where they are known, not under a trace)."""
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    if len(shape) != 4 or shape[-1] != channels:
        hint = " (NCHW? the model takes NHWC)" if len(shape) == 4 and shape[1] == channels else ""
        raise ValueError(f"images must be shaped (B, H, W, {channels}), got {shape}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"images must be floats in [0, 1], got {dtype} (divide uint8 images by 255)")
    if not is_traced(x):
        values = np.asarray(x)  # with numpy: inside a trace, jnp would trace even a concrete array
        lo, hi = float(values.min()), float(values.max())
        if not (0 <= lo and hi <= 1):  # NaN fails too
            raise ValueError(f"images must be in [0, 1], got values from {lo:g} to {hi:g}")


@functools.partial(jax.jit, static_argnums=0)
def _apply_quantized(config: ModelConfig, variables, x):
    return models.build(config, site=quantized_site).apply(variables, x)[0]


def quantize(
    params: Mapping | str | os.PathLike, bounds: Mapping | None = None, config: ModelConfig | None = None
) -> QuantizedSwinIR:
    """The quantized model: FP `params` (untouched) plus calibrated `bounds`, validated site by site. Without
    `config`, the architecture is read off the params (`models.config_from_params`); either way every param must
    have the shape the config implies. `params` may instead be a quantized model's path (a low-bit
    `.safetensors` file, a checkpoint or a run directory: `load_model`), which brings its own bounds and config."""
    if isinstance(params, (str, os.PathLike)):
        from jaxquant.checkpoint import load_model  # which imports this module

        if bounds is not None or config is not None:
            raise ValueError("a model path brings its own bounds and config: pass neither")
        model = load_model(params)
        if model.bounds is None:
            raise ValueError(f"{params} is an FP model: it has no bounds to quantize with")
        params, bounds, config = model.params, model.bounds, model.config
    if config is None:
        config = models.config_from_params(params)  # which checks the params against what it reads
    else:
        models.check_params(config, params)
    validate_bounds(bounds)
    unknown = set(flat_bounds(bounds)) - set(list_sites(config))
    if unknown:
        raise ValueError(f"bounds for unknown sites: {sorted(unknown)[:3]}")
    return QuantizedSwinIR(config, params, bounds)
