"""Export a model: to its authors' `.pth` layout (readable by torch.load: SwinIR's official {"params": state_dict},
NGswin's bare state dict), or to a low-bit `.safetensors` file (`jaxquant.lowbit`); the extension picks.

    python scripts/export.py runs/x2 -o swinir_x2.pth
    python scripts/export.py runs/x4_w2a2 -o model_w2a2.safetensors --half

Any `load_model` source works (run dir, model checkpoint, .pth, .safetensors). A `.pth` holds full-precision params
only: a quantized model's bounds have no place in the state dict and are left out (with a note). A `.safetensors`
file holds a quantized model's weights as packed codes with every site's bounds, an FP model's params as floats;
`--half` stores the float params in float16 where that moves Set5 PSNR by at most 0.005 dB (measured, printed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxquant.checkpoint import load_model
from jaxquant.cli import main_guard
from jaxquant.data import check_output_path, load_benchmark, resolve_data_root
from jaxquant.lowbit import HALF_PSNR_TOLERANCE, fp_bytes, half_psnr_shift, save_lowbit
from jaxquant.models import NGswinConfig, describe
from jaxquant.quant import flat_bounds
from weights_convert.models import flax_to_torch
from weights_convert.torch_pickle import save_pth


def export_pth(model, output: Path) -> str:
    state_dict = flax_to_torch(model.config, model.params)
    save_pth(output, state_dict if isinstance(model.config, NGswinConfig) else {"params": state_dict})
    count = sum(int(np.prod(v.shape)) for v in state_dict.values())
    note = " (quantization bounds not exported: FP params only)" if model.bounds is not None else ""
    return f"{len(state_dict)} tensors, {count:,} params{note}"


def check_half(model, data_root: str | None) -> None:
    """Refuse `--half` where a float16 remainder moves Set5 PSNR by more than the tolerance; print both."""
    set5 = load_benchmark(resolve_data_root(data_root), "Set5", model.config.upscale)
    full, half = half_psnr_shift(model, set5)
    print(f"Set5 PSNR with the float params in float32 {full:.4f} dB, in float16 {half:.4f} dB "
          f"({half - full:+.4f} dB)")
    if abs(half - full) > HALF_PSNR_TOLERANCE:
        raise ValueError(f"--half moves Set5 PSNR by {half - full:+.4f} dB (more than {HALF_PSNR_TOLERANCE} dB): "
                         "export without it")


@main_guard
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("model", help="run dir, model checkpoint, .pth or .safetensors")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .pth or .safetensors to write")
    p.add_argument("--half", action="store_true", help=".safetensors: the float params in float16 (checked on Set5)")
    p.add_argument("--data-root", help="for --half's Set5 check (default: $JAXQUANT_DATA or ../shared/data)")
    args = p.parse_args(argv)
    if args.output.suffix not in (".pth", ".safetensors"):
        raise ValueError(f"-o {args.output}: the extension picks the format, .pth or .safetensors")
    if args.half and args.output.suffix != ".safetensors":
        raise ValueError("--half is for a .safetensors file (a .pth holds float32 params)")
    check_output_path(args.output)
    model = load_model(args.model)
    if args.half:
        check_half(model, args.data_root)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".pth":
        summary = export_pth(model, args.output)
    else:
        size, fp = save_lowbit(args.output, model, half=args.half), fp_bytes(model)
        bits = sorted({b.bits for b in flat_bounds(model.bounds or {}).values()})
        kind = f"W/A bits {'/'.join(map(str, bits))}" if bits else "FP"
        summary = (f"{kind}, float params in float{16 if args.half else 32}: {size:,} bytes, {fp / size:.2f}x smaller "
                   f"than the FP params in float32 ({fp:,} bytes)")
    print(f"wrote {args.output}: {describe(model.config)}, {summary}")


if __name__ == "__main__":
    main()
