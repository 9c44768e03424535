"""Tests for scripts/export.py: real .pth -> Flax -> exported .pth is lossless, and torch reads it."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.quant import QuantRules, init_bounds
from weights_convert.swinir import torch_to_flax, unwrap_state_dict
from weights_convert.torch_pickle import load_pth, save_pth

REPO = Path(__file__).resolve().parents[1]


def export(argv: list) -> None:
    runpy.run_path(str(REPO / "scripts" / "export.py"))["main"]([str(a) for a in argv])


@pytest.fixture(scope="module")
def real_pth(data_root) -> Path:
    path = data_root / "weights" / "swinir_light_x2_t291.pth"
    if not path.is_file():
        pytest.skip(f"missing {path}")
    return path


@pytest.fixture(scope="module")
def exported(real_pth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "x2.pth"
    export([real_pth, "-o", out])
    return out


def test_round_trip_is_bitwise(real_pth, exported):
    original = unwrap_state_dict(load_pth(real_pth))
    written = unwrap_state_dict(load_pth(exported))
    derived = {k for k in original if k.endswith("relative_position_index")}
    assert len(derived) == 24 and set(written) == set(original) - derived
    for key, value in written.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    config, params = torch_to_flax(written)
    model = load_model(real_pth)
    assert config == model.config
    for (path, a), (_, b) in zip(_leaves(params), _leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=path)


def _leaves(params):
    return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)]


def test_torch_reads_the_export(real_pth, exported):
    torch = pytest.importorskip("torch")
    written = torch.load(exported, weights_only=True)
    original = torch.load(real_pth, weights_only=True)["params"]
    assert list(written) == ["params"]
    for key, tensor in written["params"].items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), key
        assert torch.equal(tensor, original[key]), key


def test_quantized_model_exports_fp_params_with_a_note(real_pth, tmp_path, capsys):
    model = load_model(real_pth)
    save_model(tmp_path / "q", Model(model.config, model.params, init_bounds(model.config, QuantRules.uniform(4), fill=(-1.0, 1.0))))
    export([tmp_path / "q", "-o", tmp_path / "q.pth"])
    assert "bounds not exported" in capsys.readouterr().out
    written = unwrap_state_dict(load_pth(tmp_path / "q.pth"))
    original = unwrap_state_dict(load_pth(real_pth))
    np.testing.assert_array_equal(written["conv_first.weight"], original["conv_first.weight"])


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no model at .*missing$"):
        export([tmp_path / "missing", "-o", tmp_path / "x.pth"])


def test_an_existing_output_is_refused_and_kept(real_pth, tmp_path):
    out = tmp_path / "x.pth"
    out.write_text("keep me")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(out))} exists; choose another path or remove it$"):
        export([real_pth, "-o", out])
    assert out.read_text() == "keep me"


def test_a_malformed_pth_names_the_file_and_the_key(real_pth, tmp_path):
    fc1 = "layers.0.residual_group.blocks.0.mlp.fc1.weight"
    source = tmp_path / "no_fc1.pth"
    save_pth(source, {"params": {k: v for k, v in unwrap_state_dict(load_pth(real_pth)).items() if k != fc1}})
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(source))}: missing '{re.escape(fc1)}'"):
        export([source, "-o", tmp_path / "x.pth"])
    assert not (tmp_path / "x.pth").exists()


def test_a_checkpoint_whose_config_does_not_fit_its_params_is_not_exported(real_pth, tmp_path):
    checkpoint = save_model(tmp_path / "x2", load_model(real_pth))
    metadata = checkpoint / "config" / "metadata"
    metadata.write_text(json.dumps(json.loads(metadata.read_text()) | {"upscale": 5}))  # exported as x5 before
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(checkpoint))} is a damaged checkpoint: param "):
        export([checkpoint, "-o", tmp_path / "x.pth"])
    assert not (tmp_path / "x.pth").exists()
