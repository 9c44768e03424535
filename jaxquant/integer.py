"""The integer forward: every quantized matmul multiplies integer codes, with the scales and offsets applied after.

2DQuant (Liu et al., NeurIPS 2024) quantizes both operands of each linear layer and attention matmul with its own
asymmetric [l, u] (quant.py). With x = s_x q_x + l_x and w = s_w q_w + l_w (codes q in [0, 2^b - 1], K the
contracted length), a product splits into one integer matmul and an epilogue:

    x . w = s_x s_w (q_x . q_w) + s_x l_w rowsum(q_x) + l_x s_w colsum(q_w) + K l_x l_w

`q_x . q_w` runs as `lax.dot_general` on int8 containers with int32 accumulation; the epilogue is float32 (the
int32 result is exact: at most K (2^b - 1)^2 = 120 * 255^2 < 2^24 for SwinIR-light). An activation becomes codes
once, at its site; a weight arrives as codes (`IntegerModel` holds them, as a low-bit file does), and no
dequantized weight is materialised. Codes of b <= 7 bits fit int8; 8-bit codes (up to 255) do not, and use int16
containers, still accumulated in int32.

    model = load_integer_model("model_w2a2.safetensors")   # or IntegerModel.from_model(model)
    sr = model(lr)                                                              # (B, H, W, 3) in [0, 1]

The product differs from the fake-quant forward's float matmul of dequantized values only in float rounding, so
the next site's codes can flip where a value lies at a rounding tie; a flipped code moves later values by a whole
step, so in a free-running forward the flips compound with depth. `IntegerSites(record=...)` and
`recording_fake_quant` sow the codes at chosen activation sites, to count how many agree, free-running or teacher
forced (each site compared on the fake-quant forward's inputs, so only its own products' rounding counts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Mapping, NamedTuple

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
    """One side of a product as codes: x = scale * codes + offset."""

    codes: Array
    scale: Array
    offset: Array


@dataclasses.dataclass(frozen=True)
class IntegerSites:
    """The integer forward's `MatmulSiteFn` (`swinir.site_dot_general`). A matmul whose two operands both have
    bounds runs on their codes; any other matmul and any lone site run as in the fake-quant model.

    `record`: a regex; the codes of each activation site whose path fully matches are sown into the "codes"
    collection (apply with `mutable=["codes"]`). `teacher_forced`: each recorded site goes on with the codes a
    "reference" collection holds for it (the fake-quant forward's, `recording_fake_quant`) instead of its own, so
    its own codes differ from those only by the rounding of the products since the previous site.
    """

    record: str | None = None
    teacher_forced: bool = False

    def __call__(self, module: nn.Module, name: str, x: Array) -> Array:
        return quantized_site(module, name, x)

    def dot_general(self, module: nn.Module, lhs: tuple[str, Array], rhs: tuple[str, Array], dims) -> Array:
        if not all(module.has_variable("bounds", name) for name, _ in (lhs, rhs)):
            a, b = (quantized_site(module, name, x) for name, x in (lhs, rhs))
            return jax.lax.dot_general(a, b, dims)
        a, b = (self._operand(module, name, x) for name, x in (lhs, rhs))
        return integer_dot_general(a, b, dims)

    def _operand(self, module: nn.Module, name: str, x: Array) -> Operand:
        bounds = module.get_variable("bounds", name)
        if jnp.issubdtype(x.dtype, jnp.integer):  # a weight held as its codes
            codes = x
        else:
            codes = integer_view(x.astype(jnp.float32), bounds.lu, bounds.bits)[0]
            if self.record is not None and re.fullmatch(self.record, "/".join((*module.scope.path, name))):
                module.sow("codes", name, codes)
                if self.teacher_forced:
                    (codes,) = module.get_variable("reference", name)
        scale, offset = (t.astype(jnp.float32) for t in integer_affine(bounds.lu, bounds.bits))
        return Operand(codes.astype(container(bounds.bits)), scale, offset)


def integer_dot_general(a: Operand, b: Operand, dims) -> Array:
    """`lax.dot_general` of the two dequantized operands, computed on their codes (module docstring). The output's
    axes are dot_general's: batch, then a's free axes, then b's."""
    (a_contract, b_contract), (a_batch, b_batch) = dims
    product = jax.lax.dot_general(a.codes, b.codes, dims, preferred_element_type=jnp.int32)
    a_free = [d for d in range(a.codes.ndim) if d not in (*a_contract, *a_batch)]
    b_free = [d for d in range(b.codes.ndim) if d not in (*b_contract, *b_batch)]
    # Each operand's codes summed over the contracted axes, laid out on the output's axes (size 1 elsewhere).
    a_sums = jnp.sum(a.codes, axis=a_contract, dtype=jnp.int32, keepdims=True).transpose(*a_batch, *a_free, *a_contract)
    a_sums = a_sums.reshape(*a_sums.shape[: len(a_batch) + len(a_free)], *(1,) * len(b_free))
    b_sums = jnp.sum(b.codes, axis=b_contract, dtype=jnp.int32, keepdims=True).transpose(*b_batch, *b_free, *b_contract)
    b_sums = b_sums.reshape(*b_sums.shape[: len(b_batch)], *(1,) * len(a_free), *(b.codes.shape[d] for d in b_free))
    length = math.prod(a.codes.shape[d] for d in a_contract)
    f32 = lambda t: t.astype(jnp.float32)
    return (
        (a.scale * b.scale) * f32(product)
        + (a.scale * b.offset) * f32(a_sums)
        + (a.offset * b.scale) * f32(b_sums)
        + jnp.float32(length) * a.offset * b.offset
    )


def recording_fake_quant(record: str):
    """The fake-quant `SiteFn`, sowing into "codes" the codes of each activation site whose path fully matches
    `record` (what `IntegerSites(record)` sows, to compare the two forwards site by site)."""

    def site(module: nn.Module, name: str, x: Array) -> Array:
        path = "/".join((*module.scope.path, name))
        if module.has_variable("bounds", name) and not path.endswith("/weight") and re.fullmatch(record, path):
            bounds = module.get_variable("bounds", name)
            module.sow("codes", name, integer_view(x, bounds.lu, bounds.bits)[0])
        return quantized_site(module, name, x)

    return site


class IntegerModel(NamedTuple):
    """SwinIR for the integer forward: `params` with each quantized kernel as its codes (uint8, the kernel's
    shape), and every site's bounds."""

    config: models.ModelConfig
    params: Mapping
    bounds: Mapping

    @classmethod
    def from_lowbit(cls, lowbit: LowBitModel) -> "IntegerModel":
        flat = flatten_dict(lowbit.params, sep="/") | {kernel_path(s): jnp.asarray(c) for s, c in lowbit.codes.items()}
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


def agreeing_codes(a: Mapping, b: Mapping) -> dict[str, tuple[int, int]]:
    """Per site path, (agreeing, total) codes of two "codes" collections sown by the two forwards."""
    flat_a, flat_b = (flatten_dict(c, sep="/") for c in (a, b))
    if set(flat_a) != set(flat_b):
        raise ValueError(f"the forwards recorded different sites: {sorted(set(flat_a) ^ set(flat_b))[:3]}")
    return {path: (int(np.sum(np.asarray(flat_a[path]) == np.asarray(flat_b[path]))), int(np.size(flat_a[path])))
            for path in flat_a}
