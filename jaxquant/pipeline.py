"""The 2DQuant pipeline end to end: FP model -> calibration -> bounds (MinMax / Percentile / DOBI) -> DQC ->
evaluation, written to a run directory.

    run = QuantizeConfig(bits=2, scale=4, dqc=PRESETS["quick"])
    results = quantize_run(run, Path("runs/x4_w2"), default_data_root())   # resume=True continues it

The run directory holds `run_config.json` (the settings; a run directory belongs to one run),
`calibration/<label>.json` (each initialisation's bounds by official quantizer name, as `--import-bounds`
reads them), `checkpoints/` and `validation.json` (DQC's state and Set5 log, to resume from), `model/`
(params, bounds and config: an orbax checkpoint that `load_model` and `scripts/evaluate.py --model` accept),
`model_w<b>a<b>.safetensors` (the same model as a low-bit file: packed weight codes, `jaxquant.lowbit`),
`results.json` and `results.md` (FP / MinMax / <init> / DQC on the chosen benchmarks), and `comparison.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.cli import MATMUL_PRECISIONS
from jaxquant.data import (BenchmarkImage, benchmark_dir, check_output_path, list_images, load_benchmark,
                           load_benchmarks, read_image)
from jaxquant.dobi import Calibration, Method, Strategy, calibrate
from jaxquant.dqc import DQCConfig, DQCState, donating_dqc_step, init_state
from jaxquant.evaluation import (DEFAULT_OVERLAP, Tiling, compile_concurrently, evaluate, forward_compilations,
                               results_table, with_matmul_precision_here)
from jaxquant.lowbit import fp_bytes, save_lowbit
from jaxquant.patches import PatchPool, lr_pool_from_folder, make_pool, sample_patches
from jaxquant.quant import (BIT_WIDTHS, QuantRules, bounds_from_official, bounds_to_official, flat_bounds, init_bounds,
                            is_weight_site, list_sites, official_name, validate_bounds)
from jaxquant import models, parallel
from jaxquant.models import ModelConfig
from jaxquant.runs import (RunCheckpointer, check_run_dir, claim_run_dir, progress, read_json, read_json_object,
                           read_run_json, stop_on_interrupt, write_atomically, write_results)
from jaxquant.visualize import comparison_grid
from weights_convert.torch_pickle import load_pth

# `paper`: the official code's DQC settings; `quick`: the whole pipeline in minutes on a 2-core CPU.
PRESETS = {
    "paper": DQCConfig(),
    "quick": DQCConfig(steps=160, batch=4, patch=32),
}
VALIDATE_EVERY = {"paper": 100, "quick": 40}
# Where a model's preset differs from SwinIR-light's. NGswin's DQC step costs several of SwinIR-light's on a CPU
# (20 blocks of two attentions each), so its `quick` takes fewer steps to stay within 15 minutes; its blocks run
# scanned, a third less CPU time a step than unrolled for the same compile time (benchmarks/README.md). Its weight
# bounds train at 0.003: at 0.01 the N-gram attention's small weight ranges crossed (docs/ngswin.md).
MODEL_PRESETS = {"ngswin": {"quick": DQCConfig(steps=120, batch=4, patch=32, scan=True, weight_lr=3e-3)}}
CONFIG_FILE = "run_config.json"
RUN_KIND = "quantize run"
CALIB_PATCHES = {"paper": (32, 64), "quick": (8, 64)}  # (count, size) sampled from a calibration folder


class Init(NamedTuple):
    method: Method
    strategy: Strategy
    label: str  # row name in result tables


INITS = {"minmax": Init("minmax", "official", "MinMax"), "percentile": Init("percentile", "official", "Percentile"),
         "dobi-official": Init("dobi", "official", "DOBI-official"), "dobi-paper": Init("dobi", "paper", "DOBI-paper"),
         "dobi-official-one-sided": Init("dobi", "official-one-sided", "DOBI-official-one-sided")}


def preset(name: str, architecture: str) -> DQCConfig:
    """The DQC settings of preset `name` for a model of `architecture` (`models.Architecture.name`)."""
    return MODEL_PRESETS.get(architecture, {}).get(name, PRESETS[name])


def architecture_of(model: str | None) -> str:
    """The architecture of a model source (a .pth, checkpoint or run directory; None: the default SwinIR-light)."""
    return "swinir" if model is None else models.architecture(load_model(model).config).name


def default_preset() -> str:
    """`paper` on an accelerator, `quick` on a CPU."""
    return "quick" if jax.default_backend() == "cpu" else "paper"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """One quantization run. Paths default to the data root's weights, calibration and training images."""

    bits: int = 2
    scale: int = 4
    data_root: str | None = None  # holds benchmark/<name>: the datasets evaluated on, and Set5 for DQC's validation
    model: str | None = None
    method: Method = "dobi"
    strategy: Strategy = "official"
    percentile: float = 99.99
    calib: str | None = None
    calib_patches: int = 32
    calib_size: int = 64
    dqc: DQCConfig | None = None
    train_dir: str | None = None
    validate_every: int = 100
    checkpoint_every: int = 100
    datasets: tuple[str, ...] = ("Set5",)
    tile: int | None = None  # benchmark inference in tiles (see `Tiling`): None chooses by memory, 0 never tiles
    tile_overlap: int = DEFAULT_OVERLAP
    compare: tuple[str, ...] = ("minmax",)  # other initialisations to evaluate beside `method` (see INITS)
    import_bounds: str | None = None
    export_bounds: str | None = None
    seed: int = 0
    matmul_precision: str = "highest"  # jax_default_matmul_precision for the whole run (cli.MATMUL_PRECISIONS)
    devices: int | None = None  # devices per process batches are split over (`parallel.data_mesh`); None: all

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        d = dict(d, datasets=tuple(d["datasets"]), compare=tuple(d["compare"]))
        return cls(**d | {"dqc": DQCConfig(**d["dqc"]) if d.get("dqc") else None})

    def __post_init__(self):
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"bits must be {BIT_WIDTHS[0]}..{BIT_WIDTHS[-1]}, got {self.bits}")
        Calibration(percentile=self.percentile)  # checks it
        if self.calib_patches < 1 or self.calib_size < 8 or self.validate_every < 1 or self.checkpoint_every < 1:
            raise ValueError(f"need calib_patches >= 1, calib_size >= 8 (the window) and validation and checkpoint "
                             f"intervals >= 1, got {self.calib_patches}, {self.calib_size}, {self.validate_every}, "
                             f"{self.checkpoint_every}")
        if not self.datasets:
            raise ValueError("no benchmark to evaluate on (datasets is empty)")
        if self.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {self.scale}")
        self.tiling  # checks the tile and its overlap
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        unknown = set(self.compare) - set(INITS)
        if unknown:
            raise ValueError(f"unknown initialisations {sorted(unknown)}; choose from {', '.join(INITS)}")

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.tile, self.tile_overlap)

    @property
    def init_name(self) -> str:
        return {"dobi": f"dobi-{self.strategy}"}.get(self.method, self.method)

    @property
    def calibrations(self) -> list[str]:
        """The initialisations to calibrate: the `compare` baselines, then the main one (which DQC starts
        from, and which a run without DQC keeps), each once."""
        return [*(c for c in dict.fromkeys(self.compare) if c != self.init_name), self.init_name]

    def with_paths(self, data_root: Path) -> "QuantizeConfig":
        """This config with every path it reads or writes absolute and the defaults of its data root (if unset,
        `data_root`) filled in: a run directory then stands alone, and a resume reads the same model and images
        whatever data root it is given. (A config saved before `data_root` was recorded takes the one given.)"""
        absolute = lambda path: str(Path(path).resolve()) if path else None
        root = Path(self.data_root or data_root)
        return dataclasses.replace(
            self,
            data_root=absolute(root),
            model=absolute(self.model or root / "weights" / f"swinir_light_x{self.scale}_t291.pth"),
            calib=None if self.import_bounds else absolute(self.calib or root / "calib"),
            train_dir=absolute(self.train_dir or root / "train" / "t291") if self.dqc else None,
            import_bounds=absolute(self.import_bounds),
            export_bounds=absolute(self.export_bounds),
        )

    def evaluated_on(self, datasets: Sequence[str]) -> "QuantizeConfig":
        """This config with `datasets` added to its benchmarks: resumed with it, a finished run evaluates only
        the benchmarks it lacks (`quantize_run`)."""
        return dataclasses.replace(self, datasets=tuple(dict.fromkeys((*self.datasets, *datasets))))

    @classmethod
    def load(cls, run_dir: str | Path) -> "QuantizeConfig":
        """The config a run directory was started with."""
        saved = read_run_json(Path(run_dir), CONFIG_FILE, RUN_KIND)
        try:
            return cls.from_dict(saved)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{Path(run_dir) / CONFIG_FILE}: not a run config this version reads ({e!r})") from None


# ----------------------------------------------------------------------------------------------------------
# Inputs


def load_calibration(source: Path, count: int, size: int, seed: int) -> jax.Array:
    """Calibration LR patches (N, H, W, 3) in [0, 1] from an image folder (`count` random `size` crops),
    an `.npy` / `.npz` array (N, 3, H, W) in [0, 1], or an official `cali_data_x*.pth` holding {"lq": tensor}."""
    if source.is_dir():
        pool = make_pool([read_image(p) for p in list_images(source)], min_size=size, source=source)
        return sample_patches(pool, jax.random.PRNGKey(seed), count, size)[0]
    if not source.is_file():
        raise FileNotFoundError(f"no calibration data at {source}")
    if source.suffix == ".pth":
        obj = load_pth(source)
        array = obj.get("lq") if isinstance(obj, dict) else None
    elif source.suffix in (".npy", ".npz"):
        array = _load_numpy(source)
    else:
        raise ValueError(f"calibration data must be a folder, .npy, .npz or .pth, got {source}")
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{source}: expected one numeric array (or an 'lq' entry) of calibration images")
    if not _is_real(array.dtype):
        raise ValueError(f"{source}: calibration images must be real numbers, got {array.dtype}")
    n, c, h, w = array.shape if array.ndim == 4 else (0, 0, 0, 0)
    if n < 1 or c != 3 or min(h, w) < 8:
        raise ValueError(f"{source}: expected calibration images shaped (N, 3, H, W) in [0, 1] with N >= 1 and "
                         f"H, W >= 8 (the window), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: the calibration images hold NaN or infinite values")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{source}: calibration images must be in [0, 1], found values from {array.min():g} to "
                         f"{array.max():g}")
    return jnp.asarray(array.transpose(0, 2, 3, 1), jnp.float32)


def _is_real(dtype: np.dtype) -> bool:
    """Integers or floats: not booleans, complex numbers (whose imaginary part would be dropped) or objects."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def _load_numpy(source: Path) -> np.ndarray | None:
    """The array of an `.npy`, or the `lq` (else only) array of an `.npz`; None where there is no such array."""
    try:
        if source.suffix == ".npy":
            with source.open("rb") as stream:
                return _read_npy(stream, source.stat().st_size)
        with zipfile.ZipFile(source) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            member = members.get("lq") or (next(iter(members.values())) if len(members) == 1 else None)
            if member is None:
                return None
            with archive.open(member) as stream:
                return _read_npy(stream, archive.getinfo(member).file_size)
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # empty, truncated or not numpy
        raise ValueError(f"{source}: not a valid {source.suffix} array of real numbers ({e})") from None


def _read_npy(stream, size: int) -> np.ndarray:
    """The array a `.npy` stream of `size` bytes holds, its header checked first: numpy allocates the array
    it describes before reading (a 4 KB file claiming (100000, 3, 300, 300) asked for 101 GiB), and would
    point to unpickling for data that is not numbers."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError:
        raise ValueError("no numpy header") from None
    if not _is_real(dtype):
        raise ValueError(f"{dtype} values")
    claimed, held = math.prod(shape) * dtype.itemsize, size - stream.tell()
    if claimed > held:
        raise ValueError(f"its header describes a {shape} {dtype} array of {claimed:,} bytes, but the file holds "
                         f"{held:,}")
    stream.seek(0)
    return np.lib.format.read_array(stream, allow_pickle=False)


BOUNDS_FORMAT = "jaxquant bounds"


def read_bounds_json(path: Path, config: ModelConfig, bits: int | None = None) -> dict:
    """Bounds for every quantizer of the model `config` describes, from a file of `write_bounds_json` (its bits
    per site; a file made for another model is refused, naming both) or a plain `{official quantizer name:
    [l, u]}` (the official code's names, all at `bits`). Given `bits`, every site of the file must have them."""
    saved = read_json_object(path)
    try:
        if saved.get("format") == BOUNDS_FORMAT:
            named, bits_by_name = _read_bounds_file(saved, config, bits)
        elif bits is None:
            raise ValueError("plain {quantizer name: [l, u]} bounds carry no bit widths: give them")
        else:
            named, bits_by_name = saved, bits
        missing = sorted(set(map(official_name, list_sites(config))) - set(named))
        if missing:
            raise ValueError(f"no bounds for {len(missing)} of the model's quantizers, e.g. {missing[0]}")
        return bounds_from_official(named, config, bits_by_name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _read_bounds_file(saved: dict, config: ModelConfig, bits: int | None) -> tuple[dict, dict]:
    """`(name -> [l, u], name -> bits)` of a `write_bounds_json` file, checked against the model and `bits`."""
    try:
        made_for = models.config_from_json(saved["config"])
        quantizers = dict(saved["quantizers"])
        named = {name: q["lu"] for name, q in quantizers.items()}
        bits_by_name = {name: q["bits"] for name, q in quantizers.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"damaged bounds file ({e!r})") from None
    if made_for != config:
        raise ValueError(f"bounds of {models.describe(made_for)}, but the model is {models.describe(config)}")
    other = {name: b for name, b in bits_by_name.items() if b != bits}
    if bits is not None and other:
        name, width = next(iter(other.items()))
        raise ValueError(f"{len(other)} quantizers are not at {bits} bits, e.g. {name} at {width!r}")
    return named, bits_by_name


def write_bounds_json(path: Path, bounds: dict, config: ModelConfig) -> None:
    """The bounds of the model `config` describes, by official quantizer name with each one's bits, and the
    config they belong to (float32 values survive the JSON round trip exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = {official_name(p): b.bits for p, b in flat_bounds(bounds).items()}
    quantizers = {name: {"lu": lu, "bits": bits[name]} for name, lu in bounds_to_official(bounds).items()}
    saved = {"format": BOUNDS_FORMAT, "model": models.describe(config), "config": models.config_to_json(config),
             "quantizers": quantizers}
    write_atomically(path, json.dumps(saved, indent=1))


# ----------------------------------------------------------------------------------------------------------
# DQC with validation, best-bounds selection and exact resume


def _validation_psnr(model: Model, bounds, images: Sequence[BenchmarkImage], mesh: Mesh | None) -> float:
    scores = evaluate(model._replace(bounds=bounds), {"validation": images}, show_progress=False,
                      devices=parallel.local_devices(mesh))
    return scores["validation"]["psnr"]


class Distillation(NamedTuple):
    """Where a DQC run stands: the optimizer state, the best bounds so far (without validation: the last step's,
    once `distill` returns), the key its batches are drawn from (step i uses `fold_in(key, i)`) and the
    validation log."""

    state: DQCState
    best: dict
    key: jax.Array
    history: list[dict]

    @property
    def kept(self) -> dict:
        """The validation entry whose bounds are `best`; {} without one. See `_preference`."""
        return _kept(self.history)


def _kept(history: list[dict]) -> dict:
    return max(reversed(history), key=_preference, default={})


def _preference(entry: dict) -> tuple[bool, float]:
    """How validation steps rank for keeping: bounds with no crossed pair first, then the highest PSNR (the later
    step on a tie, as BasicSR). A crossed pair makes a constant quantizer (in the official code too), not a b-bit
    one: such a step is kept only where every step has one."""
    return "crossed" not in entry, entry["psnr"]


def _crossed_site(bounds: dict) -> str | None:
    """The first site whose bounds crossed (upper not above lower, or NaN), or None."""
    return next((path for path, b in flat_bounds(bounds).items() if not b.lu[0] < b.lu[1]), None)


def distill(
    model: Model, bounds: dict, dqc: DQCConfig, pool: PatchPool, *, seed: int = 0,
    validation: Sequence[BenchmarkImage] | None = None, validate_every: int = 100,
    resume: Distillation | None = None, stop_at: int | None = None,
    after_step: Callable[[int, Distillation], bool] | None = None, desc: str = "DQC", mesh: Mesh | None = None,
) -> Distillation:
    """DQC from `bounds`: `dqc.steps` Adam steps on batches of `dqc.batch` LR patches of `dqc.patch` pixels drawn
    from `pool` (`patches.lr_pool_from_folder`), with a progress bar. `bounds` and `model` are left as they are.

    With `validation` images (`data.load_benchmark`), the quantized model's Y-PSNR on them is measured every
    `validate_every` steps and at the end, and `best` keeps the bounds of the best one (the starting bounds are
    not candidates; see `_preference`); without, `best` is the last step's bounds once it returns. `resume`
    continues a returned (or checkpointed) run, which stays valid; `stop_at` ends it early at that step.
    `after_step(step, run)` runs after each step (the pipeline checkpoints there) and stops the loop by returning
    True. With a `mesh` (`parallel.data_mesh`), each batch is split over its devices and this process samples
    only its rows of it."""
    parallel.check_batch(dqc.batch, mesh)
    run = resume or Distillation(init_state(bounds, dqc), bounds, jax.random.PRNGKey(seed), [])
    start, stop = int(run.state.step), min(dqc.steps, stop_at or dqc.steps)
    state, best, history = _copy(run.state), run.best, list(run.history)  # the loop donates its own state
    model, state = model._replace(params=parallel.replicate(model.params, mesh)), parallel.replicate(state, mesh)
    with progress(dqc.steps, start, desc=desc) as bar:
        for step in range(start, stop):
            rows, _ = sample_patches(pool, jax.random.fold_in(run.key, step), dqc.batch, dqc.patch,
                                     rows=parallel.process_rows(dqc.batch))
            images = parallel.shard_batch(rows, dqc.batch, mesh)
            state, terms = donating_dqc_step(model.config, dqc, state, model.params, images)
            done = step + 1
            bar.update(1)
            if validation is not None and (done % validate_every == 0 or done == dqc.steps):
                psnr = _validation_psnr(model, state.bounds, validation, mesh)
                entry = {"step": done, "loss": float(terms["loss"]), "psnr": psnr}
                crossed = _crossed_site(state.bounds)
                if crossed is not None:  # Adam moved an upper bound below its lower one
                    entry["crossed"] = crossed
                if not history or _preference(entry) >= _preference(_kept(history)):
                    best = _copy(state.bounds)  # the next step donates the state's arrays
                history.append(entry)
                bar.log(loss=entry["loss"], psnr=psnr, kept=_kept(history)["psnr"])
            elif done % 10 == 0:
                bar.log(loss=float(terms["loss"]))
            run = Distillation(state, best, run.key, history)
            if after_step is not None and after_step(done, run):
                break
    if validation is None:
        run = run._replace(best=_copy(state.bounds))
    return run


def dqc_pool(run: QuantizeConfig) -> PatchPool:
    """DQC's training images (`run` with its paths): LR alone, since DQC distils from the FP model."""
    return lr_pool_from_folder(run.train_dir, run.scale, min_size=run.dqc.patch, keep_hr=False)


def run_dqc(
    model: Model, bounds: dict, run: QuantizeConfig, pool: PatchPool, run_dir: Path, stop_after: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[dict, dict]:
    """`distill` as a run directory holds it: validated on Set5 (of `run.data_root`: `run` with its paths), with
    checkpoints every `checkpoint_every` steps that resume bit for bit. Returns the best bounds and a log.

    `stop_after` ends the run early at that step, checkpointed, as a kill would (`log["completed"]` is False).
    A first Ctrl-C stops it after the current step, checkpointed, with a `KeyboardInterrupt`.
    """
    dqc = run.dqc
    stop = min(dqc.steps, stop_after or dqc.steps)
    history_file = run_dir / "validation.json"
    fresh = Distillation(init_state(bounds, dqc), bounds, jax.random.PRNGKey(run.seed), [])
    with RunCheckpointer(run_dir, every=run.checkpoint_every) as checkpoints, stop_on_interrupt() as interrupted:
        restored = checkpoints.restore_latest(fresh[:3])
        # The validation log (float64 PSNRs, which pick the best step) is JSON beside the checkpoints and is
        # written before them: entries past the restored step never happened.
        logged = read_json(history_file) if history_file.is_file() else []
        resume = fresh
        if restored is not None:
            step = int(restored[0].step)
            history = [h for h in _from_set5_log(logged) if h["step"] <= step]
            resume = Distillation(*restored, history)

        def checkpoint(done: int, current: Distillation) -> bool:
            stopping = interrupted()
            if done % run.checkpoint_every == 0 or done == stop or stopping:
                write_atomically(history_file, json.dumps(_set5_log(current.history), indent=1))
                checkpoints.save(done, current[:3], force=True)
            return stopping

        set5 = load_benchmark(run.data_root, "Set5", run.scale)
        result = distill(model, bounds, dqc, pool, seed=run.seed, validation=set5, validate_every=run.validate_every,
                         resume=resume, stop_at=stop, after_step=checkpoint, desc=f"DQC W{run.bits}A{run.bits} x{run.scale}",
                         mesh=mesh)
        if interrupted():
            raise KeyboardInterrupt(f"DQC checkpointed at step {int(result.state.step)}")
    kept = result.kept
    if "crossed" in kept:
        lower = "--weight-lr" if is_weight_site(kept["crossed"]) else "--lr"
        warnings.warn(f"DQC crossed the bounds of {kept['crossed']} (upper below lower) at every validation; step "
                      f"{kept['step']} is kept, a constant quantizer there (try a lower {lower})")
    log = {"completed": stop == dqc.steps, "best_step": kept.get("step", 0), "best_set5_psnr": kept.get("psnr"),
           "validation": _set5_log(result.history),
           "selection": "highest Set5 PSNR among the validation steps with no crossed bounds (among all where each "
                        "has some), the later one on a tie as BasicSR (the initial bounds excluded)"}
    return result.best, log


def _set5_log(history: list[dict]) -> list[dict]:
    """`distill`'s validation log as a run directory records it (validation.json, results.json)."""
    return [{"set5_psnr" if k == "psnr" else k: v for k, v in h.items()} for h in history]


def _from_set5_log(logged: list[dict]) -> list[dict]:
    return [{"psnr" if k == "set5_psnr" else k: v for k, v in h.items()} for h in logged]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------------------------------------
# The whole run


def _check_paths(run: QuantizeConfig, run_dir: Path, resume: bool) -> None:
    """The quick checks of where the run reads and writes, before its inputs load."""
    check_run_dir(run_dir, CONFIG_FILE, resume, RUN_KIND)
    if run.dqc:
        benchmark_dir(Path(run.data_root), "Set5")  # DQC validates on it
    if run.export_bounds and not (resume and Path(run.export_bounds).exists()):  # a resume may find its own there
        check_output_path(run.export_bounds)


def _results_markdown(run: QuantizeConfig, table: str, dqc_log: dict | None, seconds: dict, device: str,
                      size: dict) -> str:
    """results.md: the PSNR / SSIM table, the low-bit file's size, which DQC step was kept and why, and where the
    time went."""
    parts = [f"# W{run.bits}A{run.bits} x{run.scale}: PSNR / SSIM (Y)", table,
             f"Low-bit model file `{size['file']}` (packed {run.bits}-bit weights, float32 params): {size['bytes']:,} "
             f"bytes, {size['fp_float32_bytes'] / size['bytes']:.2f}x smaller than the FP params in float32 "
             f"({size['fp_float32_bytes']:,} bytes). `scripts/export.py RUN_DIR -o FILE.safetensors --half` stores "
             "the float params in float16."]
    if dqc_log:
        dqc, kept = run.dqc, dqc_log["best_step"]
        rows = [f"| {h['step']} | {h['loss']:.4g} | {h['set5_psnr']:.3f}{' (kept)' if h['step'] == kept else ''} |"
                for h in dqc_log["validation"]]
        parts += [
            f"DQC: {dqc.steps} steps, {dqc.loss} loss, batch {dqc.batch} of {dqc.patch}x{dqc.patch} LR patches, "
            f"lr {dqc.lr:g}{'' if dqc.weight_lr is None else f' ({dqc.weight_lr:g} for the weight bounds)'}"
            f"{' (cosine)' if dqc.cosine else ''}; the bounds of step {kept} are kept, the best Set5 "
            "PSNR among the validations.",
            "\n".join(["| DQC step | loss | Set5 PSNR |", "|---|---|---|", *rows]),
        ]
    parts.append(f"Time on {device}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".")
    return "\n\n".join(parts) + "\n"


def _finished(run_dir: Path) -> dict:
    """What a finished run in `run_dir` recorded (results.json); {} for an unfinished one."""
    path = run_dir / "results.json"
    return read_json_object(path) if path.is_file() else {}


def _bounds_file(run_dir: Path, init: str) -> Path:
    return run_dir / "calibration" / f"{INITS[init].label}.json"


def _uncalibrated(run: QuantizeConfig, run_dir: Path, resume: bool) -> list[str]:
    """The initialisations to calibrate: all of `run.calibrations`, less on a resume those written before."""
    return [init for init in run.calibrations if not (resume and _bounds_file(run_dir, init).is_file())]


def _calibrate(model: Model, start: dict, run: QuantizeConfig, run_dir: Path, todo: list[str],
               images: jax.Array | None, mesh: Mesh) -> dict[str, dict]:
    """The bounds of each initialisation in `run.calibrations` by label: those in `todo` calibrated on
    `images` and written as JSON, the others (a resume's) read back."""
    stages = {}
    with progress(len(todo), desc=f"calibration W{run.bits}A{run.bits} x{run.scale}", unit="init") as bar:
        for init in run.calibrations:
            method, strategy, label = INITS[init]
            if init not in todo:
                stages[label] = read_bounds_json(_bounds_file(run_dir, init), model.config, run.bits)
                continue
            bar.set_postfix_str(label)
            calibration = Calibration(method=method, strategy=strategy, percentile=run.percentile)
            with jax.set_mesh(mesh):  # DOBI sums its errors in one order whatever the device count
                stages[label] = _checked(label, calibrate(model.config, calibration, model.params, start, images))
            write_bounds_json(_bounds_file(run_dir, init), stages[label], model.config)
            bar.update(1)
    return stages


def _checked(label: str, bounds: dict) -> dict:
    """`bounds`, once every site's pair is known to be finite and uncrossed (a one-line error names the site)."""
    try:
        validate_bounds(bounds)
    except ValueError as e:
        raise ValueError(f"{label} gave unusable bounds: {e}") from None
    return bounds


def _compilations(model: Model, start: dict, run: QuantizeConfig, benchmarks: dict, mesh: Mesh) -> list:
    """What the run compiles after calibration: the FP and fake-quant forwards at every benchmark (and Set5
    validation) image shape, and the DQC step. Compiled beside the calibration, they cost no wall time there
    (on an H100, the step took ~55 s and Set5's five shapes ~90 s, one after another). The params and `start`
    are replicated over `mesh` as the run's are: a program is compiled for its arguments' placement."""
    validation = {"Set5": load_benchmark(run.data_root, "Set5", run.scale)} if run.dqc else {}
    quantized, devices = model._replace(bounds=start), mesh.local_devices
    forwards = [*forward_compilations(model, benchmarks, run.tiling, devices),
                *forward_compilations(quantized, benchmarks, run.tiling, devices),
                *forward_compilations(quantized, validation, devices=devices)]  # DQC validates on whole images
    return forwards + ([functools.partial(_compile_step, model, start, run.dqc, mesh)] if run.dqc else [])


def _compile_step(model: Model, start: dict, dqc: DQCConfig, mesh: Mesh) -> None:
    """The DQC step for `distill`'s arguments: `start` and the params replicated, the batch split over `mesh`."""
    images = jax.ShapeDtypeStruct((dqc.batch, dqc.patch, dqc.patch, 3), jnp.float32,
                                  sharding=parallel.batch_sharded(mesh))
    state = parallel.replicate(init_state(start, dqc), mesh)
    donating_dqc_step.lower(model.config, dqc, state, model.params, images).compile()


def _timed(fn, *args) -> float:
    """Seconds `fn(*args)` took."""
    clock = time.perf_counter()
    fn(*args)
    return time.perf_counter() - clock


def quantize_run(run: QuantizeConfig, run_dir: Path, data_root: Path, resume: bool = False) -> dict:
    """Calibrate (and optionally distill) the bounds, evaluate every stage, and write the run directory.

    A new run needs a run directory that holds no run. `resume` continues the run in `run_dir`, which must
    have been started with the same `run`: the calibrated bounds are read back and DQC goes on from its last
    checkpoint, ending with the bounds of an uninterrupted run. A finished run resumed with more `datasets`
    (`QuantizeConfig.evaluated_on`) evaluates every stage on those alone and keeps its other results. `data_root`
    fills in the paths `run` leaves unset (`QuantizeConfig.with_paths`).

    Every input loads before the run directory is claimed: a run recorded with a bad input could neither be
    resumed nor started again there. Matmuls run at `run.matmul_precision` throughout.

    Batches (calibration and DQC) are split over `run.devices` devices of every process (`parallel.data_mesh`),
    which must divide them; the model and bounds are replicated. Only process 0 writes files, but for orbax's."""
    with jax.default_matmul_precision(run.matmul_precision):
        return _quantize_run(run, run_dir, data_root, resume)


def _quantize_run(run: QuantizeConfig, run_dir: Path, data_root: Path, resume: bool) -> dict:
    run = run.with_paths(data_root)
    mesh = parallel.data_mesh(run.devices)
    if run.dqc and not resume:  # recorded as it runs here: a resume elsewhere then rounds the same
        run = dataclasses.replace(run, dqc=run.dqc.resolved())
    if run.dqc:
        parallel.check_batch(run.dqc.batch, mesh)
    _check_paths(run, run_dir, resume)
    finished = _finished(run_dir) if resume else {}
    evaluated = finished.get("results", {})  # {stage: {dataset: score}}
    model = load_model(run.model)._replace(bounds=None)  # the FP weights, whatever the source
    if model.config.upscale != run.scale:
        raise ValueError(f"{run.model} is a x{model.config.upscale} model, but --scale is {run.scale}")
    imported = read_bounds_json(Path(run.import_bounds), model.config, run.bits) if run.import_bounds else None
    unevaluated = [d for d in run.datasets if not evaluated or any(d not in got for got in evaluated.values())]
    benchmarks = load_benchmarks(run.data_root, unevaluated, run.scale)  # a bad image fails now, not after DQC
    todo = [] if imported is not None else _uncalibrated(run, run_dir, resume)
    images = load_calibration(Path(run.calib), run.calib_patches, run.calib_size, run.seed) if todo else None
    if images is not None:
        parallel.check_batch(len(images), mesh, "the calibration batch (--calib-patches)")
        images = parallel.shard_batch(images[slice(*parallel.process_rows(len(images)))], len(images), mesh)
    pool = dqc_pool(run) if run.dqc else None
    claim_run_dir(run_dir, CONFIG_FILE, run.to_dict(), resume, RUN_KIND, growable={"datasets"})

    # Placed once as every jitted call gets them, so that the programs compiled ahead are the ones called.
    model = model._replace(params=parallel.replicate(model.params, mesh))
    start = parallel.replicate(init_bounds(model.config, QuantRules.uniform(run.bits)), mesh)
    seconds = {}  # wall time of each phase in this process, compilation included
    with ThreadPoolExecutor(max_workers=1) as background:
        compilations = _compilations(model, start, run if not evaluated else dataclasses.replace(run, dqc=None),
                                     benchmarks, mesh)  # a finished run's DQC has nothing left to compile
        ahead = background.submit(with_matmul_precision_here(_timed), compile_concurrently, compilations)
        clock = time.perf_counter()
        stages = ({"imported": imported} if imported is not None
                  else _calibrate(model, start, run, run_dir, todo, images, mesh))
        stages = {label: parallel.replicate(bounds, mesh) for label, bounds in stages.items()}  # tree.map would sort them
        seconds["calibration"] = time.perf_counter() - clock
        seconds["compilation (beside calibration)"] = ahead.result()
    clock = time.perf_counter()

    dqc_log = None
    if run.dqc is not None:
        distilled, dqc_log = run_dqc(model, list(stages.values())[-1], run, pool, run_dir, mesh=mesh)
        stages["DQC"] = distilled  # its crossed pairs, if any, are named in a warning (`run_dqc`)
        seconds["dqc"], clock = time.perf_counter() - clock, time.perf_counter()
    final_name, final = list(stages.items())[-1]

    score = functools.partial(evaluate, benchmarks=benchmarks, tiling=run.tiling, devices=mesh.local_devices)
    rows = {"FP": score(model)} | {name: score(model._replace(bounds=bounds)) for name, bounds in stages.items()}
    rows = {name: evaluated.get(name, {}) | scores for name, scores in rows.items()}
    table = results_table(rows, run.datasets)
    if not evaluated:
        seconds["evaluation"] = time.perf_counter() - clock
    elif unevaluated:  # the finished run's phases, and this evaluation
        seconds = finished["seconds"] | {f"evaluation of {', '.join(unevaluated)}": time.perf_counter() - clock}
    else:
        seconds = finished["seconds"]

    save_model(run_dir / "model", model._replace(bounds=final), overwrite=resume)  # a resume may have saved it
    if run.export_bounds:
        write_bounds_json(Path(run.export_bounds), final, model.config)
    results = {
        "config": run.to_dict(),
        "model": run.model,
        "final_bounds": final_name,
        "results": rows,
        "dqc": dqc_log,
        "seconds": seconds,
        "device": str(jax.devices()[0].device_kind),
        "devices": parallel.describe(mesh),
    }
    if not parallel.is_main_process():  # process 0 writes the files
        return results
    # from its own copy of the model: a computation over the mesh would wait for the other processes
    device = mesh.local_devices[0]
    model = model._replace(params=parallel.to_device(model.params, device))
    stages = {label: parallel.to_device(bounds, device) for label, bounds in stages.items()}
    final = stages[final_name]
    lowbit_file = run_dir / f"model_w{run.bits}a{run.bits}.safetensors"
    size = {"file": lowbit_file.name, "bytes": save_lowbit(lowbit_file, model._replace(bounds=final)),
            "fp_float32_bytes": fp_bytes(model)}
    if run.datasets[0] in benchmarks:  # else drawn before, by the run resumed
        comparison_grid(
            {name: model._replace(bounds=b) for name, b in [("FP", None), *stages.items()]},
            benchmarks[run.datasets[0]][:3], run_dir / "comparison.png",
        )
    results["lowbit"] = size
    write_results(run_dir, results, _results_markdown(run, table, dqc_log, seconds,
                                                      f"{results['device']} ({results['devices']})", size))
    return results

