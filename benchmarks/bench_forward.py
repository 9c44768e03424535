"""FP forward of SwinIR-light: one LR image, jitted, compile time separate.

    python benchmarks/bench_forward.py              # x4, 64x64 (official PyTorch on this CPU class: 228 ms)
    python benchmarks/bench_forward.py --scale 2 --size 256   # official on an H100: 292 ms
"""

import argparse

import jax
import jax.numpy as jnp

from common import add_keep_scratch_flag, apply_keep_scratch, report, time_compiled
from jaxquant.swinir import SwinIR, swinir_light

OFFICIAL_S = {("cpu", 4, 64): 0.228, ("gpu", 2, 256): 0.292}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    add_keep_scratch_flag(parser)
    args = parser.parse_args()
    apply_keep_scratch(args)
    config = swinir_light(args.scale)
    model = SwinIR(config)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, args.size, args.size, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    forward = jax.jit(lambda p, x: model.apply(p, x)[0])
    result = time_compiled(forward, params, x, runs=args.runs)
    official = OFFICIAL_S.get((jax.default_backend(), args.scale, args.size))
    report(f"SwinIR-light x{args.scale} forward, 1x{args.size}x{args.size}", {"fp32": result}, official)


if __name__ == "__main__":
    main()
