"""The integer forward: integer matmuls against numpy int64, the epilogue against float64, and the whole forward
against the fake-quant one, site by site, on a small crop (the Set5 numbers: benchmarks/bench_integer.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.integer import (ComparedSites, IntegerModel, Operand, compared_forward, dequantized_product,
                              integer_dot_general)
from jaxquant.lowbit import load_lowbit, save_lowbit
from jaxquant.quant import quantize

DENSE = (((2,), (0,)), ((), ()))  # (B, N, in) x (in, out)
QK = (((3,), (3,)), ((0, 1), (0, 1)))  # (B, h, n, d) x (B, h, m, d) -> (B, h, n, m)
PV = (((3,), (2,)), ((0, 1), (0, 1)))  # (B, h, n, m) x (B, h, m, d) -> (B, h, n, d)
SHAPES = {"dense": ((2, 5, 7), (7, 3)), "qk": ((2, 3, 5, 4), (2, 3, 6, 4)), "pv": ((2, 3, 5, 6), (2, 3, 6, 4))}
DIMS = {"dense": DENSE, "qk": QK, "pv": PV}
EINSUM = {"dense": "bni,io->bno", "qk": "bhnd,bhmd->bhnm", "pv": "bhnm,bhmd->bhnd"}


def _random_codes(rng, shape, bits):
    return rng.integers(0, 2**bits, shape).astype(np.int8 if bits <= 7 else np.int16)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_matmul_equals_numpy_int64(kind, bits):
    rng = np.random.default_rng(bits)
    a, b = (_random_codes(rng, shape, bits) for shape in SHAPES[kind])
    one, zero = jnp.float32(1), jnp.float32(0)
    got = integer_dot_general(Operand(jnp.asarray(a), one, zero), Operand(jnp.asarray(b), one, zero), DIMS[kind])
    expected = np.einsum(EINSUM[kind], a.astype(np.int64), b.astype(np.int64))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32))


@pytest.mark.parametrize("kind", list(SHAPES))
def test_the_epilogue_gives_the_product_of_the_dequantized_operands(kind):
    rng = np.random.default_rng(0)
    a, b = (_random_codes(rng, shape, 3) for shape in SHAPES[kind])
    (sa, la), (sb, lb) = (0.037, -0.61), (0.0052, 0.13)
    got = integer_dot_general(Operand(jnp.asarray(a), jnp.float32(sa), jnp.float32(la)),
                              Operand(jnp.asarray(b), jnp.float32(sb), jnp.float32(lb)), DIMS[kind])
    expected = np.einsum(EINSUM[kind], np.float32(sa) * a.astype(np.float64) + np.float32(la),
                         np.float32(sb) * b.astype(np.float64) + np.float32(lb))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_the_integer_product_is_more_accurate_than_a_float32_matmul():
    """Centred codes (`integer.centred`) leave the float32 epilogue no large terms to cancel: against the exact
    product of the dequantized operands (float64), its error is below fake quantization's float32 matmul's."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 16, (200, 120)).astype(np.int8), rng.integers(0, 16, (120, 60)).astype(np.int8)
    (sa, la), (sb, lb) = (np.float32(0.037), np.float32(-0.61)), (np.float32(0.0052), np.float32(-0.043))
    x, w = (Operand(jnp.asarray(c), jnp.float32(s), jnp.float32(l)) for c, s, l in ((a, sa, la), (b, sb, lb)))
    exact = (np.float64(sa) * a + np.float64(la)) @ (np.float64(sb) * b + np.float64(lb))
    dims = (((1,), (0,)), ((), ()))
    error = {f.__name__: np.sqrt(np.mean((np.asarray(f(x, w, dims), np.float64) - exact) ** 2))
             for f in (integer_dot_general, dequantized_product)}
    assert error["integer_dot_general"] < error["dequantized_product"], error


@pytest.fixture(scope="module")
def quantized(x2_minmax):
    """The x2 model at W3A3, MinMax bounds: test_lowbit's model, so that both files share its compiled forward."""
    return x2_minmax(3)


def test_integer_forward_follows_the_fake_quant_forward(quantized, x2_crop):
    integer = np.asarray(IntegerModel.from_model(quantized)(x2_crop))
    fake = np.asarray(quantize(quantized.params, quantized.bounds, quantized.config)(x2_crop))
    # a flipped activation code moves later values by a step: the outputs differ by more than float rounding,
    # but as 8-bit images by at most one level
    levels = np.abs(np.round(integer * 255) - np.round(fake * 255))
    assert levels.max() <= 1


@pytest.fixture(scope="module")
def compared(quantized, x2_crop):
    """Side by side: the fake-quant forward, the integer forward, the fake-quant forward again (free running),
    then the integer and the fake-quant forward teacher forced by the first."""
    sites = ComparedSites((dequantized_product, integer_dot_general, dequantized_product))
    images = jnp.broadcast_to(x2_crop, (sites.copies, *x2_crop.shape[1:]))
    with jax.disable_jit():  # op by op: cheaper than compiling the whole batched forward for one call
        return compared_forward(quantized.config, IntegerModel.from_model(quantized).variables, images, sites)


def test_the_compared_forward_runs_each_forward_as_alone(quantized, x2_crop, compared):
    """Its first image is a fake-quant forward's output, its second an integer forward's: as 8-bit images within one
    level of the standalone forwards' (XLA compiles the batch as another program, whose float rounding can flip a
    code at a tie, as the integer product's does)."""
    out, _ = compared
    fake = quantize(quantized.params, quantized.bounds, quantized.config)(x2_crop)
    integer = IntegerModel.from_model(quantized)(x2_crop)
    for copy, alone in ((out[0], fake[0]), (out[1], integer[0])):
        assert np.abs(np.round(np.asarray(copy) * 255) - np.round(np.asarray(alone) * 255)).max() <= 1


def test_every_activation_site_agrees_with_fake_quant(compared):
    """Teacher forced (entry (0, 3)): each site's codes from the fake-quant forward's previous codes differ from
    its own only by the rounding of the products in between. The same product twice (entries (0, 2), (0, 4))
    agrees everywhere, so what is counted is the products' doing."""
    _, agreement = compared
    assert len(agreement) == 24 * 10  # q, k, v, proj, fc1, fc2 inputs and q_scaled, k, probs, v per block
    for path, counts in agreement.items():
        total = counts[0, 0]
        assert (np.diag(counts) == total).all() and (counts == counts.T).all(), path
        assert counts[0, 2] == counts[0, 4] == total, f"{path}: {counts}"
        assert counts[0, 3] / total >= 0.999, f"{path}: {total - counts[0, 3]} of {total} codes differ"


def test_stored_codes_run_as_computed_ones(quantized, x2_crop, tmp_path):
    path = tmp_path / "model.safetensors"
    save_lowbit(path, quantized)
    from_file = IntegerModel.from_lowbit(load_lowbit(path))
    weight = from_file.params["layers_0"]["residual_group"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert weight.codes.dtype == jnp.uint8 and weight.codes.shape == (60, 120)
    np.testing.assert_array_equal(weight.colsums, np.sum(weight.codes, axis=0, dtype=np.int32)[None])
    expected = IntegerModel.from_model(quantized)(x2_crop)
    np.testing.assert_array_equal(np.asarray(from_file(x2_crop)), np.asarray(expected))


def test_fp_model_has_no_integer_forward(t291_model):
    with pytest.raises(ValueError, match="needs a quantized model"):
        IntegerModel.from_model(t291_model(2))
