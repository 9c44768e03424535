"""NGswin port: parity with the authors' PyTorch forward (golden arrays), parameter count, Set5 under the authors'
test protocol, and the converter's key table (round trip, derived buffers, damaged state dicts)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA_ROOT, GOLDEN_DIR, nchw, nhwc, require
from test_convert import run_script
from jaxquant.checkpoint import load_model, save_model
from jaxquant.data import load_benchmark
from jaxquant.dobi import Calibration, calibrate
from jaxquant.evaluation import evaluate
from jaxquant.pipeline import PRESETS, architecture_of, preset
from jaxquant.quant import QuantRules, flat_bounds, init_bounds, list_sites, quantize
from jaxquant.ngswin import (
    NGswin, NGswinConfig, check_params, config_from_params, ngswin, param_shapes, sequential_pad_indices,
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
def model():
    return load_model(require(WEIGHTS))  # the architecture read off the keys


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


def test_set5_psnr_under_authors_protocol(model):
    """`jaxquant.evaluate` runs NGswin under its authors' protocol (LR padded symmetric to a multiple of 32 before
    the model, output cropped, uint8, Y, border 2): their code measured 38.046 dB (golden JSON, per image too)."""
    meta = json.loads(require(GOLDEN_DIR / "ngswin_x2.json").read_text())
    set5 = evaluate(model, {"Set5": load_benchmark(DATA_ROOT, "Set5", 2)}, show_progress=False)["Set5"]
    np.testing.assert_allclose([r["psnr"] for r in set5["images"].values()], meta["set5_per_image"], atol=0.01)
    assert abs(set5["psnr"] - meta["set5_y_psnr"]) <= 0.01, f"Set5 {set5['psnr']:.4f} dB"


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
        torch_to_flax(state_dict | buffers | {key: np.asarray(shifted_window_mask(64, 64, 8, 4))[:16] * 0})


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


def test_sites_follow_2dquants_rule():
    """28 sites a block (spec section 9): both attentions' q, k, v and proj linears (input and weight), their
    normalised q and k, softmax output and v; the MLP's fc1 and fc2. 20 blocks: 560, 200 of them weights."""
    sites = list_sites(ngswin(2))
    assert len(sites) == 560 and sum(path.endswith("/weight") for path in sites) == 200
    prefix = "encoder_layer2/blocks_3/"
    block = sorted(p.removeprefix(prefix) for p in sites if p.startswith(prefix))
    linears = [f"{name}/{site}" for name in ("proj", "qkv/k", "qkv/q", "qkv/v") for site in ("act", "weight")]
    attention = ["k", "probs", "q_scaled", "v", *linears]
    context = "ngram_window_partition/ngram_context/ngram_attn/"
    assert block == sorted([*(f"attn/{a}" for a in attention), "ffn/fc1/act", "ffn/fc1/weight", "ffn/fc2/act",
                            "ffn/fc2/weight", *(context + a for a in attention)])


def test_checkpoint_keeps_the_architecture(model, tmp_path):
    bounds = init_bounds(model.config, QuantRules.uniform(4), fill=(-1.0, 1.0))
    loaded = load_model(save_model(tmp_path / "ngswin", model._replace(bounds=bounds)))
    assert loaded.config == model.config and config_from_params(loaded.params) == model.config
    assert {b.bits for b in flat_bounds(loaded.bounds).values()} == {4}


def test_dobi_beats_minmax_on_ngswin(model):
    """W4A4 calibrated on one 32x32 LR patch of Set5's butterfly, judged on another: DOBI's output is closer to
    FP than MinMax's (the rule 2DQuant's paper rests on)."""
    lr = jnp.asarray(load_benchmark(DATA_ROOT, "Set5", 2)[2].lr, jnp.float32) / 255.0
    calib, held_out = lr[None, 0:32, 0:32], lr[None, 64:96, 64:96]
    start = init_bounds(model.config, QuantRules.uniform(4))
    fp = NGswin(model.config).apply({"params": model.params}, held_out)[0]
    errors = {}
    for method in ("minmax", "dobi"):
        bounds = calibrate(model.config, Calibration(method=method), model.params, start, calib)
        errors[method] = float(jnp.mean(jnp.abs(quantize(model.params, bounds, model.config)(held_out) - fp)))
    assert errors["dobi"] < errors["minmax"], errors


def test_scripts_need_no_model_flag(tmp_path):
    """convert.py recognises NGswin from the keys, export.py writes it back in the authors' layout, quantize.py
    picks NGswin's presets from the model source."""
    result = run_script("scripts/convert.py", str(require(WEIGHTS)), "-o", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    described = "NGswin x2 (embed_dim 64, encoder depths [6, 4, 4], decoder depth 6, window 8)"
    assert f"{described}, 998,384 parameters" in result.stdout
    assert architecture_of(str(tmp_path / "ckpt")) == "ngswin" and architecture_of(None) == "swinir"
    result = run_script("scripts/export.py", str(tmp_path / "ckpt"), "-o", str(tmp_path / "back.pth"))
    assert result.returncode == 0, result.stderr
    back, original = load_pth(tmp_path / "back.pth"), load_pth(WEIGHTS)  # a bare state dict, as the authors'
    assert list(back) == list(original) and all(np.array_equal(back[k], v) for k, v in original.items())
    assert preset("quick", "ngswin") != preset("quick", "swinir") == PRESETS["quick"]
