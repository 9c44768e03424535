"""Collect the results.json of several quantize runs into one Markdown table (Set5 PSNR / SSIM by default).

    python scripts/summarize.py runs/x2_w4a4 runs/x2_w3a3 ... --dataset Set5 --out table.md
"""

import argparse
import json
from pathlib import Path

from jaxquant.cli import main_guard


@main_guard
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    rows, columns = [], []
    for run_dir in args.runs:
        results = json.loads((run_dir / "results.json").read_text())
        config = results["config"]
        scores = {name: r[args.dataset] for name, r in results["results"].items()}
        columns += [c for c in scores if c not in columns]
        dqc = results.get("dqc") or {}
        rows.append((f"x{config['scale']} W{config['bits']}A{config['bits']}", scores, dqc.get("best_step", "-")))
    lines = [f"| {args.dataset} PSNR / SSIM | " + " | ".join(columns) + " | DQC step kept |",
             "|" + "---|" * (len(columns) + 2)]
    for name, scores, step in rows:
        cells = [f"{scores[c]['psnr']:.3f} / {scores[c]['ssim']:.4f}" if c in scores else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {step} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
