"""One DQC step (student forward + backward, teacher forward, Adam on the bounds), compile time separate.

    python benchmarks/bench_dqc.py                             # x4, batch 4, 32x32 (official on this CPU class: 1,948 ms)
    python benchmarks/bench_dqc.py --scale 2 --batch 16 --size 64   # official on an H100: 559 ms
"""

import argparse
import functools

import jax

from common import report, time_compiled
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
    p.add_argument("--no-remat", dest="remat", action="store_false", help="store the student's activations")
    return p


def setup(args: argparse.Namespace):
    """`(step, step_args)`: a jitted DQC step (without donation, so every timed call gets the same state)."""
    config, dqc = swinir_light(args.scale), DQCConfig(remat=args.remat)
    images = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    params = jax.jit(SwinIR(config).init)(jax.random.PRNGKey(1), images[:1])["params"]
    bounds = init_bounds(config, QuantRules.uniform(args.bits), fill=(-2.0, 2.0))
    step = jax.jit(functools.partial(dqc_step.__wrapped__, config, dqc))
    return step, (init_state(bounds, dqc), params, images)


def title(args: argparse.Namespace) -> str:
    remat = "" if args.remat else ", activations stored"
    return f"DQC step x{args.scale}, batch {args.batch}, {args.size}x{args.size}, W{args.bits}A{args.bits}{remat}"


def main():
    args = parser().parse_args()
    step, step_args = setup(args)
    result = time_compiled(step, *step_args, runs=args.runs)
    official = OFFICIAL_S.get((jax.default_backend(), args.scale, args.batch, args.size))
    report(title(args), {"dqc_step": result}, official)


if __name__ == "__main__":
    main()
