"""Training throughput of SwinIR-light: steps/s of `jaxquant.train.train_step` (sampling + fwd + bwd + Adam).

    python benchmarks/bench_train.py                        # x2, batch 64, 64x64 LR patches
    python benchmarks/bench_train.py --batch 8 --steps 3 --bf16
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_train.py --devices 2   # data parallel

Runs on whatever device JAX picks (CPU or GPU, unchanged). Patches come from synthetic images already on the
device, so data loading is not measured beyond the on-device crop. Compile time is timed separately
(`lower().compile()`, whose executable then runs every step); then `--warmup` steps run untimed and `--steps`
steps are timed one by one (median reported).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from common import add_keep_scratch_flag, allocator, apply_keep_scratch, peak_host_memory_gib
from jaxquant import parallel
from jaxquant.patches import make_pool
from jaxquant.train import TrainConfig, init_state, train_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch", type=int, default=64, help="LR patch side")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--devices", type=int, default=1, help="split the batch over this many devices (jaxquant.parallel)")
    add_keep_scratch_flag(p, default=False)  # train.py does not keep it: its scratch outgrows what glibc keeps
    args = p.parse_args(argv)
    if min(args.batch, args.patch, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --patch and --steps must be >= 1, --warmup >= 0")
    apply_keep_scratch(args)

    cfg = TrainConfig(scale=args.scale, batch=args.batch, patch=args.patch, bf16=args.bf16)
    rng = np.random.default_rng(0)
    lr_side = 2 * args.patch
    lr_images = [rng.integers(0, 256, (lr_side, lr_side, 3), np.uint8) for _ in range(8)]
    hr_images = [img.repeat(args.scale, 0).repeat(args.scale, 1) for img in lr_images]
    mesh = parallel.data_mesh(args.devices)
    parallel.check_batch(args.batch, mesh)
    pool, state = parallel.replicate((make_pool(lr_images, hr_images, args.scale, min_size=args.patch),
                                      init_state(cfg)), mesh)

    started = time.perf_counter()
    with jax.set_mesh(mesh):  # the step splits its batch over the mesh
        step = train_step.lower(state, pool, cfg=cfg).compile()  # cfg is baked in: step(state, pool)
    compile_s = time.perf_counter() - started
    scratch_gib = step.memory_analysis().temp_size_in_bytes / 2**30
    for _ in range(args.warmup):
        state, loss = step(state, pool)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        state, loss = step(state, pool)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} device(s), batch split over "
          f"{args.devices}), jax {jax.__version__}; {allocator()}")
    print("| model | batch | LR patch | dtype | compile (s) | step median (s) | steps/s | patches/s "
          "| XLA scratch (GiB) | peak host memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| SwinIR-light x{args.scale} | {args.batch} | {args.patch} | {'bf16' if args.bf16 else 'f32'} "
        f"| {compile_s:.1f} | {step_s:.3f} | {1 / step_s:.3f} | {args.batch / step_s:.1f} "
        f"| {scratch_gib:.2f} | {peak_host_memory_gib():.2f} |"
    )
    print(f"timed {args.steps} steps after {args.warmup} warm-up; final loss {float(loss):.4f}")


if __name__ == "__main__":
    main()
