"""Evaluation protocol end to end: Set5 PSNR of the converted t291 models equals the official measurement."""

import json

import numpy as np
import pytest

from conftest import DATA_ROOT, require
from test_convert import assert_one_line_error, run_script

OFFICIAL_SET5_PSNR = {2: 35.06, 4: 28.89}  # official SwinIR forward on the same weights (shared/data/SOURCES.md)


def test_set5_psnr_matches_official(scale, tmp_path):
    weights = require(DATA_ROOT / "weights" / f"swinir_light_x{scale}_t291.pth")
    out = tmp_path / "results.json"
    result = run_script("scripts/evaluate.py", "--model", str(weights), "--datasets", "Set5", "--out", str(out),
                        "--save-images", str(tmp_path / "sr"))
    assert result.returncode == 0, result.stderr
    set5 = json.loads(out.read_text())["results"]["Set5"]
    assert set5["psnr"] == pytest.approx(OFFICIAL_SET5_PSNR[scale], abs=0.01)
    assert set5["psnr"] == pytest.approx(np.mean([r["psnr"] for r in set5["images"].values()]))
    assert sorted(set5["images"]) == ["baby", "bird", "butterfly", "head", "woman"]
    assert len(list((tmp_path / "sr" / "Set5").glob("*.png"))) == 5
    assert f"{set5['psnr']:.3f}" in result.stdout  # the printed table


def test_missing_dataset_is_one_line(tmp_path):
    weights = require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth")
    result = run_script("scripts/evaluate.py", "--model", str(weights), "--datasets", "Urban100")
    assert_one_line_error(result, str(DATA_ROOT / "benchmark" / "Urban100"))
