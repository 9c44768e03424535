"""Full-precision training of SwinIR for super-resolution (the FP model 2DQuant starts from).

    python scripts/train.py --scale 2 --run-dir runs/x2                 # SwinIR-light x2 on t291, 1278 steps
    python scripts/train.py --scale 4 --init runs/x2 --run-dir runs/x4  # x4 from the x2 body, 380 steps

This recipe, run in PyTorch with bf16 autocast (`--bf16` here), gave the shared weights
`swinir_light_x{2,3,4}_t291.pth` (Set5 Y-PSNR x2 35.06, x3 30.85, x4 28.89 dB). It follows KAIR
`options/swinir/train_swinir_sr_lightweight.json` (github.com/cszn/KAIR, the official SwinIR training): L1
loss, Adam, batch 64 of 64x64 LR patches with flips and transposes, x3/x4 fine-tuned from x2; with Adam
betas (0.9, 0.99) of BasicSR's SwinIR options, and linear warmup then cosine decay instead of step decay
for short runs (no EMA).

One step is one jitted function (sample patches on device, forward, backward, Adam) with the train state
donated; step `i` draws its batch from `fold_in(key, i)`, so runs resume exactly (see `jaxquant.runs`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.cli import MATMUL_PRECISIONS
from jaxquant.data import BenchmarkImage, default_data_root, load_benchmark
from jaxquant.evaluation import super_resolve
from jaxquant.metrics import psnr_y, to_uint8
from jaxquant.patches import PatchPool, lr_pool_from_folder, sample_patches
from jaxquant import parallel
from jaxquant.runs import (RunCheckpointer, check_run_dir, claim_run_dir, progress, read_json_object, read_run_json,
                           stop_on_interrupt, write_results)
from jaxquant.swinir import SwinIR, SwinIRConfig, swinir_light

Array = jax.Array
Params = Any
log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between loss read-backs (each one is a host sync)
CONFIG_FILE = "train_config.json"
RUN_KIND = "training run"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a training run (paths included, so a run dir can be resumed alone)."""

    scale: int = 2
    model: SwinIRConfig | None = None  # None: SwinIR-light at `scale`
    batch: int = 64
    patch: int = 64  # LR patch side; HR patches are scale x larger
    steps: int = 1278
    lr: float = 5e-4  # peak learning rate, reached after `warmup` steps, then cosine decay to `min_lr`
    warmup: int = 100
    min_lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.99
    bf16: bool = False  # bf16 compute (params, gradients, Adam state and loss stay float32)
    remat: bool = True  # recompute Swin blocks in the backward: ~1/10 of the activation memory (`SwinIR.remat`)
    val_every: int = 250  # Set5 PSNR-Y every N steps and at the end; 0: no validation
    ckpt_every: int = 250
    seed: int = 0
    data_root: str = ""  # holds benchmark/Set5; "": `default_data_root()`
    train_dir: str = ""  # HR training images; "": <data_root>/train/t291
    init: str = ""  # any `load_model` source; "": random init
    matmul_precision: str = "highest"  # jax_default_matmul_precision for the whole run (cli.MATMUL_PRECISIONS)
    devices: int | None = None  # devices per process the batch is split over (`parallel.data_mesh`); None: all

    def __post_init__(self):
        if self.model is not None and self.model.upscale != self.scale:
            raise ValueError(f"model config is x{self.model.upscale} but scale is {self.scale}")
        for name in ("scale", "batch", "patch", "steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} (steps {self.steps})")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")
        if not self.lr > 0:  # also refuses NaN, which trained to a NaN loss and reported "done"
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")

    @property
    def swinir(self) -> SwinIRConfig:
        return self.model or swinir_light(self.scale)

    @property
    def data_dir(self) -> Path:
        return Path(self.data_root) if self.data_root else default_data_root()

    @property
    def images_dir(self) -> Path:
        return Path(self.train_dir) if self.train_dir else self.data_dir / "train" / "t291"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        model = d.get("model")
        return cls(**{**d, "model": None if model is None else SwinIRConfig.from_dict(model)})


def preset(scale: int) -> TrainConfig:
    """The recipe of `shared/data/weights/swinir_light_x{2,3,4}_t291.pth`: x2 from scratch for 1278 steps;
    x3 and x4 for 380 steps, meant to start from the x2 model (pass `init`)."""
    if scale == 2:
        return TrainConfig(scale=2)
    return TrainConfig(scale=scale, steps=380, warmup=20, val_every=95, ckpt_every=95)


# ----------------------------------------------------------------------------------------------------------
# Initialisation


def is_upsampler(path: str) -> bool:
    """Params that depend on the scale (`upsample_*`, `conv_last`), re-initialised when the scale changes."""
    top = path.split("/")[0]
    return top.startswith("upsample_") or top == "conv_last"


def transfer_params(fresh: Params, source: Params, keep_upsampler: bool) -> Params:
    """`fresh` with every param copied from `source`, except the upsampler unless `keep_upsampler`.

    Copied params must exist in both with the same shape; a mismatch is a ValueError naming the paths.
    """
    dst, src = flatten_dict(fresh, sep="/"), flatten_dict(source, sep="/")
    copied = {p for p in dst if keep_upsampler or not is_upsampler(p)}
    wanted = {p for p in src if keep_upsampler or not is_upsampler(p)}
    problems = [f"missing {p}" for p in sorted(copied - wanted)] + [f"unexpected {p}" for p in sorted(wanted - copied)]
    problems += [
        f"{p} is {tuple(np.shape(src[p]))}, needs {dst[p].shape}"
        for p in sorted(copied & wanted) if np.shape(src[p]) != dst[p].shape
    ]
    if problems:
        raise ValueError(f"init params do not fit the model: {'; '.join(problems[:4])} ({len(problems)} in all)")
    return unflatten_dict({p: jnp.asarray(src[p], v.dtype) if p in copied else v for p, v in dst.items()}, sep="/")


def init_params(cfg: TrainConfig, key: Array) -> Params:
    """Random SwinIR params, or those of `cfg.init` (with a fresh upsampler if its scale differs)."""
    window = cfg.swinir.window_size
    fresh = SwinIR(cfg.swinir).init(key, jnp.zeros((1, window, window, cfg.swinir.in_chans)))["params"]
    if not cfg.init:
        return fresh
    source = load_model(cfg.init)
    same_scale = source.config.upscale == cfg.scale
    log.info(
        "init from %s (x%d)%s", cfg.init, source.config.upscale, "" if same_scale else ": upsampler re-initialised"
    )
    return transfer_params(fresh, source.params, keep_upsampler=same_scale)


# ----------------------------------------------------------------------------------------------------------
# The train step


class TrainState(NamedTuple):
    step: Array  # int32 (): steps done
    params: Params
    opt_state: optax.OptState
    key: Array  # uint32 (2,): base key; step i uses fold_in(key, i)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)


def init_state(cfg: TrainConfig) -> TrainState:
    init_key, data_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init_params(cfg, init_key)
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params), data_key)


def l1_loss(params: Params, model: SwinIR, lr: Array, hr: Array) -> Array:
    sr, _ = model.apply({"params": params}, lr)
    return jnp.mean(jnp.abs(sr - hr))


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="state")
def train_step(state: TrainState, pool: PatchPool, cfg: TrainConfig) -> tuple[TrainState, Array]:
    """One Adam step on an L1 loss over a fresh batch of patches; returns the new state and the loss. Under
    `jax.set_mesh(parallel.data_mesh(...))` the batch is split over the mesh's devices (the state and pool
    replicated): each device samples and runs its own rows."""
    lr, hr = sample_patches(pool, jax.random.fold_in(state.key, state.step), cfg.batch, cfg.patch)
    lr, hr = parallel.constrain_to_batch(lr), parallel.constrain_to_batch(hr)
    model = SwinIR(cfg.swinir, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32, remat=cfg.remat)
    loss, grads = jax.value_and_grad(l1_loss)(state.params, model, lr, hr)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float constants (b1 ** count)
        updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.key), loss


# ----------------------------------------------------------------------------------------------------------
# Validation


def validate(config: SwinIRConfig, params: Params, images: Sequence[BenchmarkImage]) -> float:
    """Mean Y-PSNR (dB, crop border = scale) over `images`, one whole image at a time."""
    model = Model(config, params)
    return float(np.mean([psnr_y(to_uint8(super_resolve(model, img.lr)), img.hr, config.upscale) for img in images]))


# ----------------------------------------------------------------------------------------------------------
# The run


def load_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was started with."""
    return TrainConfig.from_dict(read_run_json(Path(run_dir), CONFIG_FILE, RUN_KIND))


def _results_table(cfg: TrainConfig, results: dict) -> str:
    psnr = results["set5_psnr_y"]
    return (
        "| model | steps | batch | patch | Set5 PSNR-Y (dB) |\n|---|---|---|---|---|\n"
        f"| SwinIR x{cfg.scale} (embed {cfg.swinir.embed_dim}, depths {list(cfg.swinir.depths)}) "
        f"| {cfg.steps} | {cfg.batch} | {cfg.patch} | {'-' if psnr is None else f'{psnr:.2f}'} |"
    )


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, stop_after: int | None = None) -> dict | None:
    """Train (or resume) a run in `run_dir`; returns its results, or None when stopped at `stop_after`.

    `run_dir` gets `train_config.json`, `checkpoints/<step>` every `cfg.ckpt_every` steps, and at the end
    `model/` (a `load_model` source) with `results.json` / `results.md`. `stop_after` ends the process
    after that step as if it were killed (for time-boxed jobs and tests). A first Ctrl-C stops the run after
    the current step, checkpointed, with a `KeyboardInterrupt`. Matmuls run at `cfg.matmul_precision`. Each
    batch is split over `cfg.devices` devices of every process (`parallel.data_mesh`), which must divide it.
    """
    with jax.default_matmul_precision(cfg.matmul_precision):
        mesh = parallel.data_mesh(cfg.devices)
        with jax.set_mesh(mesh):
            return _train(cfg, mesh, Path(run_dir), resume, stop_after)


def _train(cfg: TrainConfig, mesh: Mesh, run_dir: Path, resume: bool, stop_after: int | None) -> dict | None:
    check_run_dir(run_dir, CONFIG_FILE, resume, RUN_KIND)
    parallel.check_batch(cfg.batch, mesh)
    pool = parallel.replicate(lr_pool_from_folder(cfg.images_dir, cfg.scale, min_size=cfg.patch), mesh)
    val_images = load_benchmark(cfg.data_dir, "Set5", cfg.scale) if cfg.val_every else []
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    # A resumed run takes its params from its checkpoint, not from `init`, which may be gone by now.
    state = parallel.replicate(init_state(dataclasses.replace(cfg, init="") if resume else cfg), mesh)
    loss, started = None, time.perf_counter()
    # Claimed once the inputs have loaded: a run recorded with a bad input could not be started again there.
    claim_run_dir(run_dir, CONFIG_FILE, cfg.to_dict(), resume, RUN_KIND)
    with RunCheckpointer(run_dir, cfg.ckpt_every) as checkpoints:
        if resume:
            state = checkpoints.restore_latest(state) or parallel.replicate(init_state(cfg), mesh)  # none: killed early
        first = int(state.step)
        if first == cfg.steps and (run_dir / "results.json").is_file():  # resuming a finished run
            return read_json_object(run_dir / "results.json")
        with progress(cfg.steps, first, desc=f"train x{cfg.scale}") as bar, stop_on_interrupt() as interrupted:
            for step in range(first + 1, end + 1):
                state, loss = train_step(state, pool, cfg=cfg)
                stopping = interrupted()
                checkpoints.save(step, state, force=step == cfg.steps or stopping)
                if step % LOG_EVERY == 0 or step == end:
                    bar.log(loss=float(loss))
                if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                    bar.log(psnr=validate(cfg.swinir, state.params, val_images))
                bar.update()
                if stopping:
                    raise KeyboardInterrupt(f"training checkpointed at step {step}")
    if end < cfg.steps:
        return None
    psnr = validate(cfg.swinir, state.params, val_images) if val_images else None
    save_model(run_dir / "model", Model(cfg.swinir, state.params), overwrite=resume)  # a resume may have saved it
    results = {
        "set5_psnr_y": psnr,
        "final_loss": None if loss is None else float(loss),
        "steps": cfg.steps,
        "steps_this_process": cfg.steps - first,
        "seconds_this_process": round(time.perf_counter() - started, 1),
        "devices": parallel.describe(mesh),
        "config": cfg.to_dict(),
    }
    write_results(run_dir, results, _results_table(cfg, results))
    return results
