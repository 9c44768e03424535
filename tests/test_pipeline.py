"""The quantization pipeline: calibration sources, exact DQC resume, and the CLI end to end."""

import dataclasses
import io
import json
import re
import runpy
import sys
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import DATA_ROOT, ctrl_c_on_call, require
from jaxquant.checkpoint import load_model
from jaxquant.data import list_images, load_benchmarks, read_image, write_image
from jaxquant.dqc import DQCConfig
from jaxquant import pipeline
from jaxquant.evaluation import evaluate, with_matmul_precision_here
from jaxquant.patches import PatchPool
from jaxquant.pipeline import (QuantizeConfig, distill, dqc_pool, load_calibration, quantize_run, read_bounds_json,
                               run_dqc, write_bounds_json)
from jaxquant.quant import QuantRules, flat_bounds, init_bounds, list_sites, official_name
from jaxquant.swinir import swinir_light
from test_convert import REPO, assert_one_line_error, run_script
from weights_convert.torch_pickle import save_pth


@pytest.fixture(scope="module")
def tiny_train_dir(tmp_path_factory):
    """Three 160x160 crops of training images: LR 40x40 at x4, enough for 16x16 patches."""
    folder = tmp_path_factory.mktemp("train")
    for path in list_images(require(DATA_ROOT / "train" / "t291"))[:3]:
        write_image(folder / path.name, read_image(path)[:160, :160])
    return folder


def test_calibration_sources_agree(tmp_path):
    batch = np.random.default_rng(0).random((3, 3, 16, 20)).astype(np.float32)
    np.save(tmp_path / "calib.npy", batch)
    np.savez(tmp_path / "one.npz", batch)
    np.savez(tmp_path / "lq.npz", lq=batch, other=batch[:1])
    save_pth(tmp_path / "cali_data_x4.pth", {"lq": batch})
    for name in ("calib.npy", "one.npz", "lq.npz", "cali_data_x4.pth"):
        loaded = load_calibration(tmp_path / name, count=32, size=64, seed=0)
        np.testing.assert_array_equal(np.asarray(loaded), batch.transpose(0, 2, 3, 1), err_msg=name)


def test_calibration_folder_is_sampled_reproducibly():
    folder = require(DATA_ROOT / "calib")
    first = load_calibration(folder, count=4, size=32, seed=0)
    assert first.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(load_calibration(folder, 4, 32, seed=0)))
    assert not np.array_equal(np.asarray(first), np.asarray(load_calibration(folder, 4, 32, seed=1)))


@pytest.mark.parametrize("array", [np.zeros((3, 16, 16)), np.zeros((1, 1, 8, 8)), np.zeros((0, 3, 16, 16)),
                                   np.zeros((2, 3, 4, 4))])  # no image; under the window
def test_bad_calibration_arrays_are_refused(tmp_path, array):
    np.save(tmp_path / "bad.npy", array.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) in \[0, 1\]"):
        load_calibration(tmp_path / "bad.npy", 32, 64, 0)


@pytest.mark.parametrize("value, message", [(2.0, "must be in [0, 1], found values from 0 to 2"),
                                            (-0.5, "must be in [0, 1], found values from -0.5 to 0"),
                                            (np.nan, "hold NaN or infinite values"),
                                            (np.inf, "hold NaN or infinite values")])
def test_calibration_values_outside_the_unit_range_are_named(tmp_path, value, message):
    array = np.zeros((1, 3, 8, 8), np.float32)
    array[0, 1, 2, 3] = value
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_calibration(tmp_path / "bad.npy", 32, 64, 0)


def _npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def test_calibration_files_are_checked_before_numpy_reads_them(tmp_path):
    """A header promising more than the file holds would first allocate it (here 101 GiB, a MemoryError);
    bytes that are no .npy made numpy suggest unpickling them; complex and boolean arrays loaded as numbers."""
    (tmp_path / "huge.npy").write_bytes(_npy_header((100000, 3, 300, 300)) + bytes(4096))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("lq.npy", _npy_header((100000, 3, 300, 300)) + bytes(4096))
    (tmp_path / "random.npy").write_bytes(np.random.default_rng(0).bytes(4096))
    np.save(tmp_path / "complex.npy", np.full((1, 3, 8, 8), 0.5 + 0.5j, np.complex64))
    np.save(tmp_path / "bool.npy", np.ones((1, 3, 8, 8), bool))
    save_pth(tmp_path / "bool.pth", {"lq": np.ones((1, 3, 8, 8), bool)})
    cases = {"huge.npy": "array of 108,000,000,000 bytes, but the file holds 4,096",
             "huge.npz": "array of 108,000,000,000 bytes, but the file holds 4,096",
             "random.npy": "not a valid .npy array of real numbers (no numpy header)",
             "complex.npy": "not a valid .npy array of real numbers (complex64 values)",
             "bool.npy": "not a valid .npy array of real numbers (bool values)",
             "bool.pth": "calibration images must be real numbers, got bool"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: ")) as error:
            load_calibration(tmp_path / name, 32, 64, 0)
        assert message in str(error.value) and "allow_pickle" not in str(error.value), name


def test_unreadable_calibration_files_are_named(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    save_pth(tmp_path / "lq_dict.pth", {"lq": {"nested": np.zeros((1, 3, 8, 8), np.float32)}})
    for name in ("empty.npy", "objects.npy", "lq_dict.pth"):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
            load_calibration(tmp_path / name, 32, 64, 0)


@pytest.fixture(scope="module")
def tiny_dqc(tiny_train_dir, tmp_path_factory) -> tuple[dict, QuantizeConfig, PatchPool]:
    """Start bounds, a 4-step x4 W2 DQC run (batch 2, 16x16) validated and checkpointed every 2 steps, its pool.
    The run's data root holds a Set5 of one 64x64 crop: validation compiles one image shape, not Set5's five."""
    root = tmp_path_factory.mktemp("root")
    baby = read_image(require(DATA_ROOT / "benchmark" / "Set5" / "HR" / "baby.png"))
    write_image(root / "benchmark" / "Set5" / "HR" / "baby.png", baby[:64, :64])
    # remat=False: the same bounds (tests/test_dqc.py), 3x quicker to compile at batch 2
    dqc = DQCConfig(steps=4, batch=2, patch=16, remat=False)
    run = QuantizeConfig(bits=2, scale=4, dqc=dqc, train_dir=str(tiny_train_dir), validate_every=2, checkpoint_every=2)
    run = run.with_paths(root)
    return init_bounds(swinir_light(4), QuantRules.uniform(2), fill=(-1.5, 1.5)), run, dqc_pool(run)


def test_dqc_resume_is_bit_exact(tmp_path, t291_model, tiny_dqc, data_root, monkeypatch):
    model = t291_model(4)
    start, run, pool = tiny_dqc
    straight, log = run_dqc(model, start, run, pool, tmp_path / "straight")
    _, stopped = run_dqc(model, start, run, pool, tmp_path / "killed", stop_after=3)
    assert not stopped["completed"]
    resumed, resumed_log = run_dqc(model, start, run, pool, tmp_path / "killed")
    assert resumed_log["completed"] and log["completed"]
    assert resumed_log["validation"] == log["validation"]
    for path, b in flat_bounds(straight).items():
        np.testing.assert_array_equal(np.asarray(flat_bounds(resumed)[path].lu), np.asarray(b.lu), err_msg=path)
    moved = [float(np.abs(np.asarray(b.lu) - [-1.5, 1.5]).max()) for b in flat_bounds(straight).values()]
    assert max(moved) > 0  # the bounds did train

    # A first Ctrl-C during step 3 (no checkpoint step: every 2) lets the step finish and checkpoints it.
    with monkeypatch.context() as patch:
        ctrl_c_on_call(patch, pipeline, "sample_patches", call=3)
        with pytest.raises(KeyboardInterrupt, match="DQC checkpointed at step 3"):
            run_dqc(model, start, run, pool, tmp_path / "ctrl-c")
    assert sorted(int(p.name) for p in (tmp_path / "ctrl-c" / "checkpoints").iterdir()) == [2, 3]
    resumed, resumed_log = run_dqc(model, start, run, pool, tmp_path / "ctrl-c")
    assert resumed_log["validation"] == log["validation"]
    for path, b in flat_bounds(straight).items():
        np.testing.assert_array_equal(np.asarray(flat_bounds(resumed)[path].lu), np.asarray(b.lu), err_msg=path)


@pytest.mark.parametrize("psnrs, kept", [((31.636961687, 31.636961335), 2), ((30.0, 30.0), 4)])
def test_dqc_keeps_the_best_validated_bounds(tmp_path, t291_model, tiny_dqc, data_root, monkeypatch, psnrs, kept):
    """Selection in float64: the two PSNRs are 3.5e-7 dB apart, less than float32 resolves there, and a
    float32 best once kept the lower, later one. On a tie the later step wins, as in BasicSR."""
    model = t291_model(4)
    start, run, pool = tiny_dqc
    at = {}
    for stop in (kept, None):
        monkeypatch.setattr(pipeline, "_validation_psnr", lambda *_, scripted=iter(psnrs): next(scripted))
        at[stop] = run_dqc(model, start, run, pool, tmp_path / str(stop), stop_after=stop)
    (best, log), (bounds_at_kept, _) = at[None], at[kept]
    assert (log["best_step"], log["best_set5_psnr"]) == (kept, psnrs[kept // 2 - 1])
    for path, b in flat_bounds(bounds_at_kept).items():
        np.testing.assert_array_equal(np.asarray(flat_bounds(best)[path].lu), np.asarray(b.lu), err_msg=path)


def test_the_main_initialisation_is_calibrated_last():
    """DQC starts from the last calibrated stage, also when --compare names the main one first."""
    run = QuantizeConfig(method="dobi", compare=("dobi-official", "minmax", "minmax"))
    assert run.calibrations == ["minmax", "dobi-official"]
    assert QuantizeConfig(method="minmax", compare=("minmax", "percentile")).calibrations == ["percentile", "minmax"]


def test_a_run_dir_holds_one_run(tmp_path, data_root):
    run = QuantizeConfig(bits=2, dqc=None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(run.with_paths(data_root).to_dict()))
    with pytest.raises(FileExistsError, match="already holds a quantize run"):
        quantize_run(run, tmp_path / "run", data_root)
    with pytest.raises(ValueError, match=r"\(bits, seed differ\)"):
        quantize_run(dataclasses.replace(run, bits=4, seed=1), tmp_path / "run", data_root, resume=True)
    with pytest.raises(ValueError, match=r"\(datasets differ\)"):  # a resume may add benchmarks, not drop them
        quantize_run(dataclasses.replace(run, datasets=("Set14",)), tmp_path / "run", data_root, resume=True)
    with pytest.raises(FileNotFoundError, match="not a quantize run"):
        quantize_run(run, tmp_path / "none", data_root, resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run_config.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train_config.json").write_text("{}")  # a training run, or any other files
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        quantize_run(run, tmp_path / "other", data_root)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["train_config.json"]


def test_a_bad_benchmark_image_fails_before_calibration(tmp_path, data_root):
    root = tmp_path / "root"
    write_image(root / "benchmark" / "Bad" / "HR" / "dot.png", np.zeros((3, 3, 3), np.uint8))
    (root / "benchmark" / "Set5").symlink_to(data_root / "benchmark" / "Set5")
    run = QuantizeConfig(bits=2, scale=2, dqc=None, datasets=("Set5", "Bad"),
                         model=str(data_root / "weights" / "swinir_light_x2_t291.pth"),
                         calib=str(data_root / "calib"))
    with pytest.raises(ValueError, match="dot.png is 3x3, too small for x2"):
        quantize_run(run, tmp_path / "run", root)
    assert not (tmp_path / "run").exists()  # refused before the run dir was claimed, not after calibration


def _calib_npy(path: Path) -> str:
    """One 8x8 calibration image, the smallest a run takes."""
    np.save(path, np.full((1, 3, 8, 8), 0.5, np.float32))
    return str(path)


@pytest.mark.filterwarnings("ignore:.*dropped 1 of 1 images")
def test_bad_calibration_or_training_images_fail_before_the_run_dir_is_claimed(tmp_path, data_root):
    np.save(tmp_path / "flat.npy", np.zeros((3, 16, 16), np.float32))
    write_image(tmp_path / "small" / "a.png", np.zeros((64, 64, 3), np.uint8))  # LR 16x16 at x4, under the patch
    minmax = QuantizeConfig(bits=4, method="minmax", compare=(), calib=_calib_npy(tmp_path / "calib.npy"))
    dqc = DQCConfig(steps=2, batch=2, patch=32)
    runs = {"flat.npy: expected calibration images shaped (N, 3, H, W)":
                dataclasses.replace(minmax, dqc=None, calib=str(tmp_path / "flat.npy")),
            f"{tmp_path / 'small'}: no image has an LR side of at least 32 pixels":
                dataclasses.replace(minmax, dqc=dqc, train_dir=str(tmp_path / "small"))}
    for message, run in runs.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            quantize_run(run, tmp_path / "run", data_root)
        assert not (tmp_path / "run").exists()


def test_a_run_dir_under_a_file_is_refused_first(tmp_path, data_root):
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'afile'} is a file, not a folder")):
        quantize_run(QuantizeConfig(dqc=None), tmp_path / "afile" / "run", data_root)


class _Stop(Exception):
    """Ends a run where a test has seen what it needs."""


def _stop(*_, **__):
    raise _Stop


def _ctrl_c(*_, **__):
    raise KeyboardInterrupt


def test_a_resume_reads_the_benchmarks_it_started_with(tmp_path, data_root, monkeypatch):
    """Whatever data root it is given; a run config from before the data root was recorded takes the one given."""
    root = tmp_path / "root"  # a benchmark the default data root lacks
    write_image(root / "benchmark" / "Tiny" / "HR" / "a.png", np.zeros((32, 32, 3), np.uint8))
    run = QuantizeConfig(bits=4, dqc=None, method="minmax", compare=(), datasets=("Tiny",),
                         model=str(data_root / "weights" / "swinir_light_x4_t291.pth"),
                         calib=_calib_npy(tmp_path / "calib.npy")).with_paths(root)
    assert run.data_root == str(root.resolve())
    monkeypatch.setattr(pipeline, "init_bounds", _stop)  # called first once the run dir is claimed
    unrecorded = {k: v for k, v in run.to_dict().items() if k != "data_root"}
    for saved, given in ((run.to_dict(), data_root), (unrecorded, root)):
        run_dir = tmp_path / str(len(saved))
        _write(run_dir / "run_config.json", saved)
        with pytest.raises(_Stop):
            quantize_run(QuantizeConfig.load(run_dir), run_dir, given, resume=True)


def test_a_resume_takes_settings_newer_than_its_run(tmp_path, data_root, tiny_train_dir, monkeypatch):
    """A setting the saved config lacks, at any depth (DQC's weight_lr came after runs that a resume must still
    continue), takes its default; a nested setting that differs is refused."""
    run = QuantizeConfig(bits=4, method="minmax", compare=(), dqc=DQCConfig(steps=2, batch=2, patch=16),
                         calib=_calib_npy(tmp_path / "calib.npy"), train_dir=str(tiny_train_dir)).with_paths(data_root)
    saved = run.to_dict()
    del saved["dqc"]["weight_lr"]
    run_dir = tmp_path / "run"
    _write(run_dir / "run_config.json", saved)
    monkeypatch.setattr(pipeline, "init_bounds", _stop)  # called first once the run dir is claimed
    with pytest.raises(_Stop):
        quantize_run(QuantizeConfig.load(run_dir), run_dir, data_root, resume=True)
    assert json.loads((run_dir / "run_config.json").read_text())["dqc"]["weight_lr"] is None  # recorded now
    with pytest.raises(ValueError, match=r"\(dqc differ\)"):
        quantize_run(dataclasses.replace(run, dqc=dataclasses.replace(run.dqc, steps=3)), run_dir, data_root,
                     resume=True)


def test_a_damaged_validation_log_is_named(tmp_path, t291_model, tiny_dqc, data_root):
    start, run, pool = tiny_dqc
    (tmp_path / "validation.json").write_text("[\n")  # as a kill during its write once left it
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'validation.json'}: not valid JSON")):
        run_dqc(t291_model(4), start, run, pool, tmp_path)


def test_quantize_cli_end_to_end(tmp_path, tiny_train_dir):
    run_dir = tmp_path / "run"
    exported = tmp_path / "bounds.json"
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in list_images(require(DATA_ROOT / "calib"))[:2]:
        (calib / path.name).symlink_to(path)
    root = tmp_path / "root"  # the data root's weights and Set5, and a benchmark to add to the run later
    (root / "benchmark").mkdir(parents=True)
    (root / "weights").symlink_to(DATA_ROOT / "weights")
    (root / "benchmark" / "Set5").symlink_to(DATA_ROOT / "benchmark" / "Set5")
    write_image(root / "benchmark" / "Tiny" / "HR" / "a.png",
                np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    args = ["scripts/quantize.py", "--bits", "4", "--scale", "4", "--preset", "quick", "--steps", "2", "--batch", "2",
            "--b2", "0.999", "--cosine", "--remat", "--calib", str(calib), "--calib-patches", "2", "--data-root",
            str(root), "--train-dir", str(tiny_train_dir), "--run-dir", str(run_dir), "--export-bounds", str(exported)]
    result = run_script(*args, env={"JAX_LOG_COMPILES": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # The forwards (FP and fake-quant at Set5's five LR shapes) and the step, compiled ahead beside the
    # calibration, are found compiled when used: each compiles once.
    compiled = Counter(re.findall(r"Compiling jit\((_forward|dqc_step)\) with global shapes", result.stderr))
    assert compiled == {"_forward": 2 * 5, "dqc_step": 1}
    results = json.loads((run_dir / "results.json").read_text())
    assert all(Path(results["config"][k]).is_absolute() for k in ("model", "calib", "train_dir"))  # it stands alone
    assert list(results["results"]) == ["FP", "MinMax", "DOBI-official", "DQC"]
    assert results["dqc"]["best_step"] == 2 and results["final_bounds"] == "DQC"
    dqc = results["config"]["dqc"]
    assert (dqc["steps"], dqc["batch"], dqc["patch"], dqc["b2"], dqc["cosine"]) == (2, 2, 32, 0.999, True)
    assert (dqc["remat"], dqc["scan"]) == (True, True)  # given, and recorded as run: recomputed blocks scan on a CPU
    assert results["results"]["FP"]["Set5"]["psnr"] == pytest.approx(28.89, abs=0.01)
    assert (run_dir / "comparison.png").stat().st_size > 10_000
    summary = (run_dir / "results.md").read_text()
    assert f"| DQC | {results['results']['DQC']['Set5']['psnr']:.3f} / " in summary
    assert "the bounds of step 2 are kept" in summary and "| 2 | " in summary and " (kept) |" in summary

    named = json.loads(exported.read_text())["quantizers"]
    assert len(named) == 384 and "layers.3.residual_group.blocks.5.mlp.fc2.act_quantizer" in named
    saved = load_model(run_dir)
    assert len(flat_bounds(saved.bounds)) == 384
    reloaded = {official_name(p): {"lu": b.lu.tolist(), "bits": b.bits} for p, b in flat_bounds(saved.bounds).items()}
    assert reloaded == named

    lowbit = run_dir / "model_w4a4.safetensors"  # the same model, packed
    assert results["lowbit"]["bytes"] == lowbit.stat().st_size and f"{lowbit.stat().st_size:,} bytes" in summary
    from_file = {official_name(p): {"lu": b.lu.tolist(), "bits": b.bits}
                 for p, b in flat_bounds(load_model(lowbit).bounds).items()}
    assert from_file == reloaded

    evaluated = run_script("scripts/evaluate.py", "--model", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "WARNING" not in evaluated.stderr, evaluated.stderr  # orbax warned once per checkpoint item
    assert f"{results['results']['DQC']['Set5']['psnr']:.3f}" in evaluated.stdout

    # The run directory belongs to this run: a new run (even with the same flags) is refused and changes
    # nothing; --resume takes no settings but more datasets; a resume reads the calibrated bounds back instead
    # of calibrating: the calibration images are gone, so calibrating would fail.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert_one_line_error(run_script(*args), "already holds a quantize run; resume it or pick another run dir")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    flagged = run_script("scripts/quantize.py", "--resume", str(run_dir), "--bits", "2")
    assert flagged.returncode == 2 and "with --resume, --bits would be ignored" in flagged.stderr
    for path in calib.iterdir():
        path.unlink()
    calib.rmdir()
    resumed = run_script("scripts/quantize.py", "--resume", str(run_dir), "--datasets", "Tiny",
                         env={"JAX_LOG_COMPILES": "1"})
    assert resumed.returncode == 0, resumed.stderr
    # The finished run evaluates each stage on Tiny alone (the FP and fake-quant forwards at its one shape) and
    # keeps the rest: its Set5 scores, its picture of Set5, its time.
    compiled = Counter(re.findall(r"Compiling jit\((_forward|dqc_step)\) with global shapes", resumed.stderr))
    assert compiled == {"_forward": 2}
    extended = json.loads((run_dir / "results.json").read_text())
    assert {stage: scores.keys() - {"Tiny"} for stage, scores in extended["results"].items()} == {
        stage: {"Set5"} for stage in results["results"]}
    assert all(extended["results"][stage]["Set5"] == scores["Set5"] for stage, scores in results["results"].items())
    tiny = load_benchmarks(root, ["Tiny"], 4)
    for stage, model in (("FP", saved._replace(bounds=None)), ("DQC", saved)):  # each stage's own model scored
        assert extended["results"][stage]["Tiny"]["psnr"] == pytest.approx(
            evaluate(model, tiny, show_progress=False)["Tiny"]["psnr"], abs=1e-6), stage
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert extended["config"]["datasets"] == recorded["datasets"] == ["Set5", "Tiny"]
    assert extended["seconds"].keys() == results["seconds"].keys() | {"evaluation of Tiny"}
    assert (run_dir / "comparison.png").read_bytes() == before[run_dir / "comparison.png"]
    assert "| Set5 | Tiny |" in (run_dir / "results.md").read_text()
    assert len(json.loads((run_dir / "calibration" / "DOBI-official.json").read_text())["quantizers"]) == 384


def test_imported_bounds_are_checked(tmp_path, t291_model):
    model = t291_model(2)
    names = sorted(map(official_name, list_sites(model.config)))
    full = {name: [-1.0, 1.0] for name in names}
    cases = {"one site only": ({names[0]: [0, 1]}, "no bounds for 383 of the model's quantizers"),
             "1e300": (full | {names[0]: [0, 1e300]}, "non-finite bounds [0.0, inf]"),  # finite, but not in float32
             "a string": (full | {names[0]: [0, "x"]}, "bounds must be two numbers"),
             "no dot": (full | {"nodot": [0, 1]}, "not an official quantizer name: 'nodot'"),
             "a list": ([[0, 1]], "expected a JSON object, got list")}
    for case, (named, message) in cases.items():
        (tmp_path / "bounds.json").write_text(json.dumps(named))
        with pytest.raises(ValueError, match=re.escape(message)):
            read_bounds_json(tmp_path / "bounds.json", model.config, 4)
    (tmp_path / "bounds.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="bounds.json: not valid JSON"):
        read_bounds_json(tmp_path / "bounds.json", model.config, 4)
    assert len(flat_bounds(read_bounds_json(_write(tmp_path / "ok.json", full), model.config, 4))) == 384
    with pytest.raises(ValueError, match=re.escape("ok.json: plain {quantizer name: [l, u]} bounds carry no bit")):
        read_bounds_json(tmp_path / "ok.json", model.config)


def _write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def quantize_cli(monkeypatch, *args: str):
    """`scripts/quantize.py args` in this process (so that the library can be patched): what main returns."""
    monkeypatch.setattr(sys, "argv", ["scripts/quantize.py", *args])
    return runpy.run_path(str(REPO / "scripts" / "quantize.py"))["main"]()


def test_ctrl_c_suggests_a_resume_only_once_the_run_dir_is_claimed(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = ("--bits", "4", "--no-dqc", "--method", "minmax", "--compare", "", "--calib",
            _calib_npy(tmp_path / "calib.npy"), "--run-dir", str(run_dir))
    resume = f"interrupted; continue with: python scripts/quantize.py --resume {run_dir}"
    for step, message in (("load_model", "interrupted"),  # nothing to resume, and the same command starts afresh
                          ("init_bounds", resume)):
        with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
            patch.setattr(pipeline, step, _ctrl_c)
            quantize_cli(patch, *args)
        assert stopped.value.code == message


@pytest.mark.parametrize("args, refused", [
    ("--method minmax --dobi-strategy paper", "with --method minmax, --dobi-strategy would be ignored"),
    ("--percentile 99", "with --method dobi and no percentile in --compare, --percentile would be ignored"),
    ("--calib {calib}.npy --calib-patches 2", "with a --calib file (only folders are sampled), --calib-patches would"),
    ("--feature-weight 2", "with --loss official, --feature-weight would be ignored"),
    ("--dobi-strategy paper --percentile 99 --compare minmax,percentile", None),
    ("--method percentile --percentile 99 --calib {calib} --calib-patches 2 --loss paper --feature-weight 2",
     None),
])
def test_quantize_cli_refuses_flags_that_other_values_make_meaningless(tmp_path, monkeypatch, capsys, args, refused):
    (tmp_path / "calib").mkdir()
    _calib_npy(tmp_path / "calib.npy")
    monkeypatch.setattr(sys, "argv", ["quantize.py", *args.format(calib=tmp_path / "calib").split()])
    parse_args = runpy.run_path(str(REPO / "scripts" / "quantize.py"))["parse_args"]
    if refused is None:
        parse_args()
        return
    with pytest.raises(SystemExit):
        parse_args()
    assert refused in capsys.readouterr().err


def test_quantize_cli_bad_flags_are_one_line(tmp_path):
    result = run_script("scripts/quantize.py", "--no-dqc", "--calib", str(tmp_path / "nowhere"),
                        "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "no calibration data at")
    result = run_script("scripts/quantize.py", "--no-dqc", "--datasets", "Manga109", "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "Manga109")
    assert_one_line_error(run_script("scripts/quantize.py", "--steps", "0"), "DQC steps must be at least 1, got 0")
    assert_one_line_error(run_script("scripts/quantize.py", "--method", "percentile", "--percentile", "nan"),
                          "percentile must be in (50, 100]")
    # The percentile below 50 that once reported 384 of 384 sites crossed as a result:
    assert_one_line_error(run_script("scripts/quantize.py", "--bits", "4", "--scale", "4", "--no-dqc", "--method",
                                     "percentile", "--percentile", "30", "--compare", "", "--calib-patches", "2"),
                          "percentile must be in (50, 100], got 30.0")
    ignored = run_script("scripts/quantize.py", "--no-dqc", "--steps", "5")
    assert ignored.returncode == 2 and "with --no-dqc, --steps would be ignored" in ignored.stderr
    ignored = run_script("scripts/quantize.py", "--no-dqc", "--no-scan")
    assert ignored.returncode == 2 and "with --no-dqc, --no-scan would be ignored" in ignored.stderr
    # Inputs are checked before the run directory is claimed, so a corrected rerun is not refused.
    bad = _write(tmp_path / "subset.json", {"layers.0.residual_group.blocks.0.attn.mymodule_a": [0, 1]})
    result = run_script("scripts/quantize.py", "--no-dqc", "--import-bounds", str(bad), "--run-dir", str(tmp_path / "q"))
    assert_one_line_error(result, "no bounds for 383 of the model's quantizers")
    assert not (tmp_path / "q").exists()


def test_bounds_files_keep_each_sites_bits_and_their_model(tmp_path):
    """Mixed W4/A8 bounds come back at W4/A8, and bounds of the x4 model are refused by the x2 one, naming both."""
    x4, x2 = swinir_light(4), swinir_light(2)
    rules = QuantRules(rules=((r".*/weight", 4), (r".*", 8)))
    mixed = jax.tree.map(lambda lu: lu.at[:].set([-0.5, 0.75]), init_bounds(x4, rules))
    write_bounds_json(tmp_path / "mixed.json", mixed, x4)
    back = flat_bounds(read_bounds_json(tmp_path / "mixed.json", x4))
    assert {p: (b.bits, b.lu.tolist()) for p, b in back.items()} == {
        p: (b.bits, [-0.5, 0.75]) for p, b in flat_bounds(mixed).items()}
    with pytest.raises(ValueError, match=re.escape("mixed.json: bounds of SwinIR x4 (embed_dim 60, depths [6, 6, 6, 6],"
                                                   " heads [6, 6, 6, 6], window 8, pixelshuffledirect), but the "
                                                   "model is SwinIR x2")):
        read_bounds_json(tmp_path / "mixed.json", x2)
    with pytest.raises(ValueError, match=r"mixed.json: 240 quantizers are not at 4 bits, e.g. \S+ at 8"):
        read_bounds_json(tmp_path / "mixed.json", x4, bits=4)  # what --import-bounds with --bits 4 asks


def test_calibrated_bounds_are_checked_before_they_are_used(tmp_path, monkeypatch):
    """A calibration that crosses a site's bounds stops the run with one line naming the site."""
    def crossed_calibration(config, calibration, params, bounds, images):
        return jax.tree.map(lambda lu: lu.at[:].set([1.0, -1.0]), bounds)

    monkeypatch.setattr(pipeline, "calibrate", crossed_calibration)
    run = QuantizeConfig(bits=4, scale=2, compare=(), calib_patches=1, calib_size=16)
    with pytest.raises(ValueError, match=r"DOBI-official gave unusable bounds: layers_0/\S+: upper bound -1.0 must "
                                         r"exceed lower bound 1.0"):
        quantize_run(run, tmp_path / "run", DATA_ROOT)
    with pytest.raises(ValueError, match=re.escape("DOBI needs at least one candidate, got num_candidates=0")):
        pipeline.Calibration(num_candidates=0)


def test_a_run_sets_and_records_its_matmul_precision(tmp_path, monkeypatch):
    """The whole run, and the compilations it starts on other threads, run at the recorded precision."""
    seen = []
    monkeypatch.setattr(pipeline, "_quantize_run",
                        lambda *_: seen.append(jax.config.jax_default_matmul_precision) or {})
    assert QuantizeConfig().matmul_precision == "highest"
    with jax.default_matmul_precision("bfloat16"):
        quantize_run(QuantizeConfig(matmul_precision="high"), tmp_path, DATA_ROOT)
        with ThreadPoolExecutor(1) as thread:
            assert thread.submit(with_matmul_precision_here(lambda: jax.config.jax_default_matmul_precision)
                                 ).result() == "bfloat16"
    assert seen == ["high"]
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        QuantizeConfig(matmul_precision="tf32")


def test_distill_is_a_research_api(t291_model, tiny_dqc):
    """`distill` on a user's model, bounds and pool: the bounds given stay valid and unchanged, the result holds
    the best validated bounds, and resuming a stopped run ends where an uninterrupted one does."""
    model = t291_model(4)
    bounds, run, pool = tiny_dqc  # the same step and validation shape as the run-directory tests: compiled once
    set5 = pipeline.load_benchmark(Path(run.data_root), "Set5", 4)
    straight = distill(model, bounds, run.dqc, pool, validation=set5, validate_every=1)
    assert [h["step"] for h in straight.history] == [1, 2, 3, 4] and int(straight.state.step) == 4
    assert straight.kept["psnr"] == max(h["psnr"] for h in straight.history)
    stopped = distill(model, bounds, run.dqc, pool, validation=set5, validate_every=1, stop_at=2)
    assert int(stopped.state.step) == 2 and stopped.history == straight.history[:2]
    resumed = distill(model, bounds, run.dqc, pool, validation=set5, validate_every=1, resume=stopped)
    assert resumed.history == straight.history
    np.testing.assert_array_equal(_ravel(resumed.best), _ravel(straight.best))
    assert all(not leaf.is_deleted() for leaf in jax.tree.leaves((bounds, stopped.state, stopped.best)))
    assert set(np.unique(_ravel(bounds))) == {-1.5, 1.5}


def _ravel(tree) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_dqc_keeps_crossed_bounds_last(tmp_path, t291_model, tiny_dqc, data_root, monkeypatch):
    """A validation step whose bounds crossed somewhere (Adam moved an upper bound below its lower one: a constant
    quantizer there) is logged and kept only where every step crossed, with a warning naming the site."""
    model = t291_model(4)
    start, run, pool = tiny_dqc
    site = "layers_0/residual_group/blocks_0/attn/k"
    monkeypatch.setattr(pipeline, "_validation_psnr", lambda *_, scripted=iter((20.0, 30.0)): next(scripted))
    monkeypatch.setattr(pipeline, "_crossed_site", lambda bounds, calls=iter((None, site)): next(calls))
    _, log = run_dqc(model, start, run, pool, tmp_path / "one")
    assert log["best_step"] == 2 and log["validation"][1] == {**log["validation"][1], "crossed": site}
    monkeypatch.setattr(pipeline, "_validation_psnr", lambda *_, scripted=iter((20.0, 30.0)): next(scripted))
    monkeypatch.setattr(pipeline, "_crossed_site", lambda bounds: site)
    with pytest.warns(UserWarning, match=re.escape(f"DQC crossed the bounds of {site} (upper below lower) at every "
                                                   "validation; step 4 is kept")):
        _, log = run_dqc(model, start, run, pool, tmp_path / "all")
    assert log["best_step"] == 4
