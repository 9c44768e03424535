"""Evaluation protocol end to end: Set5 PSNR of the converted t291 models equals the official measurement.
evaluate.py and summarize.py refuse bad input in one line, before any work they would lose."""

import json

import numpy as np
import pytest

from conftest import DATA_ROOT, require
from jaxquant.data import write_image
from test_convert import REPO, assert_one_line_error, run_script

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
    result = run_script("scripts/evaluate.py", "--model", str(weights), "--datasets", "Manga109")
    assert_one_line_error(result, str(DATA_ROOT / "benchmark" / "Manga109"))


# --------------------------------------------------------------------------- bad input: one line, nothing lost


@pytest.fixture
def small_root(tmp_path):
    """A data root whose only benchmark, 'Small', holds one 16x16 image (an 8x8 LR at x2)."""
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    write_image(tmp_path / "root" / "benchmark" / "Small" / "HR" / "a.png", image)
    return tmp_path / "root"


def evaluate_x2(*args):
    weights = require(DATA_ROOT / "weights" / "swinir_light_x2_t291.pth")
    return run_script("scripts/evaluate.py", "--model", str(weights), *args)


def test_too_small_benchmark_image_is_one_line(small_root):
    write_image(small_root / "benchmark" / "Tiny" / "HR" / "dot.png", np.zeros((3, 3, 3), np.uint8))
    result = evaluate_x2("--data-root", str(small_root), "--datasets", "Tiny")
    assert_one_line_error(result, f"{small_root / 'benchmark' / 'Tiny' / 'HR' / 'dot.png'} is 3x3")


def test_empty_dataset_list_is_one_line(small_root):
    result = evaluate_x2("--data-root", str(small_root), "--datasets", ",")
    assert_one_line_error(result, "names no benchmark")


def test_all_datasets_are_the_data_roots_benchmarks_in_the_papers_order(small_root, tmp_path):
    write_image(small_root / "benchmark" / "Urban100" / "HR" / "img_001.png", np.zeros((16, 24, 3), np.uint8))
    (small_root / "benchmark" / "Empty").mkdir()  # no HR folder: not a benchmark
    out = tmp_path / "results.json"
    result = evaluate_x2("--data-root", str(small_root), "--datasets", "all", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert list(json.loads(out.read_text())["results"]) == ["Urban100", "Small"]


@pytest.mark.parametrize("args, message", [
    (["--datasets", "all", "--data-root", "{empty}"], "--datasets 'all' names no benchmark ({empty}/benchmark has none)"),
    (["--tile", "16", "--tile-overlap", "16"], "the tile (16) must be larger than its overlap (16)"),
    (["--tile", "-8"], "tile and tile overlap must be >= 0, got -8 and 32"),
])
def test_bad_datasets_or_tiling_is_one_line_before_any_work(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    result = evaluate_x2(*[a.format(empty=tmp_path / "empty") for a in args])
    assert_one_line_error(result, message.format(empty=tmp_path / "empty"))
    assert result.stdout == ""


@pytest.mark.parametrize("case, message", [
    ("missing", "benchmark 'Bad' not found"),
    ("too small", "Bad/HR/dot.png is 3x3, too small for x2"),
    ("unreadable", "cannot read image {root}/benchmark/Bad/HR/dot.png"),
])
def test_a_bad_dataset_fails_before_any_is_evaluated(case, message, small_root, tmp_path):
    dot = small_root / "benchmark" / "Bad" / "HR" / "dot.png"
    if case == "too small":
        write_image(dot, np.zeros((3, 3, 3), np.uint8))
    elif case == "unreadable":
        dot.parent.mkdir(parents=True)
        dot.write_bytes(b"not a png")
    result = evaluate_x2("--data-root", str(small_root), "--datasets", "Small,Bad",
                         "--save-images", str(tmp_path / "sr"))
    assert_one_line_error(result, message.format(root=small_root))
    assert not (tmp_path / "sr").exists()  # Small was not evaluated first


@pytest.mark.parametrize("case", ["out is a folder", "out under a file", "images dir is a file", "out is images dir",
                                  "out exists", "images dir is not empty", "out is a dataset's images dir"])
def test_unwritable_outputs_fail_before_evaluating(case, small_root, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "kept.png").write_text("")
    (tmp_path / "file").write_text("kept\n")
    out, images = {
        "out is a folder": (tmp_path / "folder", tmp_path / "sr"),
        "out under a file": (tmp_path / "file" / "results.json", tmp_path / "sr"),
        "images dir is a file": (tmp_path / "results.json", tmp_path / "file"),
        "out is images dir": (tmp_path / "sr", tmp_path / "sr"),
        "out exists": (tmp_path / "file", tmp_path / "sr"),
        "images dir is not empty": (tmp_path / "results.json", tmp_path / "folder"),
        "out is a dataset's images dir": (tmp_path / "sr" / "Small", tmp_path / "sr"),
    }[case]
    result = evaluate_x2("--data-root", str(small_root), "--datasets", "Small", "--out", str(out),
                         "--save-images", str(images))
    assert_one_line_error(result, str(out if case.startswith("out") else images))
    assert result.stdout == ""  # refused before the model was even loaded
    assert not (tmp_path / "sr").exists() and (tmp_path / "file").read_text() == "kept\n"
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["kept.png"]


# --------------------------------------------------------------------------- summarize.py


def write_run(run_dir, results):
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return run_dir


def quantize_results(bits, psnr, seed=0, dqc=0.0):
    """A run's results: FP at `psnr`, DOBI 0.5 dB below, and DQC (if `dqc` is not None) `dqc` dB above DOBI."""
    scores = lambda psnr: {"Set5": {"psnr": psnr, "ssim": 0.9}}
    stages = {"FP": scores(psnr), "DOBI-official": scores(psnr - 0.5)}
    if dqc is not None:
        stages["DQC"] = scores(psnr - 0.5 + dqc)
    return {"config": {"scale": 2, "bits": bits, "seed": seed}, "results": stages,
            "dqc": None if dqc is None else {"best_step": 80}}


def test_summarize_tabulates_runs(tmp_path):
    runs = [write_run(tmp_path / f"w{b}", quantize_results(b, 30.0 + b, dqc=0.25)) for b in (4, 3)]
    result = run_script("scripts/summarize.py", *map(str, runs), "--out", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stderr
    assert "| x2 W3A3 | 33.000 / 0.9000 | 32.500 / 0.9000 | 32.750 / 0.9000 | 80 | +0.250 dB |" in result.stdout
    assert (tmp_path / "table.md").read_text() == result.stdout


def test_summarize_names_seeds_where_runs_repeat_a_setting(tmp_path):
    runs = [write_run(tmp_path / f"s{seed}", quantize_results(4, 30.0, seed, dqc)) for seed, dqc in
            [(0, -0.125), (1, None)]]
    result = run_script("scripts/summarize.py", *map(str, runs))
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[2:]
    assert rows == ["| x2 W4A4 seed 0 | 30.000 / 0.9000 | 29.500 / 0.9000 | 29.375 / 0.9000 | 80 | -0.125 dB |",
                    "| x2 W4A4 seed 1 | 30.000 / 0.9000 | 29.500 / 0.9000 | - | - | - |"]


def scores_of(cell):
    return {"config": {"scale": 2, "bits": 4}, "results": {"FP": {"Set14": cell}}}


@pytest.mark.parametrize("results, message", [
    pytest.param(None, "run is not a finished quantize run (no results.json)", id="no results"),
    pytest.param("{oops", "run/results.json: not valid JSON", id="malformed"),
    pytest.param("[1, 2]", "run/results.json: expected a JSON object, got list", id="a list"),
    pytest.param({"set5_psnr_y": 30.0, "config": {"scale": 2}}, "run/results.json: not a quantize run's results",
                 id="training run"),
    pytest.param(quantize_results(4, 30.0), "run/results.json: no Set14 results (has Set5)", id="no Set14"),
    pytest.param(scores_of(5), "run/results.json: FP Set14 is not a numeric psnr and ssim: 5", id="a number"),
    pytest.param(scores_of({"psnr": "30", "ssim": 0.9}), "run/results.json: FP Set14 is not a numeric psnr",
                 id="a string psnr"),
    pytest.param(scores_of({"psnr": 30.0}), "run/results.json: FP Set14 is not a numeric psnr", id="no ssim"),
    pytest.param(scores_of({"psnr": 30.0, "ssim": 0.9}) | {"results": {"FP": [1]}},
                 "run/results.json: not a quantize run's results", id="a list of scores"),
    pytest.param(scores_of({"psnr": 30.0, "ssim": 0.9}) | {"dqc": [1]},
                 "run/results.json: not a quantize run's results", id="a list as dqc"),
])
def test_summarize_refuses_what_is_not_a_finished_quantize_run(results, message, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir() if results is None else write_run(run_dir, results)
    result = run_script(str(REPO / "scripts" / "summarize.py"), "run", "--dataset", "Set14", cwd=tmp_path)
    assert_one_line_error(result, message)


def test_summarize_refuses_a_folder_as_out(tmp_path):
    run_dir = write_run(tmp_path / "run", quantize_results(4, 30.0))
    result = run_script("scripts/summarize.py", str(run_dir), "--out", str(tmp_path))
    assert_one_line_error(result, f"{tmp_path} is a folder, not a file")


def test_summarize_refuses_to_overwrite_a_file(tmp_path):
    run_dir = write_run(tmp_path / "run", quantize_results(4, 30.0))
    before = (run_dir / "results.json").read_text()
    result = run_script("scripts/summarize.py", str(run_dir), "--out", str(run_dir / "results.json"))
    assert_one_line_error(result, f"{run_dir / 'results.json'} exists; choose another path or remove it")
    assert (run_dir / "results.json").read_text() == before
