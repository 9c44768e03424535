"""The integer forward against fake-quant on Set5, for quantize runs: every activation site's code agreement
(free running and teacher forced), Set5 PSNR of both forwards, and `scripts/evaluate.py --model FILE` on the run's
low-bit file against the run's own DQC Set5 PSNR.

    python benchmarks/compare_integer.py runs/x4_w2 runs/x2_w2 ... --json compare.json [--noise-floor] [--evaluate]

The forwards run side by side in one batch (`integer.ComparedSites`), one image at a time, whole. `--noise-floor`
adds a second batch of free-running forwards that tells float chaos from an integer-path error: fake-quant with
its matmuls in float64 (numpy, rounded to float32 once), the integer forward on uncentred codes, and fake-quant of
the input moved up by one float32 ulp. It first prints each product's error on random operands (`product_errors`),
then Markdown tables; `--json` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models
from jaxquant.checkpoint import load_model
from jaxquant.data import load_benchmark, resolve_data_root
from jaxquant.integer import (ComparedSites, IntegerModel, Operand, compared_forward, dequantized_product, epilogue,
                              integer_dot_general, integer_terms, load_integer_model)
from jaxquant.metrics import psnr_y, to_uint8
from jaxquant.quant import flat_bounds

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# Products other than the two forwards' own


def numpy_dot_general(a: np.ndarray, b: np.ndarray, dims) -> np.ndarray:
    """`lax.dot_general` in numpy (einsum), in the operands' dtype."""
    (a_contract, b_contract), (a_batch, b_batch) = dims
    letters = iter(string.ascii_letters)
    a_axes = [next(letters) for _ in range(a.ndim)]
    b_axes = [None] * b.ndim
    for i, j in (*zip(a_contract, b_contract), *zip(a_batch, b_batch)):
        b_axes[j] = a_axes[i]
    b_axes = [axis or next(letters) for axis in b_axes]
    out = ([a_axes[i] for i in a_batch] + [a for i, a in enumerate(a_axes) if i not in (*a_contract, *a_batch)]
           + [b for j, b in enumerate(b_axes) if j not in (*b_contract, *b_batch)])
    return np.einsum(f"{''.join(a_axes)},{''.join(b_axes)}->{''.join(out)}", a, b, optimize=True)


def dequantize(op: Operand) -> jax.Array:
    return op.codes.astype(jnp.float32) * op.scale + op.offset


def float64_product(a: Operand, b: Operand, dims) -> jax.Array:
    """Fake-quant's product with the matmul in float64: its float32 dequantized operands, rounded once."""
    x, w = dequantize(a), dequantize(b)
    shape = jax.eval_shape(lambda x, w: jax.lax.dot_general(x, w, dims), x, w)
    host = lambda x, w: numpy_dot_general(np.asarray(x, np.float64), np.asarray(w, np.float64), dims).astype(np.float32)
    return jax.pure_callback(host, shape, x, w)


def uncentred_product(a: Operand, b: Operand, dims) -> jax.Array:
    """The integer product on the codes as stored, >= 0 (`integer.centred` not applied)."""
    return epilogue(a, b, *integer_terms(a, b, dims))


def grouped_epilogue_product(a: Operand, b: Operand, dims) -> jax.Array:
    """The integer product on uncentred codes, its epilogue grouped per operand: s_b (s_a P + l_a C) +
    l_b (s_a R + K l_a)."""
    product, a_sums, b_sums, length = integer_terms(a, b, dims)
    f32 = lambda t: t.astype(jnp.float32)
    return (b.scale * (a.scale * f32(product) + a.offset * f32(b_sums))
            + b.offset * (a.scale * f32(a_sums) + jnp.float32(length) * a.offset))


def float64_epilogue_product(a: Operand, b: Operand, dims) -> jax.Array:
    """The integer product with the epilogue in float64 (numpy), rounded to float32 once: the most an epilogue
    can do."""
    product, a_sums, b_sums, length = integer_terms(a, b, dims)

    def host(*terms):  # (callbacks may receive jax arrays: numpy float64 before any arithmetic)
        p, r, c, sa, la, sb, lb = (np.asarray(t, np.float64) for t in terms)
        return (sa * sb * p + sa * lb * r + la * sb * c + length * la * lb).astype(np.float32)

    shape = jax.ShapeDtypeStruct(product.shape, jnp.float32)
    return jax.pure_callback(host, shape, product, a_sums, b_sums, a.scale, a.offset, b.scale, b.offset)


# Forwards side by side, one batch each: the comparison (free running, and the integer forward teacher
# forced by the fake-quant one), and --noise-floor's (free running; the one-ulp forward is fake-quant's product on
# a moved input).
COMPARISON = {"fake-quant": dequantized_product, "integer": integer_dot_general}
NOISE_FLOOR = {"fake-quant": dequantized_product, "fake-quant float64 matmuls": float64_product,
               "integer": integer_dot_general, "integer uncentred": uncentred_product,
               "fake-quant input +1 ulp": dequantized_product}
MOVED_INPUT = "fake-quant input +1 ulp"
PRODUCTS = {"fake-quant (float32 matmul)": dequantized_product, "integer": integer_dot_general,
            "integer uncentred": uncentred_product, "integer uncentred, grouped epilogue": grouped_epilogue_product,
            "integer float64 epilogue": float64_epilogue_product, "fake-quant float64 matmul": float64_product}


def product_errors(bits: int = 4, rows: int = 500, length: int = 120, out: int = 60) -> list[str]:
    """RMS error of each product against the exact one (float64 of the real dequantized values), relative to a
    correctly rounded float32 result's, on random codes at a few (scale, offset) pairs of SwinIR-like ranges."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**bits, (rows, length)).astype(np.int8)
    b = rng.integers(0, 2**bits, (length, out)).astype(np.int8)
    dims = (((1,), (0,)), ((), ()))
    lines = ["| x: scale, offset | w: scale, offset | " + " | ".join(PRODUCTS) + " |",
             "|---|---|" + "---|" * len(PRODUCTS)]
    for sa, la, sb, lb in [(0.037, -0.61, 0.0052, -0.043), (0.02, 0.0, 0.004, -0.03), (0.01, -0.08, 0.003, -0.01),
                           (0.1, -0.7, 0.01, -0.08)]:
        sa, la, sb, lb = (np.float32(t) for t in (sa, la, sb, lb))
        exact = (np.float64(sa) * a + np.float64(la)) @ (np.float64(sb) * b + np.float64(lb))
        rms = lambda y: float(np.sqrt(np.mean((np.asarray(y, np.float64) - exact) ** 2)))
        rounded = rms(exact.astype(np.float32))
        x, w = (Operand(jnp.asarray(c), jnp.float32(s), jnp.float32(l)) for c, s, l in ((a, sa, la), (b, sb, lb)))
        errors = [rms(jax.jit(product, static_argnums=2)(x, w, dims)) / rounded for product in PRODUCTS.values()]
        lines.append(f"| {sa:g}, {la:g} | {sb:g}, {lb:g} | " + " | ".join(f"{e:.1f}" for e in errors) + " |")
    return lines


# ----------------------------------------------------------------------------------------------------------
# One run


def compare_run(run_dir: Path, data_root: Path, noise_floor: bool, only: list[str] | None = None) -> dict:
    model = load_model(run_dir)
    lowbit = low_bit_file(run_dir)
    integer = load_integer_model(lowbit) if lowbit else IntegerModel.from_model(model)
    bits = sorted({b.bits for b in flat_bounds(model.bounds).values()})
    images = [image for image in load_benchmark(data_root, "Set5", model.config.upscale)
              if only is None or image.name in only]
    if not images or (only and len(images) != len(only)):
        names = ", ".join(image.name for image in load_benchmark(data_root, "Set5", model.config.upscale))
        sys.exit(f"error: --images {','.join(only)}: Set5's images are {names}")
    result = {"run": str(run_dir), "scale": model.config.upscale, "bits": bits, "images": [i.name for i in images],
              "low_bit_file": lowbit and lowbit.name, "set5_psnr": {}, "agreement": {}}
    start = time.perf_counter()
    for sites in (COMPARISON, NOISE_FLOOR) if noise_floor else (COMPARISON,):
        psnr, agreement = compare_forwards(model.config, integer.variables, images, sites, sites is COMPARISON)
        result["set5_psnr"] |= psnr
        result["agreement"] |= agreement
    return result | {"seconds": round(time.perf_counter() - start, 1)}


def compare_forwards(config, variables, images, forwards: dict, teacher_forced: bool) -> tuple[dict, dict]:
    """The `forwards` side by side on each image: Set5 PSNR of each free-running one, and the agreement summary."""
    names = list(forwards)
    sites = ComparedSites(tuple(forwards.values()), teacher_forced)
    copy_names = names + [f"{name} (teacher forced)" for name in names[1:] if teacher_forced]  # `ComparedSites`' order
    scale, psnrs, counts = config.upscale, {name: [] for name in names}, {}
    for image in images:
        x = jnp.asarray(image.lr, jnp.float32)[None] / 255.0
        h, w = x.shape[1:3]
        batch = np.repeat(np.asarray(models.architecture(config).test_pad(config, x)), sites.copies, 0)
        for i, name in enumerate(copy_names):
            if name.startswith(MOVED_INPUT):
                batch[i] = np.nextafter(batch[i], np.float32(2))
        out, agreement = compared_forward(config, variables, jnp.asarray(batch), sites)
        out = np.asarray(out[:, : h * scale, : w * scale])
        for i, name in enumerate(names):
            psnrs[name].append(psnr_y(to_uint8(out[i]), image.hr, scale))
        for path, matrix in agreement.items():
            counts[path] = counts.get(path, 0) + matrix.astype(np.int64)
        print(f"  {image.name}: {', '.join(names)}", flush=True)
    return {name: float(np.mean(v)) for name, v in psnrs.items()}, agreement_summary(counts, copy_names)


def low_bit_file(run_dir: Path) -> Path | None:
    files = sorted(run_dir.glob("model_w*a*.safetensors"))
    return files[0] if files else None


def agreement_summary(counts: dict[str, np.ndarray], copy_names: list[str]) -> dict:
    """Each forward against the reference (the first) and each free-running pair: the share of all codes that
    agree, the worst site and its share."""
    free = [i for i, name in enumerate(copy_names) if "teacher forced" not in name]
    pairs = [(0, i) for i in range(1, len(copy_names))] + [(i, k) for i in free[1:] for k in free if k > i]
    summary = {}
    for r, i in pairs:
        shares = {path: matrix[r, i] / matrix[r, r] for path, matrix in counts.items()}
        worst = min(shares, key=shares.get)
        agree = sum(int(m[r, i]) for m in counts.values())
        total = sum(int(m[r, r]) for m in counts.values())
        summary[f"{copy_names[i]} vs {copy_names[r]}"] = {
            "all_codes": agree / total, "worst_site": worst, "worst": float(shares[worst]),
            "disagreeing_codes": total - agree, "codes": total, "sites": len(counts)}
    return summary


def evaluate_file(run_dir: Path, data_root: Path) -> dict:
    """`scripts/evaluate.py --model FILE` (the run's low-bit file) on Set5, against the run's own DQC Set5 PSNR."""
    results = json.loads((run_dir / "results.json").read_text())
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "evaluate.json"
        command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model", str(low_bit_file(run_dir)),
                   "--datasets", "Set5", "--data-root", str(data_root), "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        psnr = json.loads(out.read_text())["results"]["Set5"]["psnr"]
    return {"evaluate_model_file_set5_psnr": psnr,
            "run_set5_psnr": results["results"][results["final_bounds"]]["Set5"]["psnr"]}


# ----------------------------------------------------------------------------------------------------------


def tables(results: list[dict]) -> list[str]:
    """The issue's comparison per run, then every pair --noise-floor compared."""
    rows = ["| run | Set5 PSNR fake-quant | integer | difference | codes agreeing, free running: all | worst site "
            "| worst | teacher forced: worst site | worst | evaluate.py --model FILE | the run's own | difference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = ["| run | forward | against | codes agreeing: all | worst site | worst |", "|---|---|---|---|---|---|"]
    for r in results:
        label = f"x{r['scale']} W{r['bits'][0]}A{r['bits'][0]}"
        fake, integer = r["set5_psnr"]["fake-quant"], r["set5_psnr"]["integer"]
        free, forced = r["agreement"]["integer vs fake-quant"], r["agreement"]["integer (teacher forced) vs fake-quant"]
        file = (f"{r['evaluate_model_file_set5_psnr']:.4f} | {r['run_set5_psnr']:.4f} | "
                f"{r['evaluate_model_file_set5_psnr'] - r['run_set5_psnr']:+.4f}" if "run_set5_psnr" in r else "| |")
        rows.append(f"| {label} | {fake:.4f} | {integer:.4f} | {integer - fake:+.4f} | "
                    f"{100 * free['all_codes']:.4f}% | "
                    f"{free['worst_site']} | {100 * free['worst']:.3f}% | {forced['worst_site']} | "
                    f"{100 * forced['worst']:.4f}% | {file} |")
        for key, a in r["agreement"].items():
            forward, reference = key.split(" vs ")
            pairs.append(f"| {label} | {forward} | {reference} | {100 * a['all_codes']:.4f}% | {a['worst_site']} | "
                         f"{100 * a['worst']:.4f}% |")
    return rows + [""] + pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="quantize run directories (with results.json)")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--noise-floor", action="store_true", help="add the float64 / one-ulp / other-epilogue forwards")
    p.add_argument("--evaluate", action="store_true", help="also run evaluate.py --model on each run's low-bit file")
    p.add_argument("--images", help="comma-separated Set5 image names (default: all five)")
    p.add_argument("--data-root")
    args = p.parse_args()
    data_root = resolve_data_root(args.data_root)
    print("Products' RMS error against the exact product, in units of a correctly rounded float32 result's (random "
          "4-bit codes, K = 120):\n" + "\n".join(product_errors()) + "\n", flush=True)
    results = []
    for run_dir in args.runs:
        if not (run_dir / "results.json").is_file():
            sys.exit(f"error: {run_dir}: no results.json (not a finished quantize run)")
        result = compare_run(run_dir, data_root, args.noise_floor, args.images and args.images.split(","))
        if args.evaluate:
            result |= evaluate_file(run_dir, data_root)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print("\n".join(tables(results)))


if __name__ == "__main__":
    main()
