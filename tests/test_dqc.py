"""DQC against the official code's three steps (golden arrays), the losses by hand, and the optimiser set-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.dqc as dqc_module
from conftest import nhwc
from jaxquant.dqc import DQCConfig, distillation_loss, dqc_step, init_state, official_loss, paper_loss
from jaxquant.quant import (
    QuantRules, bounds_from_official, bounds_to_official, flat_bounds, init_bounds, quantized_site,
)
from jaxquant.swinir import SwinIR, SwinIRConfig


def _run_dqc(model, arrays, names, bits, images, steps=3):
    """Official-mode DQC steps from the golden DOBI bounds, in the images' dtype (bounds and params cast to it)."""
    start = {n: [arrays[f"w{bits}_dobi_lb"][i], arrays[f"w{bits}_dobi_ub"][i]] for i, n in enumerate(names)}
    in_images_dtype = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, images.dtype), tree)
    dqc = DQCConfig()  # blocks run as the backend's default (on a CPU: scanned, recomputed)
    state = init_state(in_images_dtype(bounds_from_official(start, model.config, bits)), dqc)
    params = in_images_dtype(model.params)
    losses = []
    for _ in range(steps):
        state, terms = dqc_step(model.config, dqc, state, params, images)
        losses.append(float(terms["loss"]))
    named = bounds_to_official(state.bounds)
    flat = np.concatenate([[named[n][0] for n in names], [named[n][1] for n in names]])
    return np.array(losses), flat


def _in_float64(run):
    """`run()` with float64 enabled; standard promotion because flax's LayerNorm promotes against float32."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        return run()


@pytest.fixture(scope="module")
def official_dqc(t291_model, golden):
    """Our 3 official-mode steps from the golden DOBI bounds, with the golden values to compare against."""
    cache = {}

    def get(scale, bits):
        if (scale, bits) not in cache:
            arrays, meta = golden(scale)
            names = meta["quantizers"][str(bits)]
            losses, bounds = _run_dqc(t291_model(scale), arrays, names, bits, nhwc(arrays["dqc_batch"]))
            start = np.concatenate([arrays[f"w{bits}_dobi_lb"], arrays[f"w{bits}_dobi_ub"]])
            expected = np.concatenate([arrays[f"w{bits}_dqc3_lb"], arrays[f"w{bits}_dqc3_ub"]])
            cache[scale, bits] = losses, bounds, arrays[f"w{bits}_dqc_losses"], expected, start
        return cache[scale, bits]

    return get


BITS = pytest.mark.parametrize("bits", [4, 2])


@BITS
def test_first_loss_matches_official(scale, bits, official_dqc):
    losses, _, expected, _, _ = official_dqc(scale, bits)
    rel = abs(losses[0] / expected[0] - 1)
    assert rel <= 1e-3, f"x{scale} W{bits}: official loss {losses[0]:.6g} vs {expected[0]:.6g} ({rel:.2g} relative)"


@BITS
def test_three_steps_move_the_bounds_like_official(scale, bits, official_dqc):
    """Direction and size of the 3-step movement agree. A regression guard below what was measured
    (correlation 0.965-0.999; same sign for 95-100% of the scalars the official code moved by > 1e-3)."""
    _, bounds, _, expected, start = official_dqc(scale, bits)
    ours, theirs = bounds - start, expected - start
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.95
    moved = np.abs(theirs) > 1e-3
    assert np.mean(np.sign(ours[moved]) == np.sign(theirs[moved])) >= 0.9


@BITS
@pytest.mark.xfail(strict=True, reason=(
    "4-bit and 2-bit fake-quant forwards are chaotic at this tolerance: measured 51-64% of the 768 scalars within "
    "1e-4 (79-97% within 1e-3; 93% at x4 W2 on another CPU, docs/faithfulness.md), step-1 "
    "losses within 4e-4 relative; the official bounds themselves are within 1e-4 "
    "of the same steps in float64 on only 52-60%, whose step-3 losses miss the official ones by 4e-3 to 0.08 "
    "(test_official_bounds_are_no_closer_to_float64_than_ours); two of our own runs whose inputs differ by 1e-6 "
    "agree on 41-69% (test_every_differing_scalar_is_unstable_in_our_port)"))
def test_three_steps_match_official_bounds(scale, bits, official_dqc):
    losses, bounds, expected_losses, expected, _ = official_dqc(scale, bits)
    assert np.mean(np.abs(bounds - expected) <= 1e-4) >= 0.98
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-3)


@BITS
def test_every_differing_scalar_is_unstable_in_our_port(scale, bits, t291_model, golden, official_dqc):
    """Why scalars miss the 1e-4 criterion, one by one: rerun our three steps on the golden batch plus 1e-6 noise
    (three seeds). A scalar that differs from the official one by > 1e-4 is explained when our own four runs spread
    by > 1e-4 there too: the official run is then just one more sample of the same noise. Measured: 1,288 of the
    1,289 differing scalars are explained this way with 24 seeds (>= 93% per case with these 3); the last is 1.79e-4
    from the official value against a 9.6e-5 spread, and the official value is itself 1.08e-4 from the float64 steps
    (test_official_bounds_are_no_closer_to_float64_than_ours). Our runs agree with each other on 41-69% of the
    scalars, with the official code on 51-64%. Summation order alone (the batch swapped, remat on or off) moves
    2-15% of them by > 1e-4 at W4."""
    arrays, meta = golden(scale)
    images = nhwc(arrays["dqc_batch"])
    _, bounds, _, expected, _ = official_dqc(scale, bits)
    runs = [bounds]
    for seed in (1, 2, 3):
        noise = 1e-6 * jax.random.normal(jax.random.PRNGKey(seed), images.shape)
        runs.append(_run_dqc(t291_model(scale), arrays, meta["quantizers"][str(bits)], bits,
                             jnp.clip(images + noise, 0.0, 1.0))[1])
    runs = np.stack(runs)
    differ = np.abs(bounds - expected) > 1e-4
    unstable = np.ptp(runs, axis=0) > 1e-4
    explained = np.mean(unstable[differ])
    assert explained >= 0.9, f"x{scale} W{bits}: {explained:.1%} of the {differ.sum()} differing scalars are unstable"
    self_agreement = max(np.mean(np.abs(a - b) <= 1e-4) for i, a in enumerate(runs) for b in runs[i + 1:])
    assert self_agreement < 0.98, f"x{scale} W{bits}: our runs agree on {self_agreement:.1%} within 1e-4"


@BITS
def test_official_bounds_are_no_closer_to_float64_than_ours(scale, bits, t291_model, golden, official_dqc):
    """Why no float32 port reaches 98% within 1e-4: the official float32 bounds themselves miss the same three
    steps computed in float64 by more than 1e-4 on 40-48% of the scalars (ours: 40-50%), and the float64
    losses after the first update miss the official ones by up to 0.11 relative (4.2e-3 to 0.076 at step 3).
    Measured beside this test: the float64 steps move by < 3e-14 when the input changes by 1e-12, but a change
    the size of a float32 ulp (random +-1 ulp, 1e-8 or 6e-8 Gaussian) sometimes flips a rounding somewhere and
    then moves 11-47% of them by > 1e-4; float32 rounding inside the forward (5e-7 relative at the output) is
    several times larger."""
    arrays, meta = golden(scale)
    _, ours, official_losses, official, _ = official_dqc(scale, bits)
    model, names = t291_model(scale), meta["quantizers"][str(bits)]
    images = arrays["dqc_batch"].astype(np.float64)
    exact_losses, exact = _in_float64(lambda: _run_dqc(model, arrays, names, bits, nhwc(images)))
    assert exact.dtype == np.float64
    loss_error = np.abs(exact_losses[-1] / official_losses[-1] - 1)
    assert loss_error > 1e-3, f"x{scale} W{bits}: float64 step-3 loss within {loss_error:.2g} of the official one"
    agree = lambda a: np.mean(np.abs(a - exact) <= 1e-4)
    assert agree(official) < 0.98, f"x{scale} W{bits}: official within 1e-4 of float64 on {agree(official):.1%}"
    assert agree(ours) >= agree(official) - 0.1, (
        f"x{scale} W{bits}: ours within 1e-4 of float64 on {agree(ours):.1%}, official on {agree(official):.1%}")


BLOCKS = SwinIRConfig(upscale=2, embed_dim=12, depths=(3,), num_heads=(2,), window_size=4)  # a scanned pair, one unrolled


def _block_gradients(remat: bool, scan: bool) -> np.ndarray:
    """Bounds and params gradients of the official DQC loss on BLOCKS, run as `remat` and `scan` say."""
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
    params = SwinIR(BLOCKS).init(jax.random.PRNGKey(1), images)["params"]
    bounds = init_bounds(BLOCKS, QuantRules.uniform(2), fill=(-0.5, 0.5))
    loss = lambda b, p: distillation_loss(b, p, images, BLOCKS, DQCConfig(remat=remat, scan=scan))[0]
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss, (0, 1)))(bounds, params))])


@pytest.fixture(scope="module")
def plain_block_gradients() -> np.ndarray:
    return _block_gradients(remat=False, scan=False)


@pytest.mark.parametrize("remat, scan", [(True, True), (True, False), (False, True)])
def test_block_execution_changes_no_gradient(remat, scan, plain_block_gradients):
    """Bounds and params gradients (DQC and FP training) are those of the plain unrolled blocks with stored
    activations, with the blocks recomputed, scanned, or both."""
    plain = plain_block_gradients
    assert np.count_nonzero(plain) > plain.size // 2
    other = _block_gradients(remat, scan)
    np.testing.assert_allclose(other, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())


def test_blocks_whose_sites_differ_run_unscanned():
    """A pair quantized at other bits than the first cannot share its scan; the forward is still the same."""
    config = SwinIRConfig(upscale=2, embed_dim=12, depths=(4,), num_heads=(2,), window_size=4)
    images = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
    params = SwinIR(config).init(jax.random.PRNGKey(1), images)["params"]

    def forward(rules, scan):
        variables = {"params": params, "bounds": init_bounds(config, rules, fill=(-0.5, 0.5))}
        return SwinIR(config, site=quantized_site, scan=scan).apply(variables, images)[0]

    mixed = QuantRules(rules=((r".*blocks_3/.*", 4), (r".*", 2)))
    assert "scan" in str(jax.make_jaxpr(lambda: forward(QuantRules.uniform(2), True))())
    assert "scan" not in str(jax.make_jaxpr(lambda: forward(mixed, True))())
    np.testing.assert_array_equal(forward(mixed, True), forward(mixed, False))


def _features(key, batch=2):
    return [jax.random.normal(jax.random.fold_in(key, i), (batch, 16, 6)) for i in range(4)]


def test_official_loss_by_hand():
    key = jax.random.PRNGKey(0)
    out_q, out_fp = jax.random.normal(key, (2, 8, 8, 3)), jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    fq, ff = _features(jax.random.PRNGKey(2)), _features(jax.random.PRNGKey(3))
    loss, terms = official_loss(out_q, out_fp, fq, ff)
    a, b = np.asarray(out_q, np.float64), np.asarray(out_fp, np.float64)
    expected = np.abs(a - b).mean() / a.size * 2
    for q, f in zip(fq, ff):
        q, f = np.asarray(q, np.float64), np.asarray(f, np.float64)
        nq = np.linalg.norm(q.reshape(2, -1), axis=1)
        nf = np.linalg.norm(f.reshape(2, -1), axis=1)
        # official broadcasting: element [i, j] = F[j] / n[i]
        diff = q[None] / nq[:, None, None, None] - f[None] / nf[:, None, None, None]
        expected += 5 * np.mean(diff**2) / diff.size
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert set(terms) == {"pixel", "feature_0", "feature_1", "feature_2", "feature_3"}


@pytest.mark.parametrize("spread", [1e-3, 1e-1])
def test_official_feature_gradient_by_hand(spread):
    """The closed form has the broadcast's gradient (norms detached), at least as accurately as the float32
    (B, B, L, C) broadcast that PyTorch computes, also where student and teacher nearly agree; its value is
    within 1e-4 relative (10x inside the golden step-1 loss criterion)."""
    ff = jax.random.normal(jax.random.PRNGKey(4), (3, 16, 6))
    fq = ff * (1 + spread * jax.random.normal(jax.random.PRNGKey(5), ff.shape))
    out = jnp.zeros((3, 4, 4, 3))
    loss, closed = jax.value_and_grad(lambda q: official_loss(out, out, [q], [ff])[0])(fq)

    norm = lambda f: jax.lax.stop_gradient(jnp.linalg.norm(f, axis=(1, 2)))[:, None, None, None]
    broadcast = lambda q: 5.0 * jnp.mean(jnp.square(q[None] / norm(q) - ff[None] / norm(ff))) / (3 * ff.size)
    broadcast_grad = jax.grad(broadcast)(fq)
    q, f = np.asarray(fq, np.float64), np.asarray(ff, np.float64)
    nq, nf = (np.linalg.norm(x, axis=(1, 2))[:, None, None, None] for x in (q, f))
    diff = q[None] / nq - f[None] / nf  # element [a, b] = F[b] / n[a]
    expected = 5 * np.sum(2 * diff / nq, axis=0) / diff.size**2
    np.testing.assert_allclose(float(loss), 5 * np.sum(diff**2) / diff.size**2, rtol=1e-4)
    error = lambda g: np.abs(np.asarray(g, np.float64) - expected).max() / np.abs(expected).max()
    assert error(closed) <= error(broadcast_grad), (error(closed), error(broadcast_grad))


def test_paper_loss_by_hand():
    out_q, out_fp = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
    same = _features(jax.random.PRNGKey(0))
    loss, _ = paper_loss(out_q, out_fp, same, [2.0 * f for f in same], feature_weight=3.0)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)  # features equal after normalisation
    flipped = [-f for f in same]
    loss, _ = paper_loss(out_q, out_fp, same, flipped, feature_weight=3.0)
    np.testing.assert_allclose(float(loss), 1.0 + 3.0 * 4 * 2.0 / (16 * 6), rtol=1e-5)  # ||2u|| = 2 per sample


def test_paper_feature_gradient_by_hand():
    """Per sample, d||u_f - u_q|| / dq = (r - u_q <u_q, r>) / ||q|| with u = f / ||f|| and r the unit vector
    of u_q - u_f: the paper's formula differentiated through both norms (a detached norm misses the
    projection, 11-17% of the largest entry here)."""
    ff = jax.random.normal(jax.random.PRNGKey(6), (3, 16, 6))
    fq = ff + 0.3 * jax.random.normal(jax.random.PRNGKey(7), ff.shape)
    out = jnp.zeros((3, 4, 4, 3))
    grad = jax.grad(lambda q: paper_loss(out, out, [q], [ff], feature_weight=2.0)[0])(fq)
    q, f = (np.asarray(x, np.float64).reshape(3, -1) for x in (fq, ff))
    uq, uf = q / np.linalg.norm(q, axis=1, keepdims=True), f / np.linalg.norm(f, axis=1, keepdims=True)
    r = (uq - uf) / np.linalg.norm(uq - uf, axis=1, keepdims=True)
    projected = (r - uq * np.sum(uq * r, axis=1, keepdims=True)) / np.linalg.norm(q, axis=1, keepdims=True)
    expected = 2.0 / 3 / (16 * 6) * projected  # weight, mean over the batch, 1 / (L C)
    np.testing.assert_allclose(np.asarray(grad, np.float64).reshape(3, -1), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_adam_settings_are_the_official_ones():
    dqc = DQCConfig()
    assert (dqc.lr, dqc.b1, dqc.b2, dqc.eps, dqc.steps, dqc.batch, dqc.patch, dqc.cosine) == (
        1e-2, 0.9, 0.99, 1e-8, 4000, 16, 64, False)


TINY = SwinIRConfig(upscale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)


@pytest.fixture(scope="module")
def tiny_dqc():
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    params = SwinIR(TINY).init(jax.random.PRNGKey(1), images[:1, :8, :8])["params"]
    return params, init_bounds(TINY, QuantRules.uniform(2), fill=(-0.5, 0.5)), images


def test_a_step_leaves_what_it_was_given_valid(tiny_dqc):
    """Neither the bounds a state starts from nor the state a step takes are invalidated (donated)."""
    params, bounds, images = tiny_dqc
    dqc = DQCConfig(batch=4, patch=32)
    state = init_state(bounds, dqc)
    new, _ = dqc_step(TINY, dqc, state, params, images)
    again, _ = dqc_step(TINY, dqc, state, params, images)  # the same state, once more
    for tree in (bounds, state.bounds, new.bounds):
        assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(tree))
    np.testing.assert_array_equal(ravel(again.bounds), ravel(new.bounds))
    assert np.abs(ravel(new.bounds) - ravel(bounds)).max() > 0


def test_weight_lr_scales_only_the_weight_bounds_updates(tiny_dqc):
    """From the same state, a step with weight_lr = lr / 10 moves each weight site's bounds a tenth as far as a
    step at lr, and every activation site's exactly as far (Adam's update is elementwise)."""
    params, bounds, images = tiny_dqc
    moved = {}
    for weight_lr in (None, 1e-3):
        dqc = DQCConfig(batch=4, patch=32, weight_lr=weight_lr)
        new, _ = dqc_step(TINY, dqc, init_state(bounds, dqc), params, images)
        moved[weight_lr] = {p: np.asarray(b.lu) - np.asarray(flat_bounds(bounds)[p].lu)
                            for p, b in flat_bounds(new.bounds).items()}
    for path, full in moved[None].items():
        expected = full / 10 if path.endswith("/weight") else full
        np.testing.assert_allclose(moved[1e-3][path], expected, rtol=1e-4, atol=1e-9, err_msg=path)
    assert any(path.endswith("/weight") and np.abs(full).min() > 1e-3 for path, full in moved[None].items())


def ravel(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_a_step_runs_as_its_batch_needs_whatever_the_loop_settings(tiny_dqc, monkeypatch):
    """`batch`, `patch` and `steps` are the loop's settings: a step on a 4 x 32 x 32 batch compiles to the same
    program under the official defaults (batch 16 of 64x64) as under matching settings."""
    monkeypatch.setattr(dqc_module, "cpu_scratch_kept", lambda: True)  # where the batch size decides
    params, bounds, images = tiny_dqc

    def program(dqc):
        return dqc_step.lower(TINY, dqc, init_state(bounds, dqc), params, images).as_text()

    assert program(DQCConfig()) == program(DQCConfig(batch=4, patch=32, steps=160))
    assert DQCConfig().block_execution(4 * 32 * 32) == (False, False)
    assert DQCConfig().block_execution(16 * 64 * 64) == (True, True)
