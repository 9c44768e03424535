"""Evaluation protocol end to end: Set5 PSNR of the converted t291 models equals the official measurement.
evaluate.py and summarize.py refuse bad input in one line, before any work they would lose."""

import json
import re

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
    saved = json.loads(out.read_text())
    assert saved["matmul_precision"] == "highest"  # the parity tests' setting, recorded
    set5 = saved["results"]["Set5"]
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


def quantize_results(scale, bits, seed=0, dqc=True, datasets=("Set5", "Urban100")):
    """A run's results with made-up scores: PSNR a base per stage, minus bits / scale and 2 dB per dataset
    further in the list, plus bits / 2 for a quantized stage and 0.2 dB per seed; SSIM PSNR / 50."""
    base = {"FP": 30.0, "MinMax": 27.0, "DOBI-official": 28.0, "DQC": 29.0}
    stages = [stage for stage in base if dqc or stage != "DQC"]
    score = lambda psnr: {"psnr": psnr, "ssim": psnr / 50}
    results = {stage: {d: score(base[stage] - bits / scale - 2 * i + (stage != "FP") * bits / 2 + 0.2 * seed)
                       for i, d in enumerate(datasets)} for stage in stages}
    return {"config": {"scale": scale, "bits": bits, "seed": seed}, "results": results,
            "dqc": {"best_step": 80} if dqc else None}


@pytest.fixture
def table3_runs(tmp_path):
    """x4 W2 twice (seeds 0 and 1, the second without Urban100), x4 W4 without DQC, x2 W3."""
    runs = {"x4_w2_s0": quantize_results(4, 2), "x4_w2_s1": quantize_results(4, 2, seed=1, datasets=("Set5",)),
            "x4_w4": quantize_results(4, 4, dqc=False), "x2_w3": quantize_results(2, 3)}
    return [write_run(tmp_path / name, results) for name, results in runs.items()]


def test_summarize_prints_table3_by_scale_bits_and_method(table3_runs, tmp_path):
    result = run_script("scripts/summarize.py", *map(str, table3_runs), "--out", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stderr
    # x4 FP, Set5: the mean of 29.5 and 29.7 (W2, seeds 0 and 1) and 29.0 (W4); Urban100: of 27.5 and 27.0.
    assert result.stdout.splitlines() == [
        "| Scale | Method | W/A | Set5 PSNR / SSIM | Urban100 PSNR / SSIM | runs |",
        "|---|---|---|---|---|---|",
        "| x2 | FP | 32/32 | 28.500 / 0.5700 | 26.500 / 0.5300 | 1 |",
        "| x2 | MinMax | 3/3 | 27.000 / 0.5400 | 25.000 / 0.5000 | 1 |",
        "| x2 | DOBI-official | 3/3 | 28.000 / 0.5600 | 26.000 / 0.5200 | 1 |",
        "| x2 | DQC | 3/3 | 29.000 / 0.5800 | 27.000 / 0.5400 | 1 |",
        "| x4 | FP | 32/32 | 29.400 / 0.5880 | 27.250 / 0.5450 (2 of 3) | 3 |",
        "| x4 | MinMax | 4/4 | 28.000 / 0.5600 | 26.000 / 0.5200 | 1 |",
        "| x4 | DOBI-official | 4/4 | 29.000 / 0.5800 | 27.000 / 0.5400 | 1 |",
        "| x4 | MinMax | 2/2 | 27.600 / 0.5520 | 25.500 / 0.5100 (1 of 2) | 2 |",
        "| x4 | DOBI-official | 2/2 | 28.600 / 0.5720 | 26.500 / 0.5300 (1 of 2) | 2 |",
        "| x4 | DQC | 2/2 | 29.600 / 0.5920 | 27.500 / 0.5500 (1 of 2) | 2 |",
    ]
    assert (tmp_path / "table.md").read_text() == result.stdout


def test_summarize_columns_follow_datasets(table3_runs):
    result = run_script("scripts/summarize.py", *map(str, table3_runs[2:]), "--datasets", "Urban100")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == ["| Scale | Method | W/A | Urban100 PSNR / SSIM | runs |",
                                              "|---|---|---|---|---|",
                                              "| x2 | FP | 32/32 | 26.500 / 0.5300 | 1 |",
                                              "| x2 | MinMax | 3/3 | 25.000 / 0.5000 | 1 |"]
    result = run_script("scripts/summarize.py", *map(str, table3_runs), "--datasets", "Set5,B100")
    assert_one_line_error(result, "no run has B100 results (they have Set5, Urban100)")


def latex_width(row: str) -> int:
    r"""Columns a LaTeX table row spans: one per cell, a \multicolumn{n} n."""
    return sum(int(re.match(r"\s*\\multicolumn\{(\d+)\}", cell).group(1)) if "\\multicolumn" in cell else 1
               for cell in row.split("&"))


def test_summarize_latex_is_balanced_and_json_holds_the_rows(table3_runs):
    latex = run_script("scripts/summarize.py", *map(str, table3_runs), "--latex")
    assert latex.returncode == 0, latex.stderr
    lines = latex.stdout.splitlines()
    assert lines[0] == r"\begin{tabular}{llccccc}" and lines[-1] == r"\end{tabular}"
    rows = [line for line in lines if line.endswith(r" \\")]
    assert len(rows) == 2 + 10 and all(line.count(r"\\") == 1 for line in lines if r"\\" in line)
    assert [latex_width(row) for row in rows] == [7] * 12, rows  # Scale, Method, W/A, 2 x (PSNR, SSIM)
    assert r"$\times$4 & FP & 32/32 & 29.400 & 0.5880 & 27.250 & 0.5450 (2 of 3) \\" in rows
    assert lines.count(r"\midrule") == 2  # under the header and between the scales
    assert latex.stdout.count("{") == latex.stdout.count("}")
    result = run_script("scripts/summarize.py", *map(str, table3_runs), "--json")
    rows = json.loads(result.stdout)
    assert rows[4] == {"scale": 4, "method": "FP", "bits": None, "runs": 3, "results": {
        "Set5": {"psnr": pytest.approx(29.4), "ssim": pytest.approx(0.588), "runs": 3},
        "Urban100": {"psnr": pytest.approx(27.25), "ssim": pytest.approx(0.545), "runs": 2}}}
    assert [(r["scale"], r["method"], r["bits"]) for r in rows] == [
        (2, "FP", None), *[(2, m, 3) for m in ("MinMax", "DOBI-official", "DQC")],
        (4, "FP", None), (4, "MinMax", 4), (4, "DOBI-official", 4), *[(4, m, 2) for m in ("MinMax", "DOBI-official", "DQC")]]


def scores_of(cell):
    return {"config": {"scale": 2, "bits": 4}, "results": {"FP": {"Set14": cell}}, "dqc": None}


@pytest.mark.parametrize("results, message", [
    pytest.param(None, "run is not a finished quantize run (no results.json)", id="no results"),
    pytest.param("{oops", "run/results.json: not valid JSON", id="malformed"),
    pytest.param("[1, 2]", "run/results.json: expected a JSON object, got list", id="a list"),
    pytest.param({"set5_psnr_y": 30.0, "config": {"scale": 2}}, "run/results.json: not a quantize run's results",
                 id="training run"),
    pytest.param(quantize_results(2, 4), "no run has Set14 results (they have Set5, Urban100)", id="no Set14"),
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
    result = run_script(str(REPO / "scripts" / "summarize.py"), "run", "--datasets", "Set14", cwd=tmp_path)
    assert_one_line_error(result, message)


def test_summarize_refuses_a_folder_as_out(tmp_path):
    run_dir = write_run(tmp_path / "run", quantize_results(2, 4))
    result = run_script("scripts/summarize.py", str(run_dir), "--out", str(tmp_path))
    assert_one_line_error(result, f"{tmp_path} is a folder, not a file")


def test_summarize_refuses_to_overwrite_a_file(tmp_path):
    run_dir = write_run(tmp_path / "run", quantize_results(2, 4))
    before = (run_dir / "results.json").read_text()
    result = run_script("scripts/summarize.py", str(run_dir), "--out", str(run_dir / "results.json"))
    assert_one_line_error(result, f"{run_dir / 'results.json'} exists; choose another path or remove it")
    assert (run_dir / "results.json").read_text() == before


def test_the_evaluate_function_does_not_hide_its_module():
    """`jaxquant.evaluate` is the function; the module that holds it (tiling, the benchmark loop) is importable
    under its own name."""
    import importlib

    import jaxquant

    module = importlib.import_module("jaxquant.evaluation")
    assert jaxquant.evaluate is module.evaluate and callable(module.tiled)
