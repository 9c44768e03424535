"""Multi-host check on one machine: DOBI and a DQC run killed after step 2 and resumed (run_dqc, orbax checkpoints
in one shared run directory), on a tiny SwinIR, as 1 process with 2 host devices or as 2 processes of 1 CPU
device each (jax.distributed over localhost, gloo collectives). Prints digests of the bounds: equal digests mean
bit-for-bit equal results.

    python benchmarks/check_multiprocess.py 1 0 /tmp/one                                    # 1 process, 2 devices
    python benchmarks/check_multiprocess.py 2 1 /tmp/two & python benchmarks/check_multiprocess.py 2 0 /tmp/two
"""

import hashlib
import json
import os
import sys
from pathlib import Path

processes, process, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
if processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS="localhost:18477", JAX_NUM_PROCESSES=str(processes),
                      JAX_PROCESS_ID=str(process))
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from jaxquant import parallel  # noqa: E402

parallel.initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import data_parallel_child as tiny  # noqa: E402


def digest(tree) -> str:
    return hashlib.sha256(np.asarray(tiny.flat(tree)).tobytes()).hexdigest()[:16]


def main() -> None:
    root = tiny.tiny_data(work / f"data{process}")
    model = tiny.Model(tiny.TINY, tiny.tiny_params())
    calib = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
    mesh = parallel.data_mesh()
    start, stop = parallel.process_rows(len(calib))
    with jax.set_mesh(mesh):
        dobi = tiny.calibrate(tiny.TINY, tiny.Calibration(), parallel.replicate(model.params, mesh),
                              parallel.replicate(tiny.init_bounds(tiny.TINY, tiny.QuantRules.uniform(2)), mesh),
                              parallel.shard_batch(calib[start:stop], len(calib), mesh))
    pool = tiny.lr_pool_from_folder(root / "train", 2, min_size=8, keep_hr=False)
    run = tiny.QuantizeConfig(bits=2, scale=2, dqc=tiny.DQC, data_root=str(root), train_dir=str(root / "train"),
                              validate_every=tiny.STEPS, checkpoint_every=tiny.STEPS)
    tiny.run_dqc(model, dobi, run, pool, work / "run", stop_after=2, mesh=mesh)  # "killed" after step 2
    bounds, log = tiny.run_dqc(model, dobi, run, pool, work / "run", mesh=mesh)
    print(json.dumps({"process": process, "mesh": parallel.describe(mesh), "dobi": digest(dobi),
                      "dqc": digest(bounds), "validation": log["validation"]}))


if __name__ == "__main__":
    main()
