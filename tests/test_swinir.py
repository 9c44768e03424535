"""SwinIR port: parity with the official PyTorch forward (golden arrays), structure and parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw, nhwc
from jaxquant.swinir import (
    SwinIR, SwinIRConfig, config_from_params, flip_pad, pixel_shuffle, shifted_window_mask, softmax, swinir_light,
)


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


def _param_shapes(config: SwinIRConfig) -> dict:
    x = jax.ShapeDtypeStruct((1, 2 * config.window_size, 2 * config.window_size, config.in_chans), jnp.float32)
    return jax.eval_shape(SwinIR(config).init, jax.random.PRNGKey(0), x)["params"]


@pytest.mark.parametrize("config", [
    swinir_light(2), swinir_light(3), swinir_light(4),
    SwinIRConfig(upscale=4, embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, upsampler="pixelshuffle"),
    SwinIRConfig(upscale=3, in_chans=1, embed_dim=48, depths=(2, 4), num_heads=(3, 6), window_size=4, mlp_ratio=1.5,
                 upsampler="pixelshuffle", num_feat=32),
    SwinIRConfig(upscale=8, embed_dim=24, depths=(2,), num_heads=(2,), window_size=4, mlp_ratio=4.0),
], ids=["light-x2", "light-x3", "light-x4", "classical-x4", "gray-x3-two-stages", "x8-direct"])
def test_config_is_read_off_the_params(config):
    assert config_from_params(_param_shapes(config)) == config


def _without(params: dict, key: str) -> dict:
    return {k: v for k, v in params.items() if k != key}


def _replaced(params: dict, path: str, value) -> dict:
    """A copy of `params` with the leaf at '/'-joined `path` replaced."""
    head, _, rest = path.partition("/")
    return params | {head: _replaced(params[head], rest, value) if rest else value}


@pytest.mark.parametrize("edit,message", [
    (lambda p: {"params": p}, r"Flax variables holding them: pass variables\['params'\]"),
    (lambda p: {}, "not SwinIR params: no conv_first/kernel"),
    (lambda p: p | {"conv_first": {"kernel": np.zeros((3, 60))}}, r"conv_first/kernel has shape \(3, 60\), not 4 dim"),
    (lambda p: _without(p, "layers_0"), "no layers_0/residual_group/blocks_0/attn/relative_position_bias_table"),
    (lambda p: _without(p, "upsample_0"), "no upsample_0/kernel"),
    (lambda p: _replaced(p, "layers_0/residual_group/blocks_0/attn/relative_position_bias_table", np.zeros((224, 6))),
     r"window 7 do not match its params \(24 blocks, bias tables of \[224, 225\] rows\)"),
    (lambda p: _replaced(p, "layers_1/residual_group/blocks_3/mlp/fc2/kernel", np.zeros((100, 60))),
     r"param layers_1/residual_group/blocks_3/mlp/fc2/kernel has shape \(100, 60\); SwinIR x2 .* needs \(120, 60\)"),
    (lambda p: _without(p, "conv_after_body"), r"2 missing \['conv_after_body/bias', 'conv_after_body/kernel'\]"),
], ids=["variables", "empty", "conv-rank", "no-stage-0", "no-upsampler", "bias-table-rows", "deep-param-shape",
        "missing-param"])
def test_config_from_other_trees_is_refused(edit, message):
    with pytest.raises(ValueError, match=message):
        config_from_params(edit(_param_shapes(swinir_light(2))))


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


def _official_calculate_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """SwinIR's `SwinTransformerBlock.calculate_mask`, in numpy."""
    img_mask = np.zeros((1, h, w, 1), np.float32)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    windows = img_mask.reshape(1, h // ws, ws, w // ws, ws, 1).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


@pytest.mark.parametrize("h, w, ws", [(16, 16, 8), (24, 40, 8), (12, 8, 4)])
def test_shift_mask_is_the_official_one(h, w, ws):
    np.testing.assert_array_equal(np.asarray(shifted_window_mask(h, w, ws, ws // 2)),
                                  _official_calculate_mask(h, w, ws, ws // 2))


def test_the_shift_mask_is_not_baked_into_the_program():
    """The mask is built in the graph: a program's text does not grow with the image (as a constant, the mask
    of a 128x128 input alone is 4 MB)."""
    config = SwinIRConfig(upscale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)
    model = SwinIR(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    text = {size: len(jax.jit(model.apply).lower(params, jnp.zeros((1, size, size, 3))).as_text())
            for size in (16, 128)}
    assert text[128] < 1.2 * text[16], text


@pytest.mark.parametrize("h, w", [(3, 5), (1, 1), (9, 2)])
def test_images_smaller_than_half_a_window_run(h, w):
    """Flip padding repeats the mirrored image where one mirror is too short, which is numpy's symmetric pad."""
    x = np.random.default_rng(0).uniform(size=(1, h, w, 3)).astype(np.float32)
    expected = np.pad(x, ((0, 0), (0, -h % 8), (0, -w % 8), (0, 0)), mode="symmetric")
    np.testing.assert_array_equal(np.asarray(flip_pad(jnp.asarray(x), 8)), expected)
    config = SwinIRConfig(upscale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=8)
    model = SwinIR(config)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert model.apply(params, jnp.asarray(x))[0].shape == (1, 2 * h, 2 * w, 3)


def test_an_mlp_width_that_is_no_exact_ratio_is_read_back():
    """42 channels with 51 hidden units: 51 / 42 times 42 truncates to 50, so the ratio read off the params is
    the next float up, whose product truncates to 51 as the official int(dim * mlp_ratio) does."""
    config = SwinIRConfig(upscale=2, embed_dim=42, depths=(2,), num_heads=(6,), window_size=4, mlp_ratio=1.22)
    assert config.mlp_hidden == 51 and int(42 * (51 / 42)) == 50
    params = SwinIR(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    read = config_from_params(params)
    assert read.mlp_hidden == 51
    assert read == dataclasses.replace(config, mlp_ratio=read.mlp_ratio)
