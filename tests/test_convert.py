"""PyTorch -> Flax conversion: layouts accepted, config inference, and loud refusals (in the library and the CLI)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import DATA_ROOT, require
from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.quant import Bounds, QuantRules, flat_bounds, init_bounds, nest_bounds
from jaxquant.runs import RunCheckpointer
from weights_convert.swinir import ConversionError, flax_to_torch, infer_config, torch_to_flax, unwrap_state_dict
from weights_convert.torch_pickle import load_pth, save_pth
from jaxquant.swinir import shifted_window_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def state_dict():
    return unwrap_state_dict(load_pth(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth")))


def test_config_is_inferred(state_dict):
    config = infer_config(state_dict)
    assert (config.upscale, config.embed_dim, config.depths, config.num_heads) == (2, 60, (6, 6, 6, 6), (6,) * 4)
    assert (config.window_size, config.mlp_ratio, config.upsampler) == (8, 2.0, "pixelshuffledirect")


def test_qkv_is_split_row_wise_and_linears_transposed(state_dict):
    _, params = torch_to_flax(state_dict)
    attn = params["layers_1"]["residual_group"]["blocks_3"]["attn"]
    qkv = state_dict["layers.1.residual_group.blocks.3.attn.qkv.weight"]
    for i, name in enumerate("qkv"):
        np.testing.assert_array_equal(attn["qkv"][name]["kernel"], qkv[60 * i : 60 * (i + 1)].T)
    conv = state_dict["conv_first.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(params["conv_first"]["kernel"][1, 2, 0, 5], conv[5, 0, 1, 2])


def test_round_trip_is_lossless(state_dict):
    config, params = torch_to_flax(state_dict)
    back = flax_to_torch(config, params)
    kept = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    assert back.keys() == kept.keys()
    assert all(np.array_equal(back[k], kept[k]) for k in kept)


def test_non_finite_params_are_not_exported(state_dict):
    config, params = torch_to_flax(state_dict)
    params = jax.tree.map(np.array, params)  # a copy: the params may share memory with the module's state dict
    params["layers_2"]["conv"]["bias"][7] = np.inf
    with pytest.raises(ConversionError, match=re.escape("'layers.2.conv.bias' holds NaN or infinite values")):
        flax_to_torch(config, params)


def test_release_layouts_are_accepted(state_dict):
    """`params_ema`, a `module.` prefix, and the `attn_mask` buffers of the official release files."""
    with_masks = dict(state_dict)
    for i in range(4):
        for j in (1, 3, 5):
            with_masks[f"layers.{i}.residual_group.blocks.{j}.attn_mask"] = np.asarray(shifted_window_mask(64, 64, 8, 4))
    wrapped = {"params_ema": {f"module.{k}": v for k, v in with_masks.items()}}
    config, params = torch_to_flax(unwrap_state_dict(wrapped))
    assert config.upscale == 2
    np.testing.assert_array_equal(params["norm"]["scale"], state_dict["norm.weight"])


def test_wrong_buffer_is_refused(state_dict):
    sd = dict(state_dict)
    sd["layers.0.residual_group.blocks.1.attn_mask"] = np.zeros((64, 64, 64), np.float32)
    with pytest.raises(ConversionError, match="attn_mask"):
        torch_to_flax(sd)


def test_not_swinir_is_refused():
    with pytest.raises(ConversionError, match="not a SwinIR state dict"):
        torch_to_flax({"fc.weight": np.zeros((10, 5), np.float32)})


def test_wrong_shape_names_the_key(state_dict):
    sd = dict(state_dict)
    sd["layers.2.residual_group.blocks.4.mlp.fc2.weight"] = np.zeros((60, 100), np.float32)
    with pytest.raises(ConversionError, match=r"'layers\.2\.residual_group\.blocks\.4\.mlp\.fc2\.weight' has shape \(60, 100\)"):
        torch_to_flax(sd)


def test_missing_and_leftover_keys_are_named(state_dict):
    sd = dict(state_dict)
    del sd["layers.3.conv.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"missing layers\.3\.conv\.bias; unexpected extra\.weight"):
        torch_to_flax(sd)


TABLE = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
FC1 = "layers.0.residual_group.blocks.0.mlp.fc1.weight"
X2 = "SwinIR x2 (embed_dim 60, depths [6, 6, 6, 6], heads [6, 6, 6, 6], window 8, pixelshuffledirect)"
# A copy of the real x2 state dict with one thing wrong -> what the one-line error must say.
MALFORMED = {
    "non_string_key": (lambda sd: sd | {1: np.zeros(3, np.float32)}, "key 1 (int) is not a string"),
    "table_1d": (lambda sd: sd | {TABLE: np.zeros(225, np.float32)},
                 f"'{TABLE}' has shape (225,); SwinIR needs 2 dimensions ((2*window-1)**2, heads)"),
    "table_7x6": (lambda sd: sd | {TABLE: np.zeros((7, 6), np.float32)},
                  f"'{TABLE}' has shape (7, 6); SwinIR needs ((2*window-1)**2, heads), e.g. (225, 6)"),
    "zero_size": (lambda sd: sd | {"conv_first.weight": np.zeros((60, 0, 3, 3), np.float32)},
                  "'conv_first.weight' has shape (60, 0, 3, 3), with a zero-size dimension"),
    "missing_fc1": (lambda sd: {k: v for k, v in sd.items() if k != FC1}, f"missing '{FC1}'"),
    "conv_rank_3": (lambda sd: sd | {"conv_after_body.weight": np.zeros((60, 60, 3), np.float32)},
                    f"'conv_after_body.weight' has shape (60, 60, 3); {X2} needs (60, 60, 3, 3)"),
    "conv_rank_1": (lambda sd: sd | {"conv_first.weight": np.zeros(60, np.float32)},
                    "'conv_first.weight' has shape (60,); SwinIR needs 4 dimensions (out, in, kh, kw)"),
    "nan": (lambda sd: sd | {"conv_first.weight": np.full((60, 3, 3, 3), np.nan, np.float32)},
            "'conv_first.weight' holds NaN or infinite values"),
    "inf_after_nan": (lambda sd: sd | {"conv_after_body.bias": np.full(60, np.inf, np.float32),
                                       "layers.3.conv.bias": np.full(60, np.nan, np.float32)},
                      "'layers.3.conv.bias' holds NaN or infinite values"),
    "module_duplicate": (lambda sd: sd | {"module.norm.bias": sd["norm.bias"]},
                         "both 'norm.bias' and 'module.norm.bias'"),
    "integer_weights": (lambda sd: {k: v.astype(np.int64) for k, v in sd.items()},
                        "'conv_first.weight' is int64; SwinIR weights are floating point"),
    # the MLP width is read off every block, so the one wrong tensor is named, not fc1.bias beside it
    "fc1_rows": (lambda sd: sd | {FC1: np.zeros((121, 60), np.float32)},
                 f"'{FC1}' has shape (121, 60); {X2} needs (120, 60)"),
    "missing_upsample_conv": (lambda sd: {k: v for k, v in sd.items() if k != "upsample.0.weight"},
                              "missing 'upsample.0.weight'"),
    "no_upsampler": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("upsample.")},
                     "no 'upsample.*' keys (pixelshuffledirect) nor 'conv_before_upsample.*' keys (pixelshuffle)"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_state_dict_names_key_and_shapes(state_dict, case):
    mutate, message = MALFORMED[case]
    with pytest.raises(ConversionError, match=re.escape(message)) as error:
        torch_to_flax(unwrap_state_dict({"params": mutate(dict(state_dict))}))
    assert "\n" not in str(error.value)


def run_script(*args, cwd=REPO, env=None):
    """A script's CompletedProcess; `env` adds to this process's environment."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else os.environ | env)


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert pattern in lines[0], lines[0]


def test_convert_cli_writes_a_checkpoint(tmp_path):
    result = run_script("scripts/convert.py", str(require(DATA_ROOT / "weights" / "swinir_light_x4_t291.pth")),
                        "-o", str(tmp_path / "x4"))
    assert result.returncode == 0, result.stderr
    # 897,228 (the spec's count) + 24 relative position bias tables of 225 x 6
    assert "SwinIR x4" in result.stdout and "929,628 parameters" in result.stdout
    assert (tmp_path / "x4" / "params").is_dir()


@pytest.mark.parametrize(
    "case,pattern",
    [("malicious", "refusing to unpickle global 'posix.system'"), ("truncated", "truncated"),
     ("not_swinir", "not a SwinIR state dict"), ("wrong_shape", "has shape (60, 7)"), ("missing", "no model at")],
)
def test_convert_cli_bad_input_is_one_line(tmp_path, case, pattern, state_dict):
    path = tmp_path / f"{case}.pth"
    marker = tmp_path / "pwned"
    if case == "malicious":
        import pickle, zipfile

        class Evil:
            def __reduce__(self):
                import os
                return os.system, (f"touch {marker}",)

        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    elif case == "truncated":
        path.write_bytes((DATA_ROOT / "weights" / "swinir_light_x2_t291.pth").read_bytes()[:100_000])
    elif case == "not_swinir":
        save_pth(path, {"params": {"backbone.fc.weight": np.zeros((4, 4), np.float32)}})
    elif case == "wrong_shape":
        bad = {"layers.0.residual_group.blocks.0.attn.proj.weight": np.zeros((60, 7), np.float32)}
        save_pth(path, {"params": state_dict | bad})
    result = run_script("scripts/convert.py", str(path), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, pattern)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_classical_pixelshuffle_swinir_round_trips(scale):
    """The `pixelshuffle` upsampler (classical SwinIR): config inferred back from a state dict, forward shape."""
    import jax

    from jaxquant.swinir import SwinIR, SwinIRConfig

    config = SwinIRConfig(upscale=scale, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4,
                          mlp_ratio=2.0, upsampler="pixelshuffle", num_feat=8)
    x = jax.numpy.zeros((1, 9, 10, 3))
    params = SwinIR(config).init(jax.random.PRNGKey(0), x)["params"]
    state_dict = flax_to_torch(config, params)
    assert "conv_before_upsample.0.weight" in state_dict and "conv_last.weight" in state_dict
    assert infer_config(state_dict) == config
    _, back = torch_to_flax(state_dict)
    out, _ = SwinIR(config).apply({"params": back}, x)
    assert out.shape == (1, 9 * scale, 10 * scale, 3)


@pytest.mark.parametrize("case", ["non_string_key", "zero_size", "missing_fc1", "nan", "integer_weights"])
def test_convert_cli_names_the_file_and_the_key(tmp_path, case, state_dict):
    mutate, message = MALFORMED[case]
    path = tmp_path / f"{case}.pth"
    save_pth(path, {"params": mutate(dict(state_dict))})
    result = run_script("scripts/convert.py", str(path), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, f"error: {path}: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing", ["folder", "file"])
def test_convert_cli_refuses_an_existing_output(tmp_path, existing):
    out = tmp_path / "out"
    kept = out / "notes.txt" if existing == "folder" else out
    kept.parent.mkdir(exist_ok=True)
    kept.write_text("keep me")
    result = run_script("scripts/convert.py", str(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth")),
                        "-o", str(out))
    assert_one_line_error(result, f"{out} exists; choose another path or remove it")
    assert kept.read_text() == "keep me"
    assert set(tmp_path.rglob("*")) == {out, kept}  # nothing added, nothing removed


def test_convert_cli_refuses_param_key_for_a_checkpoint(tmp_path):
    checkpoint = save_model(tmp_path / "ckpt", load_model(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth")))
    result = run_script("scripts/convert.py", str(checkpoint), "--param-key", "bogus", "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "--param-key applies to a .pth file")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory) -> Path:
    """A W4A4 x2 model checkpoint, for tests to copy and damage."""
    model = load_model(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth"))
    bounds = init_bounds(model.config, QuantRules.uniform(4), fill=(-1.0, 1.0))
    return save_model(tmp_path_factory.mktemp("model") / "q", Model(model.config, model.params, bounds))


def _edit_json_item(checkpoint: Path, item: str, edit) -> None:
    """Hand-edit a JSON item (`config` or `bits`) of a model checkpoint."""
    metadata = checkpoint / item / "metadata"
    metadata.write_text(json.dumps(edit(json.loads(metadata.read_text()))))


def _damage(checkpoint: Path, case: str) -> None:
    if case == "truncated":
        for data in (checkpoint / "params" / "d").iterdir():
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif case == "bounds_missing":
        shutil.rmtree(checkpoint / "bounds")
    elif case == "config_edited":
        _edit_json_item(checkpoint, "config", lambda config: config | {"embed_dim": 48})
    else:
        (checkpoint / "config" / "metadata").write_text("{")


@pytest.mark.parametrize("case, cause", [
    ("truncated", "is a damaged checkpoint: OUT_OF_RANGE"),
    ("bounds_missing", "is a damaged quantized model: its bounds item is missing"),  # it loaded as the FP model
    ("config_garbled", "is a damaged checkpoint: Expecting property name"),
    ("config_edited", "is a damaged checkpoint: param conv_after_body/bias has shape (60,)"),  # failed inside flax
])
def test_a_damaged_model_checkpoint_is_one_line(tmp_path, quantized_checkpoint, case, cause):
    checkpoint = shutil.copytree(quantized_checkpoint, tmp_path / "q")
    _damage(checkpoint, case)
    result = run_script("scripts/evaluate.py", "--model", str(checkpoint), "--datasets", "Set5")
    assert_one_line_error(result, f"{checkpoint} {cause}")  # one line: not orbax's abandoned reads, one traceback each


SITE = "layers_0/residual_group/blocks_0/attn/k"
# A hand edit of one JSON item of the quantized x2 checkpoint -> what the error must say after its path.
EDITED = {
    "config_extra_key": ("config", lambda c: c | {"extra": 1},
                         "config keys do not match SwinIRConfig (unknown: ['extra'], missing: [])"),
    "config_missing_key": ("config", lambda c: {k: v for k, v in c.items() if k != "num_feat"},
                           "config keys do not match SwinIRConfig (unknown: [], missing: ['num_feat'])"),
    "config_list": ("config", lambda c: [1, 2], "config is a JSON list, not an object"),
    "config_string": ("config", lambda c: c | {"upscale": "4"},
                      "config upscale is '4'; SwinIRConfig needs a positive integer"),
    "config_zero_heads": ("config", lambda c: c | {"num_heads": [6, 6, 6, 0]},
                          "config num_heads is [6, 6, 6, 0]; SwinIRConfig needs a non-empty list of positive integers"),
    "config_inconsistent": ("config", lambda c: c | {"num_heads": [6, 6, 6, 7]},
                            "config: embed_dim must be divisible by every num_heads entry"),
    "embed_dim_48": ("config", lambda c: c | {"embed_dim": 48},
                     "param conv_after_body/bias has shape (60,); SwinIR x2 (embed_dim 48, depths [6, 6, 6, 6]"),
    "upscale_5": ("config", lambda c: c | {"upscale": 5}, "param upsample_0/bias has shape (12,); SwinIR x5"),
    "upsampler": ("config", lambda c: c | {"upsampler": "pixelshuffle"},
                  f"params do not match {X2.replace('pixelshuffledirect', 'pixelshuffle')}: "
                  "4 missing ['conv_before_upsample_0/bias', 'conv_before_upsample_0/kernel'], 0 unexpected []"),
    # checked before tracing the model, which builds (window**2, window**2) arrays and a module per block
    "window_1000": ("config", lambda c: c | {"window_size": 1000},
                    "config depths [6, 6, 6, 6], window 1000 do not match its params (24 blocks, bias tables of [225]"),
    "depths_huge": ("config", lambda c: c | {"depths": [6, 6, 6, 10**9]},
                    "config depths [6, 6, 6, 1000000000], window 8 do not match its params (24 blocks"),
    "bits_99": ("bits", lambda b: b | {SITE: 99}, f"bit width 99 of {SITE}: expected an integer 2..8"),
    "bits_x": ("bits", lambda b: b | {SITE: "x"}, f"bit width 'x' of {SITE}: expected an integer 2..8"),
    "bits_float": ("bits", lambda b: b | {SITE: 4.0}, f"bit width 4.0 of {SITE}: expected an integer 2..8"),
    "bits_other_site": ("bits", lambda b: {k: v for k, v in b.items() if k != SITE} | {"nowhere": 4},
                        f"bounds and bit widths name different sites: 1 only in bounds ['{SITE}'], "
                        "1 only in bits ['nowhere']"),
}


@pytest.mark.parametrize("case", EDITED)
def test_an_edited_model_checkpoint_names_itself_and_the_fault(tmp_path, quantized_checkpoint, case):
    item, edit, message = EDITED[case]
    checkpoint = shutil.copytree(quantized_checkpoint, tmp_path / "q")
    _edit_json_item(checkpoint, item, edit)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint.resolve()} is a damaged checkpoint: {message}")):
        load_model(checkpoint)


@pytest.mark.parametrize("lu, message", [
    (np.float32([np.nan, 1.0]), f"{SITE}: non-finite bounds [nan, 1.0]"),
    (np.float32([-np.inf, 1.0]), f"{SITE}: non-finite bounds [-inf, 1.0]"),
    (np.float32([0.0, 1.0, 2.0]), f"{SITE}: expected [lower, upper], got shape (3,)"),
    (np.int32([0, 1]), f"{SITE}: bounds of integer type int32"),
])
def test_a_model_saved_with_unusable_bounds_is_refused_on_load(tmp_path, lu, message):
    model = load_model(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth"))
    flat = flat_bounds(init_bounds(model.config, QuantRules.uniform(4), fill=(-1.0, 1.0)))
    flat[SITE] = Bounds(lu, 4)
    checkpoint = save_model(tmp_path / "q", model._replace(bounds=nest_bounds(flat)))
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint.resolve()} is a damaged checkpoint: {message}")):
        load_model(checkpoint)


def test_loading_a_checkpoint_leaves_the_process_hooks_alone(quantized_checkpoint):
    before = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
    load_model(quantized_checkpoint)
    assert (sys.unraisablehook, logging.getLogger("asyncio").filters) == before


def test_save_model_refuses_an_existing_directory(tmp_path):
    model = load_model(require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'taken'} exists; save elsewhere or pass "
                                                        "overwrite=True")):
        save_model(tmp_path / "taken", model)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    save_model(tmp_path / "taken", model, overwrite=True)
    assert load_model(tmp_path / "taken").config == model.config


def test_a_run_checkpoint_without_its_item_names_it(tmp_path):
    with RunCheckpointer(tmp_path, every=1) as checkpointer:
        checkpointer.save(1, {"x": np.ones(3, np.float32)})
    step = tmp_path.resolve() / "checkpoints" / "1"
    shutil.rmtree(step / "default")  # what a --resume found in the audit
    with RunCheckpointer(tmp_path, every=1) as checkpointer:
        message = f'{step} is a damaged checkpoint: Item "default" was not found'
        with pytest.raises(ValueError, match=re.escape(message)):
            checkpointer.restore_latest({"x": np.ones(3, np.float32)})
