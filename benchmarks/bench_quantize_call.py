"""What `jaxquant.quantize(params, bounds)` costs a call, before any forward: reading the config off the params,
checking every param's shape and every site's bounds.

    python benchmarks/bench_quantize_call.py            # SwinIR-light x4, W4A4
"""

import argparse
import statistics
import time

import jax
import numpy as np

from common import device_name
from jaxquant.checkpoint import load_model
from jaxquant.data import default_data_root
from jaxquant.quant import QuantRules, init_bounds, quantize


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = load_model(default_data_root() / "weights" / f"swinir_light_x{args.scale}_t291.pth")
    bounds = jax.tree.map(lambda lu: np.asarray([-1.0, 1.0], np.float32),
                          init_bounds(model.config, QuantRules.uniform(4), fill=(-1.0, 1.0)))
    quantize(model.params, bounds)  # warm-up
    read = median_seconds(lambda: quantize(model.params, bounds), args.runs)
    given = median_seconds(lambda: quantize(model.params, bounds, model.config), args.runs)
    print(f"## quantize() call, SwinIR-light x{args.scale} W4A4, on {device_name()}")
    print(f"- median of {args.runs} calls: config read off the params {read:.3f} s, config given {given:.3f} s")


if __name__ == "__main__":
    main()
