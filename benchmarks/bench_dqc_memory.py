"""Where a DQC step's time goes besides compute: XLA's scratch memory, page faults, user vs system CPU time.

    python benchmarks/bench_dqc_memory.py              # x4, batch 4, 32x32, W2A2 (as bench_dqc.py)
    python benchmarks/bench_dqc_memory.py --profile 25 # also the 25 costliest ops from a jax.profiler trace
    python benchmarks/bench_dqc_memory.py --no-keep-scratch   # glibc's default: the scratch faulted in each call

XLA:CPU allocates a step's scratch ("temp") buffer afresh on every call. Unless the process keeps it
(`jaxquant.keep_cpu_scratch`, which this script calls unless given `--no-keep-scratch`), glibc maps it afresh
and each page of it costs a page fault per step: with stored activations (1.27 GiB) ~326k faults and ~0.5 s of
system time per step; with the blocks recomputed (`jaxquant.swinir.run_blocks`) ~150 MB and ~37k faults.
"""

import collections
import glob
import gzip
import json
import re
import resource
import statistics
import tempfile
import time

import jax

from bench_dqc import parser, setup, title


def op_table(compiled, args, top: int) -> None:
    """The `top` costliest ops of one traced call, by HLO name, with their op_name metadata."""
    op_names = dict(re.findall(r"%(\S+) = .*?op_name=\"([^\"]*)\"", compiled.as_text()))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        (trace,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in op_names:
            name = re.sub(r"(layers|blocks)_\d+", r"\1_*", op_names[e["name"]]).removeprefix("jit(dqc_step)/")
            total[name] += e["dur"]
    print("| op (summed over layers_* and blocks_*) | ms |\n|---|---|")
    for name, us in total.most_common(top):
        print(f"| {name[-100:]} | {us / 1e3:.1f} |")


def main():
    p = parser(runs=5)
    p.add_argument("--profile", type=int, default=0, help="print this many costliest ops")
    args = p.parse_args()
    step, step_args = setup(args)
    compiled = step.lower(*step_args).compile()
    jax.block_until_ready(compiled(*step_args))

    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*step_args))
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_step = lambda field: (getattr(after, field) - getattr(before, field)) / args.runs
    print(f"## {title(args)}")
    print("| XLA temp (MB) | median (ms) | page faults / step | user CPU (ms) | system CPU (ms) |")
    print("|---|---|---|---|---|")
    print(f"| {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} | {1e3 * statistics.median(times):.0f} "
          f"| {per_step('ru_minflt'):.0f} | {1e3 * per_step('ru_utime'):.0f} | {1e3 * per_step('ru_stime'):.0f} |")
    if args.profile:
        op_table(compiled, step_args, args.profile)


if __name__ == "__main__":
    main()
