"""The low-bit model: file sizes at W2/W3/W4 (float32 and float16 remainder) against the FP params, and forward time
and peak memory of the integer path, fake-quant and FP (x4: a 64x64 LR patch and one Set14 image).

    python benchmarks/bench_integer.py --model runs/x4_w2a2        # a quantized x4 model: its bounds time the paths

Each path runs in its own process (peak resident memory is per process): compile time apart, 2 warm-up calls,
then the median of --runs. Sizes need no calibration: a file's bytes depend on the bit widths only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, time_compiled  # noqa: E402

from jaxquant.checkpoint import load_model  # noqa: E402
from jaxquant.data import load_benchmark, resolve_data_root  # noqa: E402
from jaxquant.evaluation import _forward, forward_site, variables  # noqa: E402
from jaxquant.integer import IntegerModel  # noqa: E402
from jaxquant.lowbit import fp_bytes, save_lowbit  # noqa: E402
from jaxquant.quant import Bounds, flat_bounds, nest_bounds  # noqa: E402

PAPER_RATIO = {4: 3.07, 3: 3.31, 2: 3.60}


def sizes(model) -> list[str]:
    fp = fp_bytes(model)
    rows = ["| bits | float32 remainder | ratio | float16 remainder (--half) | ratio | paper |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for bits in (4, 3, 2):
            rebitted = nest_bounds({p: Bounds(b.lu, bits) for p, b in flat_bounds(model.bounds).items()})
            full = save_lowbit(Path(folder) / f"w{bits}.safetensors", model._replace(bounds=rebitted))
            half = save_lowbit(Path(folder) / f"w{bits}h.safetensors", model._replace(bounds=rebitted), half=True)
            rows.append(f"| W{bits}A{bits} | {full:,} | {fp / full:.2f}x | {half:,} | {fp / half:.2f}x | "
                        f"{PAPER_RATIO[bits]:.2f}x |")
    return [f"FP params in float32: {fp:,} bytes", *rows]


def time_path(model_source: str, path: str, shape: tuple[int, ...], runs: int) -> dict:
    model = load_model(model_source)
    model = {"fp": model._replace(bounds=None), "fake-quant": model, "integer": IntegerModel.from_model(model)}[path]
    x = jax.random.uniform(jax.random.PRNGKey(0), shape, jnp.float32)
    forward = jax.jit(lambda v, x: _forward(model.config, forward_site(model), v, x))  # what evaluate() runs
    result = time_compiled(forward, variables(model), x, runs=runs)
    return result | {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a quantized x4 model (run dir, checkpoint or .safetensors)")
    p.add_argument("--data-root")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--path", help=argparse.SUPPRESS)  # one path in this process: fp, fake-quant or integer
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(time_path(args.model, args.path, tuple(json.loads(args.shape)), args.runs)))
        return
    model = load_model(args.model)
    print("\n".join(sizes(model)))
    set14 = load_benchmark(resolve_data_root(args.data_root), "Set14", model.config.upscale)[0]
    shapes = {"64x64 LR": (1, 64, 64, 3), f"Set14 {set14.name} ({set14.lr.shape[1]}x{set14.lr.shape[0]} LR)":
              (1, *set14.lr.shape)}
    print(f"\n{device_name()}\n\n| input | path | compile s | forward median s | min s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for label, shape in shapes.items():
        for path in ("fp", "fake-quant", "integer"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--runs", str(args.runs),
                                  "--path", path, "--shape", json.dumps(shape)], capture_output=True, text=True,
                                 check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {label} | {path} | {r['compile_s']:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                  f"{r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
