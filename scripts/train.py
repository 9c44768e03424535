"""Train SwinIR-light in full precision on HR images (default: the t291 set); see `jaxquant.train`.

    python scripts/train.py --scale 2 --run-dir runs/x2
    python scripts/train.py --scale 4 --init runs/x2 --run-dir runs/x4
    python scripts/train.py --resume runs/x2            # continue a killed run, bit-for-bit
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from jaxquant.cli import add_devices_flag, add_matmul_precision_flag, main_guard
from jaxquant.data import list_images, resolve_data_root
from jaxquant.parallel import initialize_distributed
from jaxquant.runs import interrupted_run
from jaxquant.train import CONFIG_FILE, TrainConfig, load_config, preset, train

# flags named after TrainConfig fields; with --resume none may be given (the run dir holds the config)
CONFIG_FLAGS = ("scale", "steps", "batch", "lr", "warmup", "bf16", "remat", "val_every", "ckpt_every", "init", "seed",
                "data_root", "train_dir", "matmul_precision", "devices")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=None, help="upscaling factor (default 2)")
    p.add_argument("--data-root", help="holds benchmark/Set5 (default: $JAXQUANT_DATA or ../shared/data)")
    p.add_argument("--train-dir", help="folder of HR training images (default: <data-root>/train/t291)")
    p.add_argument("--steps", type=int, help="total steps (preset: 1278 at x2, 380 at x3/x4)")
    p.add_argument("--batch", type=int, help="patches per step, over all devices (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--warmup", type=int, help="linear warmup steps, must be < --steps (preset: 100 at x2, 20)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 compute, float32 params and loss")
    p.add_argument("--no-remat", dest="remat", action="store_false", default=None,
                   help="store block activations instead of recomputing them (faster where memory allows)")
    p.add_argument("--val-every", type=int, help="Set5 validation interval in steps; 0: none")
    p.add_argument("--ckpt-every", type=int, help="checkpoint interval in steps")
    p.add_argument("--init", help="start from this model (.pth, model checkpoint or run dir); an x2 body fits x3/x4")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", type=Path, help="output folder (default: runs/train_x<scale>_<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR with its own config")
    add_matmul_precision_flag(p, default=None)
    add_devices_flag(p)
    args = p.parse_args(argv)
    spelled = {"remat": "no-remat"}
    given = [f"--{spelled.get(flag, flag.replace('_', '-'))}" for flag in (*CONFIG_FLAGS, "run_dir")
             if getattr(args, flag) is not None]
    if args.resume and given:
        p.error(f"--resume takes the config from RUN_DIR; drop {' '.join(given)}")
    return args


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Preset for --scale, overridden by the flags given; paths resolved so the run dir stands alone."""
    data_root = resolve_data_root(args.data_root)
    overrides = {flag: getattr(args, flag) for flag in CONFIG_FLAGS if getattr(args, flag) is not None}
    train_dir = Path(args.train_dir) if args.train_dir else data_root / "train" / "t291"
    list_images(train_dir)  # a missing folder, a file or one without images: one line, before any work
    if args.init and not Path(args.init).exists():
        raise FileNotFoundError(f"--init {args.init} does not exist")
    overrides |= {"data_root": str(data_root.resolve()), "train_dir": str(train_dir.resolve())}
    if args.init:
        overrides["init"] = str(Path(args.init).resolve())
    return dataclasses.replace(preset(args.scale or 2), **overrides)


@main_guard
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.resume) if args.resume else build_config(args)
    run_dir = args.resume or args.run_dir or Path("runs") / f"train_x{cfg.scale}_{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        results = train(cfg, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt as stopped:
        sys.exit(interrupted_run(stopped, run_dir, CONFIG_FILE, "scripts/train.py"))
    psnr = results["set5_psnr_y"]
    where = f" on {results['devices']}" if "devices" in results else ""  # runs finished before it was recorded
    print(f"done{where}: {run_dir / 'model'}" + ("" if psnr is None else f", Set5 PSNR-Y {psnr:.2f} dB"))


if __name__ == "__main__":
    initialize_distributed()  # a multi-host run, where the coordinator's environment says so (docs/scaling.md)
    main()
