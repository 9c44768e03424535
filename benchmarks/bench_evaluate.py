"""Benchmark evaluation of the t291 FP model: compile time, time per image and peak resident memory.

    python benchmarks/bench_evaluate.py --scale 2 --images 10             # Urban100, tiled as evaluate.py chooses
    python benchmarks/bench_evaluate.py --scale 4 --images 10 --tile 0    # whole images

The whole benchmark is read (and decides the tiling, as `evaluate.py` does), its first `--images` evaluated;
the last column scales their median time to the whole benchmark, compilation included once per shape compiled.
"""

import argparse
import statistics
import time

from common import add_keep_scratch_flag, allocator, apply_keep_scratch, device_name, peak_host_memory_gib
from jaxquant.checkpoint import load_model
from jaxquant.data import default_data_root, load_benchmark
from jaxquant.evaluation import DEFAULT_OVERLAP, Tiling, compile_concurrently, forward_compilations, super_resolve


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--dataset", default="Urban100")
    parser.add_argument("--images", type=int, default=10, help="how many of the benchmark's images to time")
    parser.add_argument("--tile", type=int, help="as evaluate.py's --tile (default: chosen by memory)")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP)
    add_keep_scratch_flag(parser)
    args = parser.parse_args()
    apply_keep_scratch(args)
    model = load_model(default_data_root() / "weights" / f"swinir_light_x{args.scale}_t291.pth")
    images = load_benchmark(default_data_root(), args.dataset, args.scale)
    tile = Tiling(args.tile, args.tile_overlap).tile_for(images)
    tiling, timed = Tiling(tile, args.tile_overlap), images[: args.images]

    start = time.perf_counter()
    compilations = forward_compilations(model, {args.dataset: timed}, tiling)
    compile_concurrently(compilations)
    compile_s = time.perf_counter() - start
    seconds = []
    for image in timed:
        start = time.perf_counter()
        super_resolve(model, image.lr, tile, args.tile_overlap)
        seconds.append(time.perf_counter() - start)
    shapes_all = len(forward_compilations(model, {args.dataset: images}, tiling))
    estimate = statistics.median(seconds) * len(images) + compile_s / len(compilations) * shapes_all

    how = f"{tile}x{tile} tiles, overlap {args.tile_overlap}" if tile else "whole images"
    print(f"## {args.dataset} x{args.scale}, FP, {how}, on {device_name()}, {allocator()}")
    print("| images timed | shapes compiled | compile (s) | median s / image | whole benchmark, estimated (s) "
          "| peak resident (GiB) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(timed)} of {len(images)} | {len(compilations)} (of {shapes_all}) | {compile_s:.1f} "
          f"| {statistics.median(seconds):.2f} | {estimate:.0f} | {peak_host_memory_gib():.2f} |")


if __name__ == "__main__":
    main()
