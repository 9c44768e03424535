"""Quantize SwinIR-light or NGswin with 2DQuant: calibrate the bounds (DOBI by default), distill them (DQC),
evaluate.

    python scripts/quantize.py --bits 2                   # x4 t291 model, DOBI + DQC, Set5, runs/x4_w2a2
    python scripts/quantize.py --bits 4 --scale 2 --no-dqc --method minmax
    python scripts/quantize.py --resume runs/x4_w2a2      # continue a killed run where it stopped
    python scripts/quantize.py --resume runs/x4_w2a2 --datasets B100   # a finished run evaluated on B100 too
    python scripts/quantize.py --model ../shared/data/weights/ngswin_x2.pth --scale 2 --bits 2   # NGswin (docs/ngswin.md)
    python scripts/quantize.py --bits 2 --preset paper --loss paper --b2 0.999 --cosine --steps 3000 --batch 32
                                                          # the paper's DQC settings (the preset: the official code's)
"""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import get_args

from jaxquant.cli import add_devices_flag, add_matmul_precision_flag, add_tiling_flags, main_guard
from jaxquant.cpu_memory import keep_cpu_scratch
from jaxquant.dobi import Strategy
from jaxquant.data import benchmark_names, resolve_data_root
from jaxquant.evaluation import results_table
from jaxquant.pipeline import (
    CALIB_PATCHES, CONFIG_FILE, INITS, PRESETS, VALIDATE_EVERY, QuantizeConfig, architecture_of, default_preset,
    quantize_run, preset as preset_of,
)
from jaxquant.parallel import initialize_distributed
from jaxquant.runs import interrupted_run


# Flags that make others meaningless; giving both is an error rather than a silently ignored setting.
DQC_FLAGS = {"--preset", "--steps", "--batch", "--lr", "--weight-lr", "--b2", "--cosine", "--loss", "--feature-weight",
             "--train-dir", "--remat", "--no-remat", "--scan", "--no-scan"}
CALIBRATION_FLAGS = {"--method", "--dobi-strategy", "--percentile", "--calib", "--calib-patches", "--compare"}
IGNORED_WITH = {
    "--resume": DQC_FLAGS | CALIBRATION_FLAGS | {"--no-dqc", "--bits", "--scale", "--model", "--import-bounds",
                                                  "--export-bounds", "--run-dir", "--seed", "--tile", "--tile-overlap",
                                                  "--matmul-precision", "--devices"},
    "--no-dqc": DQC_FLAGS,
    "--import-bounds": CALIBRATION_FLAGS,
}


def ignored_by_values(args) -> dict[str, str]:
    """The flags that the values of others make meaningless, each with the reason."""
    rules = {
        "--dobi-strategy": (args.method != "dobi", f"--method {args.method}"),
        "--percentile": ("percentile" not in (args.method, *args.compare.split(",")),
                         f"--method {args.method} and no percentile in --compare"),
        "--calib-patches": (bool(args.calib) and Path(args.calib).is_file(), "a --calib file (only folders are "
                            "sampled)"),
        "--feature-weight": (args.loss != "paper", f"--loss {args.loss}"),
    }
    return {flag: reason for flag, (ignored, reason) in rules.items() if ignored}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=2, help="weight and activation bits (W=A)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    p.add_argument("--model", help="checkpoint, run directory or .pth, SwinIR or NGswin (read off the "
                   "keys) (default: <data root>/weights/swinir_light_x<scale>_t291.pth)")
    p.add_argument("--method", choices=("minmax", "percentile", "dobi"), default="dobi", help="bound initialisation")
    p.add_argument("--dobi-strategy", choices=get_args(Strategy), default="official", help="official: symmetric "
                   "candidates at every site (the official code); paper: one-sided at the softmax output and fc2 "
                   "input, stepping by R/(2K); official-one-sided: the same sites stepping by R/K (the official "
                   "code's unused one_direction branch)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--calib", help="image folder, .npy/.npz (N,3,H,W) in [0,1], or cali_data_x<s>.pth (default: <data root>/calib)")
    p.add_argument("--calib-patches", type=int, help="patches sampled from a calibration folder (default: by preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"DQC settings (default: by backend, now {default_preset()})")
    p.add_argument("--no-dqc", action="store_true", help="stop after the bound initialisation")
    p.add_argument("--steps", type=int, help="DQC steps (overrides the preset, as do the next five)")
    p.add_argument("--batch", type=int, help="DQC patches per step, over all devices")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--weight-lr", type=float, help="learning rate of the weight sites' bounds (default: --lr, as "
                   "the official code; the ngswin preset lowers it)")
    p.add_argument("--b2", type=float, help="Adam beta2 (the official code: 0.99, the paper: 0.999)")
    p.add_argument("--cosine", action="store_true", default=None,
                   help="cosine-decay the learning rate to 0 (the paper; the official code keeps it constant)")
    p.add_argument("--loss", choices=("official", "paper"), default="official", help="DQC loss")
    p.add_argument("--feature-weight", type=float, default=1.0, help="feature term weight of the paper loss")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, help="recompute the student's Swin blocks in "
                   "DQC's backward pass instead of storing their activations (default: by backend; neither this nor "
                   "--scan changes the arithmetic, only its rounding; README \"Memory and speed\")")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, help="run the Swin blocks as a lax.scan "
                   "(default: by backend)")
    p.add_argument("--train-dir", help="HR images for DQC patches (default: <data root>/train/t291)")
    p.add_argument("--datasets", help="comma-separated benchmarks to evaluate, or all (every one in the data root; "
                   "default: Set5); with --resume, added to the run's: a finished run evaluates those it lacks alone")
    add_tiling_flags(p)
    p.add_argument("--compare", default="minmax", help="other initialisations to evaluate: comma-separated of "
                   f"{', '.join(INITS)} (default: minmax)")
    p.add_argument("--import-bounds", help="JSON {official quantizer name: [l, u]} to start from instead of calibrating")
    p.add_argument("--export-bounds", help="write the final bounds here as JSON, keyed by official quantizer names")
    p.add_argument("--data-root", help="data root (default: $JAXQUANT_DATA or ../shared/data)")
    p.add_argument("--run-dir", type=Path, help="output folder (default: runs/x<scale>_w<bits>a<bits>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR with its settings")
    p.add_argument("--seed", type=int, default=0, help="draws the calibration patches from an image folder and "
                   "the DQC batches (default: 0)")
    add_matmul_precision_flag(p)
    add_devices_flag(p)
    args = p.parse_args()
    given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    for flag, ignored in IGNORED_WITH.items():
        if flag in given and given & ignored:
            p.error(f"with {flag}, {' '.join(sorted(given & ignored))} would be ignored; drop them")
    for flag, reason in ignored_by_values(args).items():
        if flag in given:
            p.error(f"with {reason}, {flag} would be ignored; drop it")
    return args


def config_from_args(args, data_root: Path) -> tuple[QuantizeConfig, str | None]:
    preset = None if args.no_dqc else (args.preset or default_preset())
    dqc = None
    if preset:
        overridable = ("steps", "batch", "lr", "weight_lr", "b2", "cosine", "remat", "scan")
        overrides = {k: getattr(args, k) for k in overridable if getattr(args, k) is not None}
        dqc = dataclasses.replace(preset_of(preset, architecture_of(args.model)), loss=args.loss,
                                  feature_weight=args.feature_weight, **overrides)
    count, size = CALIB_PATCHES[preset or "paper"]
    every = VALIDATE_EVERY[preset or "paper"]
    return QuantizeConfig(
        bits=args.bits, scale=args.scale, model=args.model, method=args.method, strategy=args.dobi_strategy,
        percentile=args.percentile, calib=args.calib, calib_patches=count if args.calib_patches is None else args.calib_patches,
        calib_size=size, dqc=dqc, train_dir=args.train_dir, validate_every=every, checkpoint_every=every,
        datasets=tuple(benchmark_names(args.datasets or "Set5", data_root)), tile=args.tile,
        tile_overlap=args.tile_overlap, import_bounds=args.import_bounds,
        compare=tuple(c for c in args.compare.split(",") if c), export_bounds=args.export_bounds, seed=args.seed,
        matmul_precision=args.matmul_precision, devices=args.devices,
    ), preset


@main_guard
def main():
    args = parse_args()
    root = resolve_data_root(args.data_root)
    if args.resume:
        run_dir, run = args.resume, QuantizeConfig.load(args.resume)
        if args.datasets:
            run = run.evaluated_on(benchmark_names(args.datasets, Path(run.data_root or root)))
        print(f"resuming {run_dir}")
    else:
        run, preset = config_from_args(args, root)
        run_dir = args.run_dir or Path("runs") / f"x{run.scale}_w{run.bits}a{run.bits}"
        print(f"DQC preset: {preset or 'none'}" + ("" if args.preset or args.no_dqc else " (chosen by backend)"))
    print(f"matmul precision: {run.matmul_precision}")
    try:
        results = quantize_run(run, run_dir, root, resume=bool(args.resume))
    except KeyboardInterrupt as stopped:
        sys.exit(interrupted_run(stopped, run_dir, CONFIG_FILE, "scripts/quantize.py"))
    print(results_table(results["results"], run.datasets))
    if results["dqc"]:
        print(f"DQC bounds kept from step {results['dqc']['best_step']} (best Set5 PSNR during validation)")
    print(f"ran on {results['devices']}")
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    initialize_distributed()  # a multi-host run, where the coordinator's environment says so (docs/scaling.md)
    keep_cpu_scratch()  # the process is the script's own; before parse_args, whose --help asks JAX for the backend
    main()
