"""Timing helpers shared by the benchmarks: compile once, warm up, time several runs, report the median."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import jax

from jaxquant.cpu_memory import cpu_scratch_kept, keep_cpu_scratch


def add_keep_scratch_flag(parser: argparse.ArgumentParser, default: bool = True) -> None:
    """`--keep-scratch/--no-keep-scratch`; `default` is what the script measured does (`quantize.py` keeps it)."""
    parser.add_argument("--keep-scratch", action=argparse.BooleanOptionalAction, default=default, help="keep "
                        f"XLA:CPU's scratch between calls (jaxquant.cpu_memory; default: {'on' if default else 'off'})")


def apply_keep_scratch(args: argparse.Namespace) -> None:
    """Before JAX's first computation: keep the scratch if `--keep-scratch` asks for it."""
    if args.keep_scratch:
        keep_cpu_scratch()


def time_compiled(fn: Callable, *args, runs: int = 10, warmup: int = 2) -> dict:
    """Compile `fn` (jitted) for `args`, then time `runs` calls after `warmup`; seconds, and the minor page
    faults a call costs (fresh host memory the kernel maps and zeroes: XLA:CPU's scratch, unless the allocator
    keeps it between calls)."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / runs
    return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times), "runs": runs,
            "page_faults": faults}


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} ({jax.device_count()} device(s), jax {jax.__version__})"


def allocator() -> str:
    """The malloc this process runs on. glibc's hands large freed blocks back to the kernel, so each call page
    faults its scratch in again; a preloaded tcmalloc keeps them (README, "Memory and speed")."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    name = next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if name in maps), "system malloc")
    return name + (", XLA scratch kept (jaxquant.cpu_memory)" if cpu_scratch_kept() else "")


def peak_host_memory_gib() -> float:
    """Peak resident memory of this process so far (on CPU backends: the arrays too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def report(title: str, rows: dict[str, dict], official_s: float | None = None) -> None:
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    device_memory = f", peak device memory {device_peak / 2**30:.2f} GiB" if device_peak else ""
    print(f"## {title} on {device_name()}; peak host memory {peak_host_memory_gib():.2f} GiB{device_memory}, "
          f"{allocator()}")
    print("| case | compile (s) | median (ms) | min (ms) | page faults a call | vs official |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = f"{official_s / r['median_s']:.1f}x faster" if official_s else "-"
        print(f"| {name} | {r['compile_s']:.2f} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} "
              f"| {r['page_faults']:,.0f} | {ratio} |")
