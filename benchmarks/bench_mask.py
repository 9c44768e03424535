"""What the shifted-window mask costs per image size: the bytes of masks a process keeps for a benchmark's
image shapes, and the size, compile time and run time of one forward's program.

    python benchmarks/bench_mask.py                      # Urban100 at x2 (its largest image compiled)
    python benchmarks/bench_mask.py --dataset B100 --scale 4

A mask held as a constant (an (nW, 64, 64) float32 array per image size, cached process-wide) is baked into
each compiled program; built in the graph, it is neither kept nor part of the program text.
"""

import argparse
import time

import jax
import numpy as np

from common import add_keep_scratch_flag, apply_keep_scratch, device_name, peak_host_memory_gib
from jaxquant.data import default_data_root, load_benchmark
from jaxquant.swinir import SwinIR, shifted_window_mask, swinir_light


def padded(n: int, ws: int) -> int:
    return n + -n % ws


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="Urban100")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    add_keep_scratch_flag(parser)
    args = parser.parse_args()
    apply_keep_scratch(args)
    config = swinir_light(args.scale)
    ws = config.window_size
    images = load_benchmark(args.data_root or default_data_root(), args.dataset, args.scale)
    shapes = sorted({(padded(i.lr.shape[0], ws), padded(i.lr.shape[1], ws)) for i in images})
    cached = hasattr(shifted_window_mask, "cache_info")  # a mask kept per image size, as a numpy constant
    kept = sum(np.asarray(shifted_window_mask(h, w, ws, ws // 2)).nbytes for h, w in shapes) if cached else 0

    largest = max(images, key=lambda i: i.lr.size).lr
    x = jax.numpy.asarray(largest[None], jax.numpy.float32) / 255
    model = SwinIR(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:, :16, :16])
    forward = jax.jit(lambda p, x: model.apply(p, x)[0])
    start = time.perf_counter()
    lowered = forward.lower(params, x)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, x))
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    run_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    print(f"## shifted-window masks, {args.dataset} x{args.scale} on {device_name()}")
    print(f"- masks a process keeps for its {len(shapes)} padded LR shapes: {kept / 2**30:.3f} GiB "
          f"({'cached constants' if cached else 'none: built in the graph'})")
    print(f"- forward of the largest image, LR {largest.shape[:2]}: program text {len(lowered.as_text()) / 2**20:.2f} MB, "
          f"lowering {lower_s:.1f} s, compile {compile_s:.1f} s, run {run_s:.1f} s, "
          f"constants {getattr(memory, 'constant_size_in_bytes', 0) / 2**20:.1f} MB, "
          f"temp {getattr(memory, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB; peak host memory {peak_host_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
