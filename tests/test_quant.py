"""The quantizer (values, integer grid, hand-derived gradients), the 384 sites, and quantize()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.quant import (
    QuantRules, fake_quant, flat_bounds, init_bounds, integer_view, is_weight_site, list_sites, local_path,
    official_name, quantize, quantized_site,
)
from jaxquant.swinir import SwinIR, swinir_light

# Values below, at, inside and above the bounds [-0.5, 1.0], and on rounding boundaries.
X = np.array([-2.0, -0.5, -0.3, 0.0, 0.25, 0.49, 0.6, 1.0, 1.7], np.float32)
LU = np.array([-0.5, 1.0], np.float32)


def reference_fake_quant(x, lu, bits):
    lower, upper = lu
    s = np.float32((upper - lower) / np.float32(2**bits - 1))
    return (s * np.round((np.clip(x, lower, upper) - lower) / s) + lower).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_values_jitted_and_eager(bits):
    x = np.random.default_rng(bits).standard_normal(100_000).astype(np.float32)
    expected = reference_fake_quant(x, LU, bits)
    jitted = jax.jit(fake_quant, static_argnums=2)(jnp.asarray(x), jnp.asarray(LU), bits)
    # XLA on CPU contracts s * r + l into a fused multiply-add: at most one ulp apart, never a different code.
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=0, atol=2e-7)
    np.testing.assert_allclose(np.asarray(fake_quant(jnp.asarray(x), jnp.asarray(LU), bits)), expected, atol=2e-7)


@pytest.mark.parametrize("bits", [2, 4])
def test_integer_view_is_the_exact_grid(bits):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(10_000).astype(np.float32))
    codes, scale, offset = integer_view(x, jnp.asarray(LU), bits)
    assert codes.dtype == jnp.uint8
    assert set(np.unique(np.asarray(codes))) <= set(range(2**bits))
    assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1
    np.testing.assert_allclose(np.asarray(codes.astype(jnp.float32) * scale + offset), np.asarray(fake_quant(x, jnp.asarray(LU), bits)), atol=2e-7)


@pytest.mark.parametrize("bits", [2, 4])
def test_gradients_follow_the_official_rule(bits):
    """d/dx, d/dl, d/du of sum(w * Q(x)) against the hand derivation (paper Eq. 2 with the official clip rule):
    t = (clip(x) - l) / s, n = 2^b - 1;  dx = w [l <= x <= u];
    dl = sum w ((t - round t) / n + [x <= l]);  du = sum w ((round t - t) / n + [x >= u])."""
    w = np.linspace(0.5, 2.0, X.size).astype(np.float32)
    loss = lambda x, lu: jnp.sum(jnp.asarray(w) * fake_quant(x, lu, bits))
    dx, dlu = jax.grad(loss, argnums=(0, 1))(jnp.asarray(X), jnp.asarray(LU))

    lower, upper = LU.astype(np.float64)
    n = 2**bits - 1
    s = (upper - lower) / n
    t = (np.clip(X, lower, upper) - lower) / s
    expected_dx = w * ((X >= lower) & (X <= upper))
    expected_dl = np.sum(w * ((t - np.round(t)) / n + (X <= lower)))
    expected_du = np.sum(w * ((np.round(t) - t) / n + (X >= upper)))
    np.testing.assert_allclose(np.asarray(dx), expected_dx, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dlu), [expected_dl, expected_du], rtol=1e-5, atol=1e-6)
    # Ties count for both: x == l contributes to dx and dl, x == u to dx and du.
    assert expected_dx[1] == w[1] and expected_dx[7] == w[7]


@pytest.mark.parametrize("shape", [(), (8, 6, 64, 64)])
def test_bound_gradients_of_a_large_tensor_keep_float32_precision(shape):
    """dl and du sum over every element (of an attention-probs-like tensor, and of a scalar): they agree with
    float64 sums of the same rule to float32 summation accuracy."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float32)
    w = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), shape, minval=0.5, maxval=2.0), np.float32)
    lu = np.asarray([-0.8, 1.1], np.float32)
    dlu = jax.jit(jax.grad(lambda lu: jnp.sum(jnp.asarray(w) * fake_quant(jnp.asarray(x), lu, 2))))(jnp.asarray(lu))

    lower, upper = lu.astype(np.float64)
    t = (np.clip(x, lower, upper) - lower) / ((upper - lower) / 3)
    w64 = w.astype(np.float64)
    expected_dl = np.sum(w64 * ((t - np.round(t)) / 3 + (x <= lower)))
    expected_du = np.sum(w64 * ((np.round(t) - t) / 3 + (x >= upper)))
    # 1.4e-7 measured; one running float32 sum over the whole tensor is off by 2.1e-6.
    np.testing.assert_allclose(np.asarray(dlu), [expected_dl, expected_du], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lu", [[1.0, 1.0], [2.0, 1.0], [0.0, np.inf], [np.nan, 1.0]])
def test_bad_bounds_are_refused(lu):
    with pytest.raises(ValueError, match="bound"):
        fake_quant(jnp.asarray(X), jnp.asarray(lu, jnp.float32), 4)


def test_crossed_bounds_under_jit_give_no_nan():
    y = jax.jit(fake_quant, static_argnums=2)(jnp.asarray(X), jnp.asarray([1.0, 0.5], jnp.float32), 4)
    assert np.all(np.isfinite(np.asarray(y)))


def test_bits_must_be_a_static_int():
    with pytest.raises(ValueError, match="bits"):
        fake_quant(jnp.asarray(X), jnp.asarray(LU), 4.0)


def test_swinir_light_has_the_384_official_sites(golden):
    sites = list_sites(swinir_light(4))
    assert len(sites) == 384
    assert sum(map(is_weight_site, sites)) == 144
    _, meta = golden(4)
    assert sorted(official_name(p) for p in sites) == sorted(meta["quantizers"]["4"])
    assert all(local_path(official_name(p)) == p for p in sites)


def test_rules_must_cover_every_site():
    rules = QuantRules(rules=((r".*/attn/.*", 4),))
    with pytest.raises(ValueError, match="no quantization rule covers site 'layers_0/residual_group/blocks_0/mlp"):
        init_bounds(swinir_light(2), rules)


def test_rules_choose_sites_and_bits():
    rules = QuantRules(rules=((r".*/weight", 4), (r".*/probs", None), (r".*", 8)))
    bounds = flat_bounds(init_bounds(swinir_light(2), rules))
    assert len(bounds) == 384 - 24
    assert {b.bits for p, b in bounds.items() if is_weight_site(p)} == {4}
    assert {b.bits for p, b in bounds.items() if not is_weight_site(p)} == {8}


def test_no_bounds_is_bit_identical_to_fp(t291_model):
    model = t291_model(2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 24, 24, 3))
    fp = SwinIR(model.config).apply({"params": model.params}, x)[0]
    quantized = SwinIR(model.config, site=quantized_site).apply({"params": model.params}, x)[0]
    np.testing.assert_array_equal(np.asarray(fp), np.asarray(quantized))


def test_quantize_validates_and_runs(t291_model):
    model = t291_model(2)
    bounds = init_bounds(model.config, QuantRules.uniform(4), fill=(-3.0, 3.0))
    q = quantize(model.params, bounds, model.config)
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 16, 16, 3))
    y = q(x)
    fp = SwinIR(model.config).apply({"params": model.params}, x)[0]
    assert y.shape == (1, 32, 32, 3)
    assert 0 < float(jnp.abs(y - fp).mean()) < 0.5  # quantized, not broken
    crossed = jax.tree.map(lambda b: b, bounds)
    crossed["layers_1"]["residual_group"]["blocks_2"]["mlp"]["fc1"]["act"] = flat_bounds(bounds)[
        "layers_0/residual_group/blocks_0/attn/k"].replace(lu=jnp.asarray([1.0, -1.0]))
    with pytest.raises(ValueError, match="layers_1/residual_group/blocks_2/mlp/fc1/act"):
        quantize(model.params, crossed, model.config)


def test_quantize_reads_the_config_off_the_params(t291_model):
    """The Flax-side reading agrees with the one `load_model` made from the .pth's PyTorch shapes."""
    model = t291_model(4)
    bounds = init_bounds(model.config, QuantRules.uniform(2), fill=(-2.0, 2.0))
    assert quantize(model.params, bounds).config == model.config


def test_quantize_refuses_params_that_do_not_fit_the_config(t291_model):
    model = t291_model(2)
    bounds = init_bounds(model.config, QuantRules.uniform(4))
    with pytest.raises(ValueError, match=r"param upsample_0/bias has shape \(12,\); SwinIR x4 .* needs \(48,\)"):
        quantize(model.params, bounds, swinir_light(4))
