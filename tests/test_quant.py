"""The quantizer (values, integer grid, hand-derived gradients), the 384 sites, and quantize()."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.dobi import Calibration, calibrate
from jaxquant.quant import (
    Bounds, QuantRules, fake_quant, flat_bounds, init_bounds, integer_view, is_weight_site, list_sites, local_path,
    official_name, quantize, quantized_site,
)
from jaxquant.swinir import SwinIR, SwinIRConfig, swinir_light

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
    assert X[1] == LU[0] and X[7] == LU[1]
    assert float(dx[1]) == w[1] and float(dx[7]) == w[7]


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
    with pytest.raises(ValueError, match="bit width 4.0: expected an integer 2..8"):
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


# --------------------------------------------------------------------------- the research API under transformations

TINY = SwinIRConfig(upscale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)


@pytest.fixture(scope="module")
def tiny():
    """A one-stage SwinIR with random params, W4A4 bounds around each site's FP range, and an input."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
    params = SwinIR(TINY).init(jax.random.PRNGKey(1), x)["params"]
    bounds = init_bounds(TINY, QuantRules.uniform(4))
    bounds = calibrate(TINY, Calibration(method="minmax"), params, bounds, x)
    return params, bounds, x


def _loss(params, bounds, x):
    return jnp.mean(jnp.square(quantize(params, bounds)(x) - SwinIR(TINY).apply({"params": params}, x)[0]))


def test_quantize_works_under_grad_jit_and_vmap(tiny):
    """jax.grad through quantize(...) gives the gradient of the model with the bounds as its collection, which
    quantize wraps; jit and vmap over the bounds give what eager calls give."""
    params, bounds, x = tiny
    grads = jax.grad(_loss, argnums=1)(params, bounds, x)
    reference = jax.grad(lambda b: jnp.mean(jnp.square(
        SwinIR(TINY, site=quantized_site).apply({"params": params, "bounds": b}, x)[0]
        - SwinIR(TINY).apply({"params": params}, x)[0])))(bounds)
    for path, g in flat_bounds(grads).items():
        np.testing.assert_allclose(np.asarray(g.lu), np.asarray(flat_bounds(reference)[path].lu), rtol=1e-5,
                                   atol=1e-9, err_msg=path)
    assert any(float(jnp.abs(g.lu).max()) > 0 for g in flat_bounds(grads).values())

    eager = quantize(params, bounds)(x)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p, b: quantize(p, b)(x))(params, bounds)),
                               np.asarray(eager), atol=1e-6)
    widened = jax.tree.map(lambda lu: lu * 1.5, bounds)  # the leaves are the [l, u] arrays
    stacked = jax.tree.map(lambda *bs: jnp.stack(bs), bounds, widened)
    both = jax.vmap(lambda b: quantize(params, b)(x))(stacked)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(eager), atol=1e-6)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(quantize(params, widened)(x)), atol=1e-6)


def test_quantize_traces_the_model_once_per_config(tiny, monkeypatch):
    """The architecture checks (sites, param shapes) trace the model once per config, not on every call."""
    params, bounds, _ = tiny
    quantize(params, bounds)
    traces = []
    original = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traces.append(a[0]) or original(*a, **k))
    quantize(params, bounds)
    quantize(params, bounds, TINY)
    assert traces == []


@pytest.mark.parametrize("make, message", [
    (lambda: QuantRules.uniform(1), "bit width 1 of quantization rule '.*': expected an integer 2..8"),
    (lambda: QuantRules(rules=((".*", 16),)), "bit width 16 of quantization rule '.*'"),
    (lambda: QuantRules(rules=((".*", 0),)), "bit width 0 of quantization rule"),
    (lambda: Bounds(jnp.zeros(2), 9), "bit width 9: expected an integer 2..8"),
    (lambda: QuantRules(rules=(("[", 4),)), "quantization rule '[' is not a regular expression"),
])
def test_bits_are_one_range_checked_when_made(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_integer_view_jits_to_uint8_codes(bits):
    x = jnp.asarray(np.random.default_rng(bits).standard_normal(1000).astype(np.float32))
    codes, scale, offset = jax.jit(integer_view, static_argnums=2)(x, jnp.asarray(LU), bits)
    eager = integer_view(x, jnp.asarray(LU), bits)
    assert codes.dtype == jnp.uint8 and int(codes.max()) == 2**bits - 1
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(eager[0]))
    np.testing.assert_allclose(np.asarray(codes.astype(jnp.float32) * scale + offset),
                               np.asarray(fake_quant(x, jnp.asarray(LU), bits)), atol=2e-7)


def test_a_rule_that_reaches_no_site_is_named():
    rules = QuantRules(rules=((r".*mymodule_a", 2), (r".*", 4)))  # an official name where site paths are meant
    with pytest.raises(ValueError, match=re.escape("quantization rule '.*mymodule_a' applies to no site")):
        init_bounds(TINY, rules)
    shadowed = QuantRules(rules=((r".*", 4), (r".*/weight", 8)))
    with pytest.raises(ValueError, match=re.escape("quantization rule '.*/weight' applies to no site")):
        init_bounds(TINY, shadowed)


def test_uncalibrated_bounds_are_refused(tiny):
    params, _, x = tiny
    with pytest.raises(ValueError, match=r"layers_0/.*: uncalibrated bounds .*calibrate them first"):
        quantize(params, init_bounds(TINY, QuantRules.uniform(4)))(x)


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 3, 8, 8), np.float32), "images must be shaped (B, H, W, 3), got (1, 3, 8, 8) (NCHW? the model "
                                         "takes NHWC)"),
    (np.zeros((8, 8, 3), np.float32), "images must be shaped (B, H, W, 3), got (8, 8, 3)"),
    (np.zeros((1, 8, 8, 3), np.uint8), "images must be floats in [0, 1], got uint8 (divide uint8 images by 255)"),
    (np.full((1, 8, 8, 3), 255.0, np.float32), "images must be in [0, 1], got values from 255 to 255"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "images must be in [0, 1], got values from nan to nan"),
])
def test_the_model_says_what_it_takes(tiny, images, message):
    params, bounds, _ = tiny
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize(params, bounds)(jnp.asarray(images))
