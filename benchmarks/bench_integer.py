"""The low-bit model: file sizes at W2/W3/W4 (float32 and float16 remainder) against the FP params, and forward time
and peak memory of the integer path, fake-quant and FP (x4: a 64x64 LR patch and one Set14 image).

    python benchmarks/bench_integer.py --model runs/x4_w2a2        # a quantized x4 model: its bounds time the paths
    python benchmarks/bench_integer.py --parts                     # where the time goes, one matmul of each kind

Each path runs in its own process (peak resident memory is per process): compile time apart, 2 warm-up calls,
then the median of --runs. Sizes need no calibration: a file's bytes depend on the bit widths only. `--parts`
times each step of one quantized matmul of each kind at the shapes of x4 on a 64x64 LR image, on both paths.
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
from jaxquant.integer import IntegerModel, Operand, centred, container, epilogue, integer_terms  # noqa: E402
from jaxquant.lowbit import fp_bytes, save_lowbit  # noqa: E402
from jaxquant.quant import Bounds, fake_quant, flat_bounds, integer_affine, integer_view, nest_bounds  # noqa: E402

PAPER_RATIO = {4: 3.07, 3: 3.31, 2: 3.60}


def sizes(model) -> list[str]:
    fp = fp_bytes(model)
    rows = ["| bits | float32 remainder | ratio | float16 remainder (--half) | ratio | paper |",
            "|---|---|---|---|---|---|"]
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


# One matmul of each kind at x4 on a 64x64 LR image (64 windows of 64 tokens, 60 channels, 6 heads of 10), and
# how many of it a forward runs (24 blocks).
MATMULS = {
    "q, k, v, proj (x 4)": ((64, 64, 60), (60, 60), (((2,), (0,)), ((), ())), 4 * 24),
    "fc1": ((1, 4096, 60), (60, 120), (((2,), (0,)), ((), ())), 24),
    "fc2": ((1, 4096, 120), (120, 60), (((2,), (0,)), ((), ())), 24),
    "q k^T": ((64, 6, 64, 10), (64, 6, 64, 10), (((3,), (3,)), ((0, 1), (0, 1))), 24),
    "probs v": ((64, 6, 64, 64), (64, 6, 64, 10), (((3,), (2,)), ((0, 1), (0, 1))), 24),
}


def parts(bits: int, runs: int) -> list[str]:
    """Each step of one quantized matmul, fake-quant and integer, in ms (median of `runs`)."""
    key = jax.random.PRNGKey(0)
    rows = ["| matmul (per forward) | fake-quant: quantize both | f32 dot | whole | integer: codes + centre | "
            "int8 dot -> int32 | f32 dot of the codes | sums + epilogue | whole | x a forward: fake, integer |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    totals = [0.0, 0.0]
    for name, (a_shape, b_shape, dims, count) in MATMULS.items():
        ka, kb = jax.random.split(jax.random.fold_in(key, len(rows)))
        x, w = jax.random.normal(ka, a_shape), 0.1 * jax.random.normal(kb, b_shape)
        lus = [jnp.stack([t.min(), t.max()]) for t in (x, w)]
        to_operand = lambda t, lu: Operand(integer_view(t, lu, bits)[0].astype(container(bits)),
                                           *integer_affine(lu, bits))
        a, b = (centred(to_operand(t, lu), c) for t, lu, c in zip((x, w), lus, dims[0]))
        product = jax.lax.dot_general(a.codes, b.codes, dims, preferred_element_type=jnp.int32)
        weight = len(b_shape) == 2  # a weight arrives as codes with its colsums; an activation is quantized here
        if weight:
            b = b._replace(sums=jnp.sum(b.codes, axis=0, keepdims=True, dtype=jnp.int32))

        def integer_whole(x, w):
            ops = (centred(to_operand(x, lus[0]), dims[0][0]),
                   w if weight else centred(to_operand(w, lus[1]), dims[0][1]))
            return epilogue(*ops, *integer_terms(*ops, dims))

        steps = {
            "fake quantize": (lambda x, w: (fake_quant(x, lus[0], bits), fake_quant(w, lus[1], bits)), (x, w)),
            "f32 dot": (lambda x, w: jax.lax.dot_general(x, w, dims), (x, w)),
            "fake whole": (lambda x, w: jax.lax.dot_general(fake_quant(x, lus[0], bits), fake_quant(w, lus[1], bits),
                                                            dims), (x, w)),
            "codes": (lambda x: centred(to_operand(x, lus[0]), dims[0][0]).codes, (x,)),
            "int8 dot": (lambda p, q: jax.lax.dot_general(p, q, dims, preferred_element_type=jnp.int32),
                         (a.codes, b.codes)),
            "f32 codes dot": (lambda p, q: jax.lax.dot_general(p.astype(jnp.float32), q.astype(jnp.float32), dims),
                              (a.codes, b.codes)),
            "epilogue": (lambda a, b, p: epilogue(a, b, p, *integer_terms(a, b, dims)[1:]), (a, b, product)),
            "integer whole": (integer_whole, (x, b if weight else w)),
        }
        ms = {step: 1e3 * time_compiled(jax.jit(fn), *args, runs=runs)["median_s"]
              for step, (fn, args) in steps.items()}
        totals[0] += count * ms["fake whole"]
        totals[1] += count * ms["integer whole"]
        rows.append(f"| {name} | " + " | ".join(f"{ms[k]:.3f}" for k in steps) +
                    f" | {count * ms['fake whole']:.0f}, {count * ms['integer whole']:.0f} |")
    rows.append(f"| all quantized matmuls of a forward | | | | | | | | | {totals[0]:.0f}, {totals[1]:.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a quantized x4 model (run dir, checkpoint or .safetensors)")
    p.add_argument("--parts", action="store_true", help="time each step of one matmul of each kind instead")
    p.add_argument("--bits", type=int, default=2, help="--parts: bit width")
    p.add_argument("--data-root")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--path", help=argparse.SUPPRESS)  # one path in this process: fp, fake-quant or integer
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.parts:
        print(f"{device_name()}, W{args.bits}A{args.bits}, ms (median of {args.runs})\n")
        print("\n".join(parts(args.bits, args.runs)))
        return
    if not args.model:
        p.error("--model is required (or --parts)")
    if args.path:
        print(json.dumps(time_path(args.model, args.path, tuple(json.loads(args.shape)), args.runs)))
        return
    model = load_model(args.model)
    print("\n".join(sizes(model)))
    set14 = load_benchmark(resolve_data_root(args.data_root), "Set14", model.config.upscale)[0]
    shapes = {"64x64 LR": (1, 64, 64, 3), f"Set14 {set14.name} ({set14.lr.shape[1]}x{set14.lr.shape[0]} LR)":
              (1, *set14.lr.shape)}
    print(f"\n{device_name()}\n\n| input | path | compile s | forward median s | min s | peak RSS MiB |\n"
          "|---|---|---|---|---|---|")
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
