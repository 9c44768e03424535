"""Export a model to its authors' `.pth` layout, readable by torch.load: SwinIR's official {"params": state_dict},
NGswin's bare state dict.

    python scripts/export.py runs/x2 -o swinir_x2.pth

Any `load_model` source works (run dir, model checkpoint, .pth). Only full-precision params are written: a
quantized model's bounds have no place in the state dict and are left out (with a note).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxquant.checkpoint import load_model
from jaxquant.cli import main_guard
from jaxquant.data import check_output_path
from jaxquant.models import NGswinConfig, describe
from weights_convert.models import flax_to_torch
from weights_convert.torch_pickle import save_pth


@main_guard
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("model", help="run dir, model checkpoint or .pth")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .pth to write")
    args = p.parse_args(argv)
    check_output_path(args.output)
    model = load_model(args.model)
    state_dict = flax_to_torch(model.config, model.params)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_pth(args.output, state_dict if isinstance(model.config, NGswinConfig) else {"params": state_dict})
    count = sum(int(np.prod(v.shape)) for v in state_dict.values())
    note = " (quantization bounds not exported: FP params only)" if model.bounds is not None else ""
    print(f"wrote {args.output}: {describe(model.config)}, {len(state_dict)} tensors, {count:,} params{note}")


if __name__ == "__main__":
    main()
