"""The integer forward: every quantized matmul multiplies integer codes, with the scales and offsets applied after.

2DQuant (Liu et al., NeurIPS 2024) quantizes both operands of each linear layer and attention matmul with its own
asymmetric [l, u] (quant.py). With x = s_x q_x + l_x and w = s_w q_w + l_w (codes q in [0, 2^b - 1], K the
contracted length), a product splits into one integer matmul and an epilogue:

    x . w = s_x s_w (q_x . q_w) + s_x l_w rowsum(q_x) + l_x s_w colsum(q_w) + K l_x l_w

`q_x . q_w` runs as `lax.dot_general` on int8 containers with int32 accumulation; the epilogue is float32 (the
int32 result is exact: at most K (2^b - 1)^2 = 120 * 255^2 < 2^24 for SwinIR-light). Each operand's codes are
first shifted by the code of the value nearest zero (`centred`, an exact rewrite with the same values), so that
the integer sums cancel exactly what the float32 epilogue would otherwise subtract with rounding. An activation
becomes codes once, at its site; a weight arrives as codes with its colsum (`IntegerModel` holds them, as a
low-bit file stores them), and no dequantized weight is materialised. Codes of b <= 7 bits fit int8; 8-bit codes
(up to 255) do not, and use int16 containers, still accumulated in int32.

    model = load_integer_model("model_w2a2.safetensors")   # or IntegerModel.from_model(model)
    sr = model(lr)                                                              # (B, H, W, 3) in [0, 1]

The product differs from the fake-quant forward's float matmul of dequantized values only in float rounding, so
the next site's codes can flip where a value lies at a rounding tie; a flipped code moves later values by a whole
step, so in a free-running forward the flips compound with depth. `ComparedSites` runs several forwards (their
products: `integer_dot_general`, `dequantized_product`, ...) side by side in one batch and counts, at every
activation site, the codes they agree on: free-running, and teacher forced (fed the first forward's codes at each
site, so that only the site's own products' rounding counts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant.checkpoint import SAFETENSORS, Model, load_model
from jaxquant.lowbit import LowBitModel, kernel_path, load_lowbit, to_lowbit
from jaxquant.quant import integer_affine, integer_view, quantized_site
from jaxquant import models

Array = jax.Array


def container(bits: int) -> jnp.dtype:
    """The integer type holding `bits`-bit unsigned codes for the matmul: int8 up to 7 bits, int16 at 8."""
    return jnp.int8 if bits <= 7 else jnp.int16


class Operand(NamedTuple):
    """One side of a product as codes: x = scale * codes + offset. `sums`: the codes summed over the contracted
    axes (keepdims), where they were computed beforehand (a weight's colsums); None: summed here."""

    codes: Array
    scale: Array
    offset: Array
    sums: Array | None = None


class IntegerWeight(NamedTuple):
    """A quantized kernel as the integer forward holds it, in the kernel's place among the params: its codes
    (in, out) uint8 and their colsums (1, out) int32 (`lowbit.column_sums`, computed when the file was made)."""

    codes: Array
    colsums: Array


@dataclasses.dataclass(frozen=True)
class IntegerSites:
    """The integer forward's `MatmulSiteFn` (`swinir.site_dot_general`). A matmul whose two operands both have
    bounds runs on their codes; any other matmul and any lone site run as in the fake-quant model."""

    def __call__(self, module: nn.Module, name: str, x: Array) -> Array:
        return quantized_site(module, name, x)

    def dot_general(self, module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array], dims) -> Array:
        if not both_quantized(module, lhs, rhs):
            return fake_quant_dot_general(module, lhs, rhs, dims)
        return integer_dot_general(*(operand(module, name, x) for name, x in (lhs, rhs)), dims)


def both_quantized(module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array]) -> bool:
    return all(module.has_variable("bounds", name) for name, _ in (lhs, rhs))


def fake_quant_dot_general(module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array], dims) -> Array:
    a, b = (quantized_site(module, name, x) for name, x in (lhs, rhs))
    return jax.lax.dot_general(a, b, dims)


def affine(module: nn.Module, name: str) -> tuple[Array, Array, int]:
    """(scale, offset, bits) of the site `name`'s codes, scale and offset in float32."""
    bounds = module.get_variable("bounds", name)
    scale, offset = (t.astype(jnp.float32) for t in integer_affine(bounds.lu, bounds.bits))
    return scale, offset, bounds.bits


def operand(module: nn.Module, name: str, x: Array | IntegerWeight) -> Operand:
    """The site `name`'s operand as codes: an activation quantized here, a weight as it is held."""
    scale, offset, bits = affine(module, name)
    if isinstance(x, IntegerWeight):
        return Operand(x.codes.astype(container(bits)), scale, offset, x.colsums)
    codes = integer_view(x.astype(jnp.float32), module.get_variable("bounds", name).lu, bits)[0]
    return Operand(codes.astype(container(bits)), scale, offset)


Product = Callable[[Operand, Operand, jax.lax.DotDimensionNumbers], Array]


def integer_dot_general(a: Operand, b: Operand, dims) -> Array:
    """`lax.dot_general` of the two dequantized operands, computed on their codes (module docstring), each
    operand first `centred`. The output's axes are dot_general's: batch, then a's free axes, then b's."""
    (a_contract, b_contract), _ = dims
    a, b = centred(a, a_contract), centred(b, b_contract)
    return epilogue(a, b, *integer_terms(a, b, dims))


def centred(op: Operand, contract) -> Operand:
    """`op` with its codes shifted by m, the code nearest zero (-offset / scale rounded, kept in [0, 127]): the
    same values, x = scale (q - m) + (offset + scale m), the new offset within half a step of zero where the grid
    spans zero. Codes of either sign then cancel exactly in the integer sums, where with codes >= 0 the float32
    epilogue would subtract terms far larger than the result and keep their rounding (docs/lowbit.md measures
    both). |q - m| <= max(2^b - 1, 127) fits the container, and the int32 product stays exact."""
    m = jnp.clip(jnp.round(-op.offset / op.scale), 0, 127)
    m = jnp.where(jnp.isnan(m), 0, m)  # a grid of one point at zero (scale 0)
    codes = op.codes - m.astype(op.codes.dtype)
    sums = None if op.sums is None else op.sums - math.prod(op.codes.shape[d] for d in contract) * m.astype(jnp.int32)
    return Operand(codes, op.scale, op.offset + op.scale * m, sums)


def epilogue(a: Operand, b: Operand, product: Array, a_sums: Array, b_sums: Array, length: int) -> Array:
    """The float32 epilogue: s_a s_b P + s_a l_b R + l_a s_b C + K l_a l_b (`integer_terms`)."""
    f32 = lambda t: t.astype(jnp.float32)
    return (
        (a.scale * b.scale) * f32(product)
        + (a.scale * b.offset) * f32(a_sums)
        + (a.offset * b.scale) * f32(b_sums)
        + jnp.float32(length) * a.offset * b.offset
    )


def integer_terms(a: Operand, b: Operand, dims) -> tuple[Array, Array, Array, int]:
    """The epilogue's integer inputs: the codes' int32 product, each operand's codes summed over the contracted
    axes (laid out on the product's axes, size 1 elsewhere), and the contracted length K."""
    (a_contract, b_contract), (a_batch, b_batch) = dims
    product = jax.lax.dot_general(a.codes, b.codes, dims, preferred_element_type=jnp.int32)
    a_free = [d for d in range(a.codes.ndim) if d not in (*a_contract, *a_batch)]
    b_free = [d for d in range(b.codes.ndim) if d not in (*b_contract, *b_batch)]
    # Each operand's codes summed over the contracted axes, laid out on the output's axes (size 1 elsewhere).
    a_sums = contracted_sums(a, a_contract).transpose(*a_batch, *a_free, *a_contract)
    a_sums = a_sums.reshape(*a_sums.shape[: len(a_batch) + len(a_free)], *(1,) * len(b_free))
    b_sums = contracted_sums(b, b_contract).transpose(*b_batch, *b_free, *b_contract)
    b_sums = b_sums.reshape(*b_sums.shape[: len(b_batch)], *(1,) * len(a_free), *(b.codes.shape[d] for d in b_free))
    return product, a_sums, b_sums, math.prod(a.codes.shape[d] for d in a_contract)


def contracted_sums(operand: Operand, contract) -> Array:
    """The operand's codes summed over the `contract` axes (keepdims, int32): its precomputed `sums` if it has them."""
    if operand.sums is not None:
        return operand.sums
    return jnp.sum(operand.codes, axis=contract, dtype=jnp.int32, keepdims=True)


def dequantized_product(a: Operand, b: Operand, dims) -> Array:
    """The fake-quant forward's product: both operands dequantized (`codes * scale + offset`, bitwise the fake
    quantizer's values, `quant.integer_view`) and multiplied by a float32 `lax.dot_general`."""
    dequantize = lambda op: op.codes.astype(jnp.float32) * op.scale + op.offset
    return jax.lax.dot_general(dequantize(a), dequantize(b), dims)


@dataclasses.dataclass(frozen=True)
class ComparedSites:
    """Several forwards side by side in one batch, counting where their activation codes agree (a `MatmulSiteFn`
    over `IntegerModel.variables`).

    The input's batch holds `copies` images: forward i < n = len(products) multiplies by `products[i]`, free
    running; with `teacher_forced`, forward n + j multiplies by `products[j + 1]`, teacher forced: at each site it
    goes on with forward 0's codes instead of its own. Each quantized matmul sows into "agreement", under its
    activation operands' site names, a (copies, copies) int32 matrix: entry (i, k) counts the codes (before any
    forcing) that forwards i and k agree on, the diagonal each forward's total. Lone sites and matmuls without
    bounds run as in the fake-quant model, alike for every forward.
    """

    products: tuple[Product, ...]
    teacher_forced: bool = True

    @property
    def copies(self) -> int:
        return 2 * len(self.products) - 1 if self.teacher_forced else len(self.products)

    def __call__(self, module: nn.Module, name: str, x: Array) -> Array:
        return quantized_site(module, name, x)

    def dot_general(self, module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array], dims) -> Array:
        if not both_quantized(module, lhs, rhs):
            return fake_quant_dot_general(module, lhs, rhs, dims)
        a_batch = dims[1][0]
        if isinstance(lhs[1], IntegerWeight) or a_batch[:1] not in ((), (0,)):
            raise ValueError("ComparedSites splits the forwards along the first axis of the left operand, an "
                             "activation, and of the product")
        a, b = (self._per_forward(module, name, x) for name, x in (lhs, rhs))
        products = (*self.products, *self.products[1:]) if self.teacher_forced else self.products
        return jnp.concatenate([product(a[i], b[i], dims) for i, product in enumerate(products)], axis=0)

    def _per_forward(self, module: nn.Module, name: str, x: Array | IntegerWeight) -> list[Operand]:
        """The operand of each forward: a weight is shared; an activation's codes are split along the first axis,
        counted, and forward 0's go to the teacher-forced forwards."""
        op = operand(module, name, x)
        if isinstance(x, IntegerWeight):
            return [op] * self.copies
        codes = op.codes.reshape(self.copies, -1, *op.codes.shape[1:])
        flat = codes.reshape(self.copies, -1)
        # row by row: a (copies, copies, size) comparison at once would hold copies^2 times the codes
        counts = jnp.stack([jnp.sum(flat == row[None], axis=-1, dtype=jnp.int32) for row in flat])
        module.sow("agreement", name, counts)
        n = len(self.products)
        forced = jnp.concatenate([codes[:n], jnp.broadcast_to(codes[:1], codes[n:].shape)])
        return [op._replace(codes=c) for c in forced]


class IntegerModel(NamedTuple):
    """SwinIR for the integer forward: `params` with each quantized kernel as an `IntegerWeight` (its codes and
    their colsums), and every site's bounds."""

    config: models.ModelConfig
    params: Mapping
    bounds: Mapping

    @classmethod
    def from_lowbit(cls, lowbit: LowBitModel) -> "IntegerModel":
        flat = flatten_dict(lowbit.params, sep="/") | {
            kernel_path(site): IntegerWeight(jnp.asarray(codes), jnp.asarray(lowbit.colsums[site])[None])
            for site, codes in lowbit.codes.items()}
        return cls(lowbit.config, unflatten_dict(flat, sep="/"), lowbit.bounds)

    @classmethod
    def from_model(cls, model: Model) -> "IntegerModel":
        """The integer forward of a quantized `model` (its weights quantized once, here)."""
        if model.bounds is None:
            raise ValueError("the integer forward needs a quantized model (this one has no bounds)")
        return cls.from_lowbit(to_lowbit(model))

    @property
    def variables(self) -> dict:
        return {"params": self.params, "bounds": self.bounds}

    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) in [0, 1] -> (B, sH, sW, C)."""
        return integer_forward(self.config, self.variables, x)


def load_integer_model(source: str | Path) -> IntegerModel:
    """The integer forward of a quantized model at `source`: a low-bit file's stored codes, or any other
    `load_model` source's weights quantized here."""
    if Path(source).suffix == SAFETENSORS and Path(source).is_file():
        return IntegerModel.from_lowbit(load_lowbit(source))
    return IntegerModel.from_model(load_model(source))


@functools.partial(jax.jit, static_argnums=0)
def integer_forward(config: models.ModelConfig, variables: Mapping, x: Array) -> Array:
    return models.build(config, site=IntegerSites()).apply(variables, x)[0]


def compared_forward(config: models.ModelConfig, variables: Mapping, images: Array, sites: ComparedSites):
    """`sites`' forwards of `images` (sites.copies, H, W, C), one per image: their outputs (copies, sH, sW, C) and
    {site path: (copies, copies) agreement counts} (`ComparedSites`)."""
    out, state = _compared_forward(config, sites, variables, images)
    return out, {path: np.asarray(counts[0]) for path, counts in flatten_dict(state["agreement"], sep="/").items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compared_forward(config, sites, variables, images):
    (out, _), state = models.build(config, site=sites).apply(variables, images, mutable=["agreement"])
    return out, state
