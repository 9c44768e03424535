"""Tabulate quantize runs as 2DQuant's Table 3: per scale, a row per (method, bits), PSNR / SSIM per dataset.

    python scripts/summarize.py runs/*/ --datasets Set5,Set14,B100,Urban100
    python scripts/summarize.py runs/*/ --latex --out table3.tex     # a LaTeX table to paste
    python scripts/summarize.py runs/*/ --json --out table3.json

Each scale opens with its FP row, then the bit widths from high to low, each with the methods in the order the
runs evaluated them (MinMax, Percentile, DOBI, DQC, ...). Runs that repeat a setting (other seeds) are averaged:
the last column counts them, and a cell averaged over fewer runs than its row (a run without that dataset) says
how many. `--datasets` defaults to every benchmark the runs have, in the papers' order.
"""

import argparse
import json
from pathlib import Path
from statistics import fmean
from typing import NamedTuple

from jaxquant.cli import main_guard
from jaxquant.data import PAPER_BENCHMARKS, check_output_path
from jaxquant.runs import read_run_json

RESULTS_FILE = "results.json"
FP = "FP"


class Run(NamedTuple):
    scale: int
    bits: int
    stages: dict[str, dict[str, dict]]  # {method: {dataset: {"psnr", "ssim", ...}}}, in the run's order


class Row(NamedTuple):
    scale: int
    method: str
    bits: int | None  # None: full precision
    runs: int  # runs averaged into the row
    cells: dict[str, tuple[float, float, int] | None]  # {dataset: (psnr, ssim, runs that have it)}, None: no run


def read_run(run_dir: Path) -> Run:
    """The stages and scores of one finished quantize run."""
    results = read_run_json(run_dir, RESULTS_FILE, "finished quantize run")
    path = run_dir / RESULTS_FILE
    config, stages, dqc = results.get("config"), results.get("results"), results.get("dqc")
    if not (isinstance(stages, dict) and all(isinstance(r, dict) for r in stages.values())
            and isinstance(config, dict) and {"scale", "bits"} <= config.keys() and isinstance(dqc, (dict, type(None)))):
        raise ValueError(f"{path}: not a quantize run's results (needs 'results' by stage and dataset, 'config' "
                         "with scale and bits, and 'dqc' an object or null)")
    for method, scores in stages.items():
        for dataset, score in scores.items():
            if not is_score(score):
                raise ValueError(f"{path}: {method} {dataset} is not a numeric psnr and ssim: {score!r:.80}")
    return Run(config["scale"], config["bits"], stages)


def is_score(value: object) -> bool:
    """A {"psnr": number, "ssim": number, ...} cell (JSON true / false are not numbers)."""
    return isinstance(value, dict) and all(
        isinstance(value.get(key), (int, float)) and not isinstance(value.get(key), bool) for key in ("psnr", "ssim")
    )


def datasets_of(runs: list[Run]) -> list[str]:
    """Every dataset the runs have: the papers' in their order, then the rest in the order found."""
    found = dict.fromkeys(d for run in runs for scores in run.stages.values() for d in scores)
    return [d for d in PAPER_BENCHMARKS if d in found] + [d for d in found if d not in PAPER_BENCHMARKS]


def table_rows(runs: list[Run], datasets: list[str]) -> list[Row]:
    """Table 3's rows: per scale (ascending), FP, then per bit width (descending) each method, seeds averaged."""
    groups: dict[tuple, list[dict]] = {}  # (scale, method, bits) -> the runs' {dataset: score}, in table order
    for scale in sorted({run.scale for run in runs}):
        at_scale = [run for run in runs if run.scale == scale]
        groups[scale, FP, None] = [run.stages[FP] for run in at_scale if FP in run.stages]
        for bits in sorted({run.bits for run in at_scale}, reverse=True):
            with_bits = [run for run in at_scale if run.bits == bits]
            for method in dict.fromkeys(m for run in with_bits for m in run.stages if m != FP):
                groups[scale, method, bits] = [run.stages[method] for run in with_bits if method in run.stages]
    return [Row(scale, method, bits, len(scores), {d: mean_cell(scores, d) for d in datasets})
            for (scale, method, bits), scores in groups.items() if scores]


def mean_cell(scores: list[dict], dataset: str) -> tuple[float, float, int] | None:
    """Mean PSNR and SSIM over the runs that have `dataset`, and how many do."""
    have = [s[dataset] for s in scores if dataset in s]
    return (fmean(s["psnr"] for s in have), fmean(s["ssim"] for s in have), len(have)) if have else None


def bits_label(bits: int | None) -> str:
    return "32/32" if bits is None else f"{bits}/{bits}"


def cell_text(cell: tuple[float, float, int] | None, row_runs: int, separator: str) -> str:
    """'PSNR<separator>SSIM', with how many of the row's runs have it where not all do; "-" for each where none."""
    if cell is None:
        return f"-{separator}-"
    psnr, ssim, runs = cell
    return f"{psnr:.3f}{separator}{ssim:.4f}" + (f" ({runs} of {row_runs})" if runs != row_runs else "")


def markdown(rows: list[Row], datasets: list[str]) -> str:
    lines = ["| Scale | Method | W/A | " + " | ".join(f"{d} PSNR / SSIM" for d in datasets) + " | runs |",
             "|" + "---|" * (len(datasets) + 4)]
    for row in rows:
        cells = [cell_text(row.cells[d], row.runs, " / ") for d in datasets]
        lines.append(f"| x{row.scale} | {row.method} | {bits_label(row.bits)} | " + " | ".join(cells)
                     + f" | {row.runs} |")
    return "\n".join(lines)


def latex(rows: list[Row], datasets: list[str]) -> str:
    """A booktabs table: PSNR and SSIM columns under each dataset, a rule between scales."""
    header = " & ".join(f"\\multicolumn{{2}}{{c}}{{{d}}}" for d in datasets)
    rules = "".join(f"\\cmidrule(lr){{{4 + 2 * i}-{5 + 2 * i}}}" for i in range(len(datasets)))
    lines = ["\\begin{tabular}{ll" + "c" * (1 + 2 * len(datasets)) + "}", "\\toprule",
             f"Scale & Method & W/A & {header} \\\\", rules,
             " & & & " + " & ".join(["PSNR & SSIM"] * len(datasets)) + " \\\\", "\\midrule"]
    for previous, row in zip([None, *rows], rows):
        if previous is not None and previous.scale != row.scale:
            lines.append("\\midrule")
        cells = [cell_text(row.cells[d], row.runs, " & ") for d in datasets]
        lines.append(f"$\\times${row.scale} & {row.method} & {bits_label(row.bits)} & " + " & ".join(cells) + " \\\\")
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"])


def as_json(rows: list[Row], datasets: list[str]) -> str:
    return json.dumps([
        {"scale": row.scale, "method": row.method, "bits": row.bits, "runs": row.runs,
         "results": {d: None if row.cells[d] is None else dict(zip(("psnr", "ssim", "runs"), row.cells[d]))
                     for d in datasets}}
        for row in rows
    ], indent=2)


@main_guard
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="quantize run directories")
    parser.add_argument("--datasets", help="comma-separated columns (default: every benchmark the runs have)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--latex", action="store_true", help="write a LaTeX tabular (booktabs) instead of Markdown")
    output.add_argument("--json", action="store_true", help="write the rows as JSON instead of Markdown")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.out:
        check_output_path(args.out)
    runs = [read_run(run_dir) for run_dir in args.runs]
    datasets = datasets_of(runs) if args.datasets is None else [d for d in args.datasets.split(",") if d]
    missing = [d for d in datasets if not any(d in scores for run in runs for scores in run.stages.values())]
    if missing or not datasets:
        raise ValueError(f"no run has {', '.join(missing) or 'any dataset'} results "
                         f"(they have {', '.join(datasets_of(runs)) or 'none'})")
    rows = table_rows(runs, datasets)
    table = (latex if args.latex else as_json if args.json else markdown)(rows, datasets)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
