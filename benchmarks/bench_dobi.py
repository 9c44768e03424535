"""DOBI over all 384 sites (100 candidates each) for SwinIR-light, compile time separate.

    python benchmarks/bench_dobi.py                      # x4, 8 patches 32x32 (official on this CPU class: 152 s)
    python benchmarks/bench_dobi.py --scale 2 --batch 32 --size 64   # official on an H100: 14.7 s
"""

import argparse
import functools

import jax

from common import add_keep_scratch_flag, apply_keep_scratch, report, time_compiled
from jaxquant.dobi import Calibration, calibrate
from jaxquant.quant import QuantRules, init_bounds
from jaxquant.swinir import SwinIR, swinir_light

OFFICIAL_S = {("cpu", 4, 8, 32): 152.0, ("gpu", 2, 32, 64): 14.7}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    add_keep_scratch_flag(parser)
    args = parser.parse_args()
    apply_keep_scratch(args)
    config = swinir_light(args.scale)
    images = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    params = jax.jit(SwinIR(config).init)(jax.random.PRNGKey(1), images[:1])["params"]
    bounds = init_bounds(config, QuantRules.uniform(args.bits))
    search = jax.jit(functools.partial(calibrate.__wrapped__, config, Calibration()))
    result = time_compiled(search, params, bounds, images, runs=args.runs, warmup=1)
    official = OFFICIAL_S.get((jax.default_backend(), args.scale, args.batch, args.size))
    report(
        f"DOBI x{args.scale}, {args.batch} patches {args.size}x{args.size}, W{args.bits}A{args.bits}, 384 sites",
        {"dobi": result}, official,
    )


if __name__ == "__main__":
    main()
