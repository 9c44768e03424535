"""SwinIR port: parity with the official PyTorch forward (golden arrays), structure and parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw, nhwc
from jaxquant.swinir import SwinIR, flip_pad, pixel_shuffle, shifted_window_mask, softmax, swinir_light


@pytest.mark.parametrize("crop", ["a", "b"])
def test_fp_output_matches_official(scale, crop, t291_model, golden):
    model = t291_model(scale)
    arrays, _ = golden(scale)
    out, _ = jax.jit(SwinIR(model.config).apply)({"params": model.params}, nhwc(arrays[f"crop_{crop}"]))
    expected = arrays[f"fp_out_{crop}"]
    assert nchw(out).shape == expected.shape
    err = np.abs(nchw(out) - expected).max()
    assert err <= 1e-4, f"x{scale} crop_{crop}: max abs error {err:.3g}"


@pytest.mark.parametrize("scale,count", [(2, 877_752), (3, 885_867), (4, 897_228)])
def test_parameter_count(scale, count):
    shapes = jax.eval_shape(SwinIR(swinir_light(scale)).init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    n = sum(v.size for k, v in leaves if "relative_position_bias_table" not in jax.tree_util.keystr(k))
    assert n == count


def test_stage_features_are_returned():
    config = swinir_light(2)
    x = jnp.zeros((2, 16, 24, 3))
    out, features = jax.eval_shape(lambda x: SwinIR(config).init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert out.shape == (2, 32, 48, 3)
    assert [f.shape for f in features] == [(2, 16 * 24, 60)] * 4


def test_flip_pad_mirrors_the_image():
    x = jnp.arange(2 * 5 * 3 * 1, dtype=jnp.float32).reshape(2, 5, 3, 1)
    y = np.asarray(flip_pad(x, 4))
    assert y.shape == (2, 8, 4, 1)
    np.testing.assert_array_equal(y[:, 5:8, :3], np.asarray(x)[:, ::-1][:, :3])  # rows 5..7 = rows 4, 3, 2
    np.testing.assert_array_equal(y[:, :5, 3], np.asarray(x)[:, :, 2])  # column 3 = column 2


def test_pixel_shuffle_matches_pytorch_channel_order():
    # PyTorch: out[c, h*r + i, w*r + j] = in[c*r*r + i*r + j, h, w]
    r, c = 2, 3
    x = np.random.default_rng(0).standard_normal((1, 2, 2, c * r * r)).astype(np.float32)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), r))
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                np.testing.assert_array_equal(y[0, i::r, j::r, ch], x[0, :, :, ch * r * r + i * r + j])


def test_shift_mask_separates_regions():
    mask = shifted_window_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert not mask[0].any()  # the top-left window holds one region only
    assert (mask[3] == -100).sum() == 64 * 64 - 4 * 16 * 16  # bottom-right: 4 regions of 16 tokens


def test_softmax_gradient_by_hand():
    """The softmax's hand-written VJP against its Jacobian diag(y) - y y^T, row by row, in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, g = (jnp.asarray(rng.standard_normal((3, 2, 5)) * 4) for _ in range(2))
        y, vjp = jax.vjp(softmax, x)
        np.testing.assert_array_equal(y, jax.nn.softmax(x, axis=-1))
        expected = np.einsum("...ij,...i->...j", jax.vmap(jax.vmap(lambda r: jnp.diag(r) - jnp.outer(r, r)))(y), g)
        np.testing.assert_allclose(vjp(g)[0], expected, rtol=1e-12, atol=1e-15)
