"""Evaluate a model (checkpoint, `.pth`, or quantize run directory) on benchmark datasets.

    python scripts/evaluate.py --model ../shared/data/weights/swinir_light_x2_t291.pth --datasets Set5,Set14
    python scripts/evaluate.py --model runs/x4_w2a2 --datasets all     # every benchmark in the data root
"""

import argparse
import json
from pathlib import Path

import jax

from jaxquant.checkpoint import load_model
from jaxquant.integer import load_integer_model
from jaxquant.cli import add_devices_flag, add_matmul_precision_flag, add_tiling_flags, main_guard
from jaxquant.cpu_memory import keep_cpu_scratch
from jaxquant.data import benchmark_names, check_output_path, load_benchmarks, resolve_data_root
from jaxquant.evaluation import Tiling, evaluate, results_table
from jaxquant.models import describe
from jaxquant.parallel import data_mesh, describe as describe_devices, initialize_distributed


def check_outputs(out: Path | None, images_dir: Path | None, datasets: list[str]) -> None:
    """Refuse output paths that cannot be written now, not after the whole evaluation."""
    if out:
        check_output_path(out)
    if images_dir:
        check_output_path(images_dir, folder=True)
        for dataset in datasets:  # the images go to <images_dir>/<dataset>/<image>.png
            if out and overlaps(out, images_dir / dataset):
                raise ValueError(f"--out {out} collides with the {dataset} images saved in {images_dir / dataset}")


def overlaps(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are the same path or one lies inside the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


@main_guard
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model checkpoint, .pth or low-bit .safetensors file, or "
                        "quantize run directory")
    parser.add_argument("--integer", action="store_true", help="run the integer forward (a quantized model's "
                        "matmuls on its integer codes: jaxquant.integer) instead of fake quantization")
    parser.add_argument("--datasets", default="Set5", help="comma-separated benchmark names, or all (every one in "
                        "the data root; default: Set5)")
    parser.add_argument("--data-root", help="data root (default: $JAXQUANT_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, help="write per-image and mean results here (JSON)")
    parser.add_argument("--save-images", type=Path, metavar="DIR", help="write the SR images here")
    add_tiling_flags(parser)
    add_matmul_precision_flag(parser)
    add_devices_flag(parser)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    tiling = Tiling(args.tile, args.tile_overlap)
    root = resolve_data_root(args.data_root)
    datasets = benchmark_names(args.datasets, root)
    check_outputs(args.out, args.save_images, datasets)
    mesh = data_mesh(args.devices)  # images spread over its devices, one a device at a time
    model = load_integer_model(args.model) if args.integer else load_model(args.model)
    kind = "integer" if args.integer else "FP" if model.bounds is None else "quantized"
    print(f"{describe(model.config)}, {kind}, matmul precision {args.matmul_precision}, {describe_devices(mesh)}")
    benchmarks = load_benchmarks(root, datasets, model.config.upscale)
    results = evaluate(model, benchmarks, tiling=tiling, save_dir=args.save_images, devices=mesh.local_devices)
    print(results_table({kind: results}, datasets))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "kind": kind,
                                        "matmul_precision": args.matmul_precision, "results": results}, indent=2))
        print(f"results -> {args.out}")


if __name__ == "__main__":
    initialize_distributed()  # a multi-host run, where the coordinator's environment says so (docs/scaling.md)
    keep_cpu_scratch()  # the process is the script's own: each forward's scratch is not faulted in afresh
    main()
