"""Run by tests/test_parallel.py in a process started with two host devices (XLA_FLAGS set before JAX starts):
every data-parallel stage on a tiny SwinIR on one device and on two, in one process so that each program compiles
once per mesh. Prints one JSON object of measurements; the parent test asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/data_parallel_child.py WORK_DIR
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxquant import parallel
from jaxquant.checkpoint import Model
from jaxquant.data import load_benchmarks, write_image
from jaxquant.dobi import Calibration, calibrate
from jaxquant.dqc import DQCConfig, donating_dqc_step
from jaxquant.evaluation import evaluate
from jaxquant.patches import lr_pool_from_folder
from jaxquant.pipeline import QuantizeConfig, distill, run_dqc
from jaxquant.quant import QuantRules, init_bounds
from jaxquant.swinir import SwinIR, SwinIRConfig
from jaxquant.train import TrainConfig, TrainState, make_optimizer, train_step

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

TINY = SwinIRConfig(upscale=2, embed_dim=12, depths=(1,), num_heads=(1,), window_size=4)
STEPS = 3  # DQC and training steps compared
# remat and scan fixed: the same program whatever the batch each device gets
DQC = DQCConfig(steps=STEPS, batch=4, patch=8, remat=False, scan=False)


def tiny_data(root: Path) -> Path:
    """train/: 4 smooth 40x40 images; benchmark/Set5/HR: 2 noise images of 32x32 (16x16 LR at x2)."""
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(4):
        wave = np.sin(xx / (3 + i) + yy / 5)[..., None] * np.array([1.0, 0.5, -0.7])
        write_image(root / "train" / f"{i}.png", np.clip(127 + 100 * wave, 0, 255).astype(np.uint8))
    rng = np.random.default_rng(0)
    for i in range(2):
        write_image(root / "benchmark" / "Set5" / "HR" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    return root


def tiny_params() -> dict:
    """Random params of TINY, drawn on the host: `SwinIR.init` costs ~9 s of CPU time here, its shapes nothing."""
    shapes = jax.eval_shape(SwinIR(TINY).init, jax.random.PRNGKey(1), jax.ShapeDtypeStruct((1, 8, 8, 3), np.float32))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.device_get(tree))[0])


def difference(a: np.ndarray, b: np.ndarray) -> dict:
    """The largest absolute difference, how many values differ and the spacing of float32 at the largest value."""
    d = np.abs(a - b)
    return {"max_abs": float(d.max()), "differing": int((d > 0).sum()), "of": int(d.size),
            "ulp_at_max": float(np.spacing(np.abs(a).max()))}


def all_reduces_in(jitted, *args, **kwargs) -> int:
    return jitted.lower(*args, **kwargs).compile().as_text().count(" all-reduce(")


def batch_of(dqc: DQCConfig, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((dqc.batch, dqc.patch, dqc.patch, 3), jnp.float32,
                                sharding=parallel.batch_sharded(mesh))


def main(work: Path) -> None:
    root = tiny_data(work / "data")
    model = Model(TINY, tiny_params())
    start = init_bounds(TINY, QuantRules.uniform(2))
    calib = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
    pool = lr_pool_from_folder(root / "train", 2, min_size=DQC.patch, keep_hr=False)
    train_cfg = TrainConfig(scale=2, model=TINY, batch=4, patch=8, steps=30, lr=1e-3, warmup=3, remat=False)
    train_pool = lr_pool_from_folder(root / "train", 2, min_size=8)
    set5 = load_benchmarks(root, ["Set5"], 2)
    out = {"devices": jax.local_device_count()}
    for n in (1, 2):
        mesh = parallel.data_mesh(n)
        with jax.set_mesh(mesh):
            dobi = calibrate(TINY, Calibration(), parallel.replicate(model.params, mesh),
                             parallel.replicate(start, mesh), parallel.shard_batch(calib, len(calib), mesh))
            dqc = distill(model, dobi, DQC, pool, mesh=mesh)
            state = TrainState(jnp.zeros((), jnp.int32), model.params, make_optimizer(train_cfg).init(model.params),
                               jax.random.PRNGKey(0))  # afresh: the step donates it
            state, pool_n = parallel.replicate((state, train_pool), mesh)
            # The steps' programs as compiled (from the cache): split over 2 devices, they all-reduce.
            all_reduces = {"dqc": all_reduces_in(donating_dqc_step, TINY, DQC, parallel.replicate(dqc.state, mesh),
                                                 parallel.replicate(model.params, mesh), batch_of(DQC, mesh)),
                           "train": all_reduces_in(train_step, state, pool_n, cfg=train_cfg)}
            losses = []
            for _ in range(STEPS):
                state, loss = train_step(state, pool_n, cfg=train_cfg)
                losses.append(float(loss))
            psnr = evaluate(model._replace(bounds=dobi), set5, show_progress=False, devices=mesh.local_devices)["Set5"]
        out[n] = {"all_reduces": all_reduces, "dobi": flat(dobi), "dqc": flat(dqc.state.bounds), "losses": losses,
                  "psnr": [r["psnr"] for r in psnr["images"].values()]}
    comparison = {
        "all_reduces": {1: out[1]["all_reduces"], 2: out[2]["all_reduces"]},
        "dobi": difference(out[1]["dobi"], out[2]["dobi"]),
        "dqc": difference(out[1]["dqc"], out[2]["dqc"]),
        "losses": {1: out[1]["losses"], 2: out[2]["losses"]},
        "psnr": {1: out[1]["psnr"], 2: out[2]["psnr"]},
    }

    # A 2-device DQC run killed after step 2 and resumed, against one run straight through.
    mesh = parallel.data_mesh(2)
    run = QuantizeConfig(bits=2, scale=2, dqc=DQC, data_root=str(root), train_dir=str(root / "train"),
                         validate_every=STEPS, checkpoint_every=STEPS)
    straight, straight_log = run_dqc(model, dobi, run, pool, work / "straight", mesh=mesh)
    _, stopped_log = run_dqc(model, dobi, run, pool, work / "killed", stop_after=2, mesh=mesh)
    resumed, resumed_log = run_dqc(model, dobi, run, pool, work / "killed", mesh=mesh)
    try:
        parallel.check_batch(3, mesh)
    except ValueError as e:
        comparison["uneven_batch_error"] = str(e)
    comparison["resume"] = {"stopped_completed": stopped_log["completed"], "completed": resumed_log["completed"],
                            "bounds": difference(flat(straight), flat(resumed)),
                            "logs_equal": straight_log["validation"] == resumed_log["validation"]}
    print(json.dumps(comparison))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
