"""One DQC step (student forward + backward, teacher forward, Adam on the bounds), compile time separate.

    python benchmarks/bench_dqc.py                             # x4, batch 4, 32x32 (official on this CPU class: 1,948 ms)
    python benchmarks/bench_dqc.py --scale 2 --batch 16 --size 64   # official on an H100: 559 ms
    python benchmarks/bench_dqc.py --trace /tmp/dqc_trace     # also a profile of 3 steps (Perfetto / TensorBoard)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_dqc.py --devices 2   # data parallel
"""

import argparse
import functools

import jax

from common import add_keep_scratch_flag, apply_keep_scratch, report, time_compiled
from jaxquant import parallel
from jaxquant.dqc import DQCConfig, dqc_step, init_state
from jaxquant.quant import QuantRules, init_bounds
from jaxquant.swinir import SwinIR, swinir_light

OFFICIAL_S = {("cpu", 4, 4, 32): 1.948, ("gpu", 2, 16, 64): 0.559}


def parser(runs: int = 10) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, help="recompute the student's activations "
                   "(default: by backend, see DQCConfig.block_execution)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, help="the Swin blocks as a lax.scan (default: by backend)")
    add_keep_scratch_flag(p)
    p.add_argument("--matmul-precision", choices=("default", "tensorfloat32", "float32"), default="default",
                   help="jax_default_matmul_precision (on NVIDIA GPUs since Ampere, 'default' is TF32)")
    p.add_argument("--trace", metavar="DIR", help="write a profiler trace of 3 timed steps here")
    p.add_argument("--devices", type=int, default=1, help="split the batch over this many devices (jaxquant.parallel)")
    return p


def dqc_config(args: argparse.Namespace) -> DQCConfig:
    return DQCConfig(batch=args.batch, patch=args.size, remat=args.remat, scan=args.scan)


def setup(args: argparse.Namespace):
    """`(step, step_args)`: a jitted DQC step (without donation, so every timed call gets the same state), the
    batch split over `args.devices` devices and the rest replicated."""
    apply_keep_scratch(args)
    mesh = parallel.data_mesh(args.devices)
    parallel.check_batch(args.batch, mesh)
    config, dqc = swinir_light(args.scale), dqc_config(args)
    images = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    params = jax.jit(SwinIR(config).init)(jax.random.PRNGKey(1), images[:1])["params"]
    bounds = init_bounds(config, QuantRules.uniform(args.bits), fill=(-2.0, 2.0))
    step = jax.jit(functools.partial(dqc_step.__wrapped__, config, dqc))
    state, params = parallel.replicate((init_state(bounds, dqc), params), mesh)
    return step, (state, params, parallel.shard_batch(images, args.batch, mesh))


def title(args: argparse.Namespace) -> str:
    remat, scan = dqc_config(args).block_execution(args.batch * args.size**2)
    blocks = (", activations recomputed" if remat else ", activations stored") + (", scanned" if scan else ", unrolled")
    precision = "" if args.matmul_precision == "default" else f", {args.matmul_precision} matmuls"
    devices = f", split over {args.devices} devices" if args.devices > 1 else ""
    return (f"DQC step x{args.scale}, batch {args.batch}, {args.size}x{args.size}, W{args.bits}A{args.bits}{blocks}"
            f"{precision}{devices}")


def main():
    args = parser().parse_args()
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    step, step_args = setup(args)
    result = time_compiled(step, *step_args, runs=args.runs)
    official = OFFICIAL_S.get((jax.default_backend(), args.scale, args.batch, args.size))
    report(title(args), {"dqc_step": result}, official)
    if args.trace:
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(step(*step_args))


if __name__ == "__main__":
    main()
