"""DOBI against the official code's bounds and outputs, the candidate grid, strategies and baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw, nhwc
from jaxquant.dobi import Calibration, calibrate, candidate_bounds, dobi_search, percentile_bounds
from jaxquant.quant import (
    QuantRules, bounds_from_official, bounds_to_official, fake_quant, flat_bounds, init_bounds, quantize,
)
from jaxquant.swinir import SwinIR


@pytest.fixture(scope="module")
def official_dobi(t291_model, golden):
    """Our DOBI bounds on the golden calibration batch, as {official name: [l, u]}, by (scale, bits)."""
    cache = {}

    def get(scale, bits):
        if (scale, bits) not in cache:
            model = t291_model(scale)
            start = init_bounds(model.config, QuantRules.uniform(bits))
            bounds = calibrate(model.config, Calibration(), model.params, start, nhwc(golden(scale)[0]["calib"]))
            cache[scale, bits] = bounds_to_official(bounds)
        return cache[scale, bits]

    return get


def _as_arrays(named, names):
    return np.array([named[n][0] for n in names]), np.array([named[n][1] for n in names])


@pytest.mark.parametrize("bits", [4, 2])
def test_dobi_reproduces_official_bounds(scale, bits, official_dobi, golden):
    arrays, meta = golden(scale)
    names = meta["quantizers"][str(bits)]
    lower, upper = _as_arrays(official_dobi(scale, bits), names)
    err = np.maximum(np.abs(lower - arrays[f"w{bits}_dobi_lb"]), np.abs(upper - arrays[f"w{bits}_dobi_ub"]))
    worst = int(np.argmax(err))
    assert err[worst] <= 1e-5, f"W{bits}A{bits} x{scale}: {names[worst]} off by {err[worst]:.3g}"
    # Weights are the same tensors in both codes, so their candidate grids and choices agree to the bit.
    weights = np.array(["weight_quantizer" in n for n in names])
    assert np.array_equal(lower[weights], arrays[f"w{bits}_dobi_lb"][weights])
    assert np.array_equal(upper[weights], arrays[f"w{bits}_dobi_ub"][weights])


@pytest.mark.parametrize(
    "scale_bits",
    [(2, 4), (2, 2), (4, 2), pytest.param((4, 4), marks=pytest.mark.xfail(strict=True, reason=(
        "4-bit outputs are chaotic at this tolerance: our activation bounds differ from the official ones by "
        "<= 1.2e-6 (FP noise in min/max) and moving every golden bound by one ulp moves the x4 output by 1.8e-3; "
        "measured 1.86e-3 from our bounds (the golden bounds themselves give 1.6e-4 at x4 and 1.3e-3 at x2)")))],
    ids=["x2-W4", "x2-W2", "x4-W2", "x4-W4"],
)
def test_fake_quant_output_matches_official(scale_bits, t291_model, official_dobi, golden):
    scale, bits = scale_bits
    model = t291_model(scale)
    arrays, _ = golden(scale)
    bounds = bounds_from_official(official_dobi(scale, bits), model.config, bits)
    out = quantize(model.params, bounds, model.config)(nhwc(arrays["crop_a"]))
    err = np.abs(nchw(out) - arrays[f"w{bits}_dobi_out_a"]).max()
    assert err <= 1e-3, f"W{bits}A{bits} x{scale}: fake-quant output off by {err:.3g}"


def test_candidates_follow_the_official_grid():
    lo, hi = jnp.float32(-1.0), jnp.float32(3.0)
    sym = np.asarray(candidate_bounds(lo, hi, 100, one_sided=False))
    np.testing.assert_allclose(sym[0], [-1.0, 3.0])
    np.testing.assert_allclose(sym[10], [-1.0 + 10 * 4 / 200, 3.0 - 10 * 4 / 200], rtol=1e-6)
    one = np.asarray(candidate_bounds(lo, hi, 100, one_sided=True))
    assert np.all(one[:, 0] == -1.0)
    np.testing.assert_allclose(one[99, 1], 3.0 - 99 * 4 / 200, rtol=1e-6)
    full = np.asarray(candidate_bounds(lo, hi, 100, one_sided=True, step_divisor=1))  # the official branch
    assert np.all(full[:, 0] == -1.0)
    np.testing.assert_allclose(full[99, 1], 3.0 - 99 * 4 / 100, rtol=1e-6)


def test_one_sided_strategies_differ_in_their_step_only():
    scores = np.exp(1.5 * np.random.default_rng(1).normal(size=(300, 64)))
    x = jnp.asarray((scores / scores.sum(1, keepdims=True)).astype(np.float32))  # attention-like probabilities
    search = lambda strategy, path: np.asarray(Calibration(strategy=strategy).search(path, x, 2))
    error = lambda lu: float(jnp.sum((x - fake_quant(x, jnp.asarray(lu), 2)) ** 2))
    paper, full = search("paper", "attn/probs"), search("official-one-sided", "attn/probs")
    assert paper[0] == full[0] == float(jnp.min(x))
    # R/(2K) steps stop halfway down the range, so the paper's search ends on its last candidate here.
    np.testing.assert_array_equal(paper, np.asarray(candidate_bounds(jnp.min(x), jnp.max(x), 100, True))[-1])
    assert full[1] < paper[1] and error(full) < error(paper)
    for strategy in ("paper", "official-one-sided"):  # other sites keep the symmetric search
        np.testing.assert_array_equal(search(strategy, "attn/proj/act"), search("official", "attn/proj/act"))


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="DOBI strategy 'one-sided'"):
        Calibration(strategy="one-sided")


def test_dobi_search_finds_the_best_candidate_first():
    x = jnp.asarray(np.random.default_rng(0).standard_t(3, 20_000).astype(np.float32))
    cands = candidate_bounds(jnp.min(x), jnp.max(x), 100, one_sided=False)
    errors = np.array([float(jnp.sum((x - fake_quant(x, c, 3)) ** 2)) for c in cands])
    np.testing.assert_array_equal(np.asarray(dobi_search(x, 3)), np.asarray(cands[int(np.argmin(errors))]))
    assert int(np.argmin(errors)) > 0  # heavy tails: clipping helps


def test_constant_tensor_keeps_plain_min_max():
    lu = dobi_search(jnp.full((100,), 0.25, jnp.float32), 2)
    np.testing.assert_array_equal(np.asarray(lu), [0.25, 0.25])


def test_percentile_clips_both_tails():
    x = jnp.arange(10_001, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(percentile_bounds(x, 99.0)), [100.0, 9900.0])


@pytest.mark.parametrize("size", [7, 10_001, 1_000_003])
@pytest.mark.parametrize("percentile", [99.99, 99.9, 100.0, 0.5, 60.0])  # 60: central, read from a full sort
def test_percentile_matches_float64_numpy(size, percentile):
    x = jax.random.normal(jax.random.key(size), (size,)) ** 3  # heavy tails, unevenly spaced order statistics
    expected = np.percentile(np.asarray(x, np.float64), [100 - percentile, percentile])
    # Two float32 ulps: the interpolation between the two order statistics rounds.
    np.testing.assert_allclose(np.asarray(percentile_bounds(x, percentile)), expected, rtol=2.5e-7)


def _output_error(model, bounds, x):
    fp = SwinIR(model.config).apply({"params": model.params}, x)[0]
    return float(jnp.mean((quantize(model.params, bounds, model.config)(x) - fp) ** 2))


def test_paper_strategy_is_one_sided_on_long_tailed_sites_and_dobi_beats_minmax(t291_model, golden, official_dobi):
    model = t291_model(4)
    calib = nhwc(golden(4)[0]["calib"])
    start = init_bounds(model.config, QuantRules.uniform(2))
    run = lambda c: calibrate(model.config, c, model.params, start, calib)
    minmax, paper = run(Calibration(method="minmax")), run(Calibration(strategy="paper"))
    dobi = bounds_from_official(official_dobi(4, 2), model.config, 2)  # Calibration() on the same batch
    flat_minmax, flat_paper = flat_bounds(minmax), flat_bounds(paper)
    for path, b in flat_paper.items():
        if path.endswith(("attn/probs", "mlp/fc2/act")):
            assert float(b.lu[0]) == float(flat_minmax[path].lu[0]), path
    assert any(float(b.lu[1]) < float(flat_minmax[p].lu[1]) for p, b in flat_paper.items() if p.endswith("attn/probs"))
    image = nhwc(golden(4)[0]["crop_b"])  # a natural image, unlike the calibration patches
    assert _output_error(model, dobi, image) < _output_error(model, minmax, image)
