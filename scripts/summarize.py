"""Collect the results.json of several quantize runs into one Markdown table (Set5 PSNR / SSIM by default).

    python scripts/summarize.py runs/x2_w4a4 runs/x2_w3a3 ... --dataset Set5 --out table.md

A row per run, named by scale and bits, and by seed where the runs differ in it (repeats of one setting). Where
a run has DQC, the column "DQC gain" is its PSNR minus that of the bounds DQC started from (the stage before it).
"""

import argparse
from pathlib import Path
from typing import NamedTuple

from jaxquant.cli import main_guard
from jaxquant.data import check_output_path
from jaxquant.runs import read_run_json

RESULTS_FILE = "results.json"


class Row(NamedTuple):
    name: str  # scale and bits
    seed: object
    scores: dict[str, dict]  # {stage: `dataset` scores}, in the run's order: a DQC stage follows its start
    dqc_step: object  # the DQC step kept, or "-"


def run_row(run_dir: Path, dataset: str) -> Row:
    """The `dataset` row of one finished quantize run."""
    results = read_run_json(run_dir, RESULTS_FILE, "finished quantize run")
    path = run_dir / RESULTS_FILE
    config, stages, dqc = results.get("config"), results.get("results"), results.get("dqc") or {}
    if not (isinstance(stages, dict) and all(isinstance(r, dict) for r in stages.values())
            and isinstance(config, dict) and {"scale", "bits"} <= config.keys() and isinstance(dqc, dict)):
        raise ValueError(f"{path}: not a quantize run's results (needs 'results' by stage and dataset, 'config' "
                         "with scale and bits, and 'dqc' an object or null)")
    scores = {name: r[dataset] for name, r in stages.items() if dataset in r}
    if not scores:
        found = sorted({name for r in stages.values() for name in r})
        raise ValueError(f"{path}: no {dataset} results (has {', '.join(found) or 'none'})")
    for name, score in scores.items():
        if not is_score(score):
            raise ValueError(f"{path}: {name} {dataset} is not a numeric psnr and ssim: {score!r:.80}")
    name = f"x{config['scale']} W{config['bits']}A{config['bits']}"
    return Row(name, config.get("seed", 0), scores, dqc.get("best_step", "-"))


def dqc_gain(scores: dict[str, dict]) -> str:
    """DQC's PSNR minus its start's (the stage before it, as the pipeline orders them), or "-" without DQC."""
    stages = list(scores)
    if "DQC" not in stages[1:]:
        return "-"
    start = stages[stages.index("DQC") - 1]
    return f"{scores['DQC']['psnr'] - scores[start]['psnr']:+.3f} dB"


def is_score(value: object) -> bool:
    """A {"psnr": number, "ssim": number, ...} cell (JSON true / false are not numbers)."""
    return isinstance(value, dict) and all(
        isinstance(value.get(key), (int, float)) and not isinstance(value.get(key), bool) for key in ("psnr", "ssim")
    )


@main_guard
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.out:
        check_output_path(args.out)
    rows = [run_row(run_dir, args.dataset) for run_dir in args.runs]
    columns = list(dict.fromkeys(stage for row in rows for stage in row.scores))
    by_seed = len({repr(row.seed) for row in rows}) > 1
    lines = [f"| {args.dataset} PSNR / SSIM | " + " | ".join(columns) + " | DQC step kept | DQC gain |",
             "|" + "---|" * (len(columns) + 3)]
    for row in rows:
        scores = row.scores
        cells = [f"{scores[c]['psnr']:.3f} / {scores[c]['ssim']:.4f}" if c in scores else "-" for c in columns]
        name = f"{row.name} seed {row.seed}" if by_seed else row.name
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.dqc_step} | {dqc_gain(scores)} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
