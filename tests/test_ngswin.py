"""NGswin port: parity with the authors' PyTorch forward (golden arrays), parameter count, Set5 under the authors'
test protocol, and the converter's key table (round trip, derived buffers, damaged state dicts)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA_ROOT, GOLDEN_DIR, nchw, nhwc, require
from jaxquant.data import load_benchmark
from jaxquant.metrics import psnr_y, to_uint8
from jaxquant.ngswin import (
    NGswin, NGswinConfig, check_params, ngswin, param_shapes, sequential_pad_indices, symmetric_pad,
)
from jaxquant.swinir import shifted_window_mask
from weights_convert.ngswin import ConversionError, expected_buffers, flax_to_torch, torch_to_flax
from weights_convert.torch_pickle import load_pth

WEIGHTS = DATA_ROOT / "weights" / "ngswin_x2.pth"


@pytest.fixture(scope="module")
def state_dict():
    return load_pth(require(WEIGHTS))


@pytest.fixture(scope="module")
def converted(state_dict):
    return torch_to_flax(state_dict)


@pytest.fixture(scope="module")
def forward(converted):
    config, params = converted
    return jax.jit(lambda x: NGswin(config).apply({"params": params}, x)[0])


def test_parameter_count():
    assert sum(np.prod(shape) for shape in param_shapes(ngswin(2)).values()) == 998_384


@pytest.mark.parametrize("crop", ["a", "b"])
def test_fp_output_matches_authors(crop, forward):
    """crop_b (47x55) is zero-padded to 64x64 inside the model, as the authors' forward does."""
    arrays = np.load(require(GOLDEN_DIR / "ngswin_x2.npz"))
    out = nchw(forward(nhwc(arrays[f"crop_{crop}"])))
    expected = arrays[f"fp_out_{crop}"]
    assert out.shape == expected.shape
    err = np.abs(out - expected).max()
    assert err <= 1e-4, f"crop_{crop}: max abs error {err:.3g}"


def test_set5_psnr_under_authors_protocol(forward):
    """LR padded symmetric to a multiple of 32 before the model, output cropped, uint8, Y, border 2: the authors'
    code measured 38.046 dB (golden JSON, per image too)."""
    meta = json.loads(require(GOLDEN_DIR / "ngswin_x2.json").read_text())
    psnrs = []
    for image in load_benchmark(DATA_ROOT, "Set5", 2):
        h, w, _ = image.lr.shape
        sr = forward(symmetric_pad(jnp.asarray(image.lr, jnp.float32)[None] / 255.0, 32))[0, : 2 * h, : 2 * w]
        psnrs.append(psnr_y(to_uint8(np.asarray(sr)), image.hr, 2))
    np.testing.assert_allclose(psnrs, meta["set5_per_image"], atol=0.01)
    assert abs(np.mean(psnrs) - meta["set5_y_psnr"]) <= 0.01, f"Set5 {np.mean(psnrs):.4f} dB"


def test_sequential_pad_indices():
    """The authors' seq_refl_win_pad for ngram 2 and 3 (hand-derived), and the edge repeated where theirs fails."""
    np.testing.assert_array_equal(sequential_pad_indices(4, 2, forward=True), [0, 1, 2, 3, 2])
    np.testing.assert_array_equal(sequential_pad_indices(4, 2, forward=False), [1, 0, 1, 2, 3])
    np.testing.assert_array_equal(sequential_pad_indices(5, 3, forward=True), [0, 1, 2, 3, 4, 2, 3])
    np.testing.assert_array_equal(sequential_pad_indices(5, 3, forward=False), [1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(sequential_pad_indices(1, 2, forward=True), [0, 0])


def test_export_round_trip_is_exact(state_dict, converted):
    exported = flax_to_torch(*converted)
    assert list(exported) == list(state_dict)  # the authors' key order too
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_derived_buffers_are_checked_and_dropped(state_dict, converted):
    buffers = expected_buffers(converted[0])
    assert len(buffers) == 2 * 20 + 10  # two position indices a block, a mask for each of the 10 shifted blocks
    config, params = torch_to_flax(state_dict | buffers)
    assert config == converted[0]
    key = "decoder_layer1.blocks.3.attn_mask"
    with pytest.raises(ConversionError, match=f"buffer '{key}' does not match"):
        torch_to_flax(state_dict | buffers | {key: shifted_window_mask(64, 64, 8, 4)[:16] * 0})


QKV = "encoder_layer2.blocks.3.attn.qkv.weight"
NGRAM_TABLE = "decoder_layer1.blocks.5.ngram_window_partition.ngram_context.ngram_attn.relative_position_bias_table"
X2 = re.escape("NGswin x2 (embed_dim 64, encoder depths [6, 4, 4], decoder depth 6, window 8)")
DAMAGED = {
    "wrong_shape": (lambda sd: sd | {QKV: np.zeros((180, 64), np.float32)},
                    rf"^'{QKV}' has shape \(180, 64\); {X2} needs \(192, 64\)$"),
    "wrong_ngram_table": (lambda sd: sd | {NGRAM_TABLE: np.zeros((25, 6), np.float32)},
                          rf"^'{NGRAM_TABLE}' has shape \(25, 6\); .* needs \(9, 6\)$"),
    "missing_key": (lambda sd: {k: v for k, v in sd.items() if k != "bottleneck.norm.bias"},
                    r"^state dict does not match .*: missing bottleneck\.norm\.bias$"),
    "swinir_keys_mixed_in": (
        lambda sd: sd | {"layers.0.residual_group.blocks.0.attn.qkv.weight": np.zeros((180, 60), np.float32)},
        r"^state dict does not match .*: unexpected layers\.0\.residual_group\.blocks\.0\.attn\.qkv\.weight$"),
    "nan": (lambda sd: sd | {"norm.weight": np.full(64, np.nan, np.float32)}, r"^'norm\.weight' holds NaN"),
    "no_decoder": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("decoder_layer1.")},
                   r"^missing 'decoder_layer1\.blocks\.0\.attn\.relative_position_bias_table'"),
}


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_state_dict_is_one_line_naming_the_key(state_dict, damage):
    edit, message = damage
    with pytest.raises(ConversionError, match=message) as info:
        torch_to_flax(edit(dict(state_dict)))
    assert "\n" not in str(info.value)


def test_params_are_checked_against_the_config(converted):
    config, params = converted
    check_params(config, params)
    damaged = jax.tree.map(lambda x: x, params)
    damaged["to_target"]["to_origin"]["kernel"] = np.zeros((3, 3, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"param to_target/to_origin/kernel has shape \(3, 3, 3, 4\)"):
        check_params(config, damaged)


def test_config_rejects_unsupported_scale():
    with pytest.raises(ValueError, match="scales"):
        NGswinConfig(upscale=8)
