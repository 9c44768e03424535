"""NGswin x2 on this machine: the FP forward (one LR image) and one DQC step, compile time apart.

    python benchmarks/bench_ngswin.py                      # forward 64x64 LR; DQC step batch 4, 32x32, W2A2
    python benchmarks/bench_ngswin.py --size 64 --batch 2   # the DQC step at the authors' training patch size

The DQC step is timed with its blocks as NGswin's `quick` preset runs them (scanned, activations stored) and
unrolled (the CPU default for SwinIR-light), one after the other in the process.

The published weights when the data root has them (timings do not depend on the values), random ones otherwise.
"""

import argparse
import dataclasses
import functools
import os

import jax

from common import add_keep_scratch_flag, apply_keep_scratch, report, time_compiled
from jaxquant.checkpoint import load_model
from jaxquant.data import default_data_root
from jaxquant.dqc import dqc_step, init_state
from jaxquant.ngswin import NGswin, ngswin
from jaxquant.pipeline import preset
from jaxquant.quant import QuantRules, init_bounds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--forward-size", type=int, default=64, help="LR side of the FP forward (default: 64)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="LR patch side of the DQC step (default: 32)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    add_keep_scratch_flag(p)
    args = p.parse_args()
    apply_keep_scratch(args)

    weights = default_data_root() / "weights" / "ngswin_x2.pth"
    config = ngswin(2)
    if weights.is_file():
        params = load_model(weights).params
    else:
        params = jax.jit(NGswin(config).init)(jax.random.PRNGKey(1), jax.numpy.zeros((1, 32, 32, 3)))["params"]

    image = jax.random.uniform(jax.random.PRNGKey(0), (1, args.forward_size, args.forward_size, 3))
    forward = jax.jit(lambda params, x: NGswin(config).apply({"params": params}, x)[0])
    rows = {f"FP forward, 1 x {args.forward_size}x{args.forward_size} LR": time_compiled(
        forward, params, image, runs=args.runs)}

    images = jax.random.uniform(jax.random.PRNGKey(2), (args.batch, args.size, args.size, 3))
    bounds = init_bounds(config, QuantRules.uniform(args.bits), fill=(-2.0, 2.0))
    quick = dataclasses.replace(preset("quick", "ngswin"), batch=args.batch, patch=args.size).resolved()
    for dqc in (quick, dataclasses.replace(quick, scan=False)):
        step = jax.jit(functools.partial(dqc_step.__wrapped__, config, dqc))  # no donation: every call the same state
        blocks = ("recomputed" if dqc.remat else "stored") + (", scanned" if dqc.scan else ", unrolled")
        rows[f"DQC step, batch {args.batch} x {args.size}x{args.size}, W{args.bits}A{args.bits} ({blocks})"] = (
            time_compiled(step, init_state(bounds, dqc), params, images, runs=args.runs))
    report(f"NGswin x2 (load average {os.getloadavg()[0]:.1f} at the end)", rows)


if __name__ == "__main__":
    main()
