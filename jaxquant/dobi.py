"""DOBI (distribution-oriented bound initialization, 2DQuant section 3.2) and the MinMax / Percentile baselines.

Paper: Liu et al., "2DQuant", NeurIPS 2024. Official code: `DOBI` in `basicsr/archs/quant_arch.py`
(github.com/Kai-Liu001/2DQuant), which loops over candidates in Python and syncs to the host for each.

Here one jitted FP pass over the calibration batch runs the search at every site as the tensor appears
(`calibration_site` is the model's `SiteFn`), so no site's tensor outlives its own search. The K candidate
errors of a site are evaluated in parallel with `lax.map(batch_size=...)`: vmapped for small tensors,
one candidate at a time for large ones (memory stays at one copy of the tensor), then `argmin` keeps the first minimum (i = 0, plain min/max, wins ties).

Candidates for a tensor with range R = max - min (spec section 4):
- symmetric (official, every site): l_i = min + i R/(2K), u_i = max - i R/(2K), i = 0..K-1;
- one-sided (for long-tailed tensors: softmax output, fc2 input): l = min, u_i = max - i R/(2K) (the paper's
  step, strategy `paper`) or u_i = max - i R/K (the official code's `one_direction` branch, which it never
  enables; strategy `official-one-sided`). With R/(2K) the last candidate still keeps half the range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.quant import Bounds, fake_quant, true_divide
from jaxquant import models, parallel
from jaxquant.models import ModelConfig

Array = jax.Array
Method = Literal["minmax", "percentile", "dobi"]
Strategy = Literal["official", "paper", "official-one-sided"]

# Candidates evaluated together (vmapped) stay under this many elements; larger tensors loop over
# candidates one at a time, which XLA's CPU reductions run fastest and which keeps memory at one copy.
VMAP_ELEMENTS = 1 << 18


def is_long_tailed(path: str) -> bool:
    """Sites the paper searches one-sided: the softmax output and the fc2 input (post-GELU; SwinIR's MLP is `mlp`,
    NGswin's `ffn`)."""
    return path.endswith(("attn/probs", "mlp/fc2/act", "ffn/fc2/act"))


def candidate_bounds(lo: Array, hi: Array, num: int, one_sided: bool, step_divisor: int = 2) -> Array:
    """(num, 2) candidate [l, u] pairs stepping by R / (step_divisor * num), in the official float32 arithmetic."""
    diff = true_divide(hi - lo, jnp.asarray(step_divisor * num, lo.dtype))
    # diff * i is non-decreasing, so sorting changes nothing but forces the product to be rounded to float32
    # before the add, as PyTorch does; fused into the add, XLA's CPU backend would emit a fused multiply-add.
    step = jax.lax.sort(diff * jnp.arange(num, dtype=lo.dtype))
    lower = jnp.full((num,), lo) if one_sided else lo + step
    return jnp.stack([lower, hi - step], axis=1)


def quantization_error(x: Array, lu: Array, bits: int) -> Array:
    """Squared L2 error ||x - Q(x)||^2 (same argmin as the official norm) of each row of `x` (its leading axis)."""
    return jnp.sum(jnp.square(x - fake_quant(x, lu, bits)).reshape(x.shape[0], -1), axis=1)


def dobi_search(
    x: Array, bits: int, *, num_candidates: int = 100, one_sided: bool = False, step_divisor: int = 2
) -> Array:
    """The [l, u] among the candidates that minimizes the quantization error of `x`; first minimum wins.

    Where a batch is split over devices (`parallel`), so is an activation's leading axis (the batch, or batch x
    windows): the min and max combine exactly, and each candidate's error is summed over the per-row errors
    gathered whole, in one order whatever the device count, so the bounds do not depend on it."""
    cands = candidate_bounds(jnp.min(x), jnp.max(x), num_candidates, one_sided, step_divisor)
    batch = max(1, min(num_candidates, VMAP_ELEMENTS // x.size))
    errors = jax.lax.map(lambda lu: quantization_error(x, lu, bits), cands, batch_size=batch)  # (K, rows)
    return cands[jnp.argmin(jnp.sum(parallel.gather(errors), axis=1))]


def minmax_bounds(x: Array) -> Array:
    return jnp.stack([jnp.min(x), jnp.max(x)])


def percentile_bounds(x: Array, percentile: float) -> Array:
    """[q(100 - p), q(p)]: clip the two tails at the given percentile, interpolating linearly between order
    statistics (numpy's default method).

    The order statistics come from `lax.top_k` at each end instead of a full sort: for the 12.6M-element
    attention probabilities of a x4 calibration batch, 0.14 s instead of 3.5 s on the 2-core CPU. Their positions
    are worked out exactly on the host (`jnp.percentile` rounds them in float32 after turning the division by 100
    into a multiplication, which moves bounds by up to 8e-6 relative)."""
    x = x.reshape(-1)
    n = x.size
    positions = [(100.0 - percentile) / 100 * (n - 1), percentile / 100 * (n - 1)]
    below = [math.floor(position) for position in positions]
    tail = max(min(below) + 2, n - max(below))  # the statistics read (each i and i + 1) lie this close to an end
    if 4 * tail > n:  # central percentiles: selecting them costs what sorting does
        tail, smallest = n, jnp.sort(x)
        largest = smallest[::-1]
    else:  # the barrier keeps XLA from turning "one element of a top_k" back into a full sort (3 s, not 60 ms)
        smallest, largest = jax.lax.optimization_barrier((-jax.lax.top_k(-x, tail)[0], jax.lax.top_k(x, tail)[0]))
    order_statistic = lambda i: smallest[i] if i < tail else largest[n - 1 - i]  # the i-th smallest element
    return jnp.stack([
        order_statistic(i) * (1 - (position - i)) + order_statistic(min(i + 1, n - 1)) * (position - i)
        for i, position in zip(below, positions)
    ])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """How bounds are initialised: `method` at every site, DOBI's `strategy`, the Percentile's `percentile`."""

    method: Method = "dobi"
    strategy: Strategy = "official"
    num_candidates: int = 100
    percentile: float = 99.99

    def __post_init__(self):
        if self.method not in get_args(Method) or self.strategy not in get_args(Strategy):
            raise ValueError(f"unknown calibration method {self.method!r} or DOBI strategy {self.strategy!r}; "
                             f"choose from {get_args(Method)} and {get_args(Strategy)}")
        if not 50 < self.percentile <= 100:  # [q(100 - p), q(p)] crosses below 50
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if type(self.num_candidates) is not int or self.num_candidates < 1:
            raise ValueError(f"DOBI needs at least one candidate, got num_candidates={self.num_candidates!r}")

    def search(self, path: str, x: Array, bits: int) -> Array:
        if self.method == "minmax":
            return minmax_bounds(x)
        if self.method == "percentile":
            return percentile_bounds(x, self.percentile)
        if self.strategy == "official" or not is_long_tailed(path):
            return dobi_search(x, bits, num_candidates=self.num_candidates)
        step_divisor = 2 if self.strategy == "paper" else 1
        return dobi_search(x, bits, num_candidates=self.num_candidates, one_sided=True, step_divisor=step_divisor)


@dataclasses.dataclass(frozen=True)
class CalibrationSite:
    """A `SiteFn` that replaces each site's bounds by the searched ones and passes the FP tensor on."""

    calibration: Calibration

    def __call__(self, module: nn.Module, name: str, x: Array) -> Array:
        if module.has_variable("bounds", name):
            b = module.get_variable("bounds", name)
            path = "/".join((*module.scope.path, name))
            module.put_variable("bounds", name, Bounds(self.calibration.search(path, x, b.bits), b.bits))
        return x


@functools.partial(jax.jit, static_argnums=(0, 1))
def calibrate(config: ModelConfig, calibration: Calibration, params, bounds, images: Array):
    """One FP pass over `images` (B, H, W, C) that sets every site in `bounds` by `calibration`."""
    model = models.build(config, site=CalibrationSite(calibration))
    _, state = model.apply({"params": params, "bounds": bounds}, images, mutable=["bounds"])
    return state["bounds"]
