"""Convert a SwinIR (official layout) or NGswin (its authors' layout) `.pth` into a jaxquant model checkpoint.

    python scripts/convert.py ../shared/data/weights/swinir_light_x2_t291.pth -o checkpoints/x2
"""

import argparse
from pathlib import Path

import jax

from jaxquant.checkpoint import load_model, save_model
from jaxquant.cli import main_guard
from jaxquant.data import check_output_path
from jaxquant.models import describe


@main_guard
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pth", type=Path, help="PyTorch SwinIR or NGswin weights (.pth; the architecture is read "
                        "off the keys)")
    parser.add_argument("-o", "--out", type=Path, help="checkpoint directory (default: checkpoints/<file stem>)")
    parser.add_argument("--param-key", help="entry holding the state dict (default: params, then params_ema)")
    args = parser.parse_args()
    out = args.out or Path("checkpoints") / args.pth.stem
    if out.exists():  # saving replaces a checkpoint folder whole, whatever else it holds
        raise FileExistsError(f"{out} exists; choose another path or remove it")
    check_output_path(out, folder=True)
    if args.param_key is not None and args.pth.is_dir():
        raise ValueError(f"--param-key applies to a .pth file; {args.pth} is a folder")
    model = load_model(args.pth, args.param_key)
    out = save_model(out, model)
    count = sum(x.size for x in jax.tree.leaves(model.params))
    print(f"{describe(model.config)}, {count:,} parameters -> {out}")


if __name__ == "__main__":
    main()
