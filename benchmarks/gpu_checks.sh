#!/usr/bin/env bash
# The GPU checks of the DQC issue, each sized for one call on a short GPU lease:
#
#   bash benchmarks/gpu_checks.sh step OUT_DIR
#       a DQC step at x2, batch 16, 64x64, W2A2 as DQCConfig runs it on an accelerator (blocks unrolled,
#       activations stored): compile time, median of 20, peak memory, a profiler trace of 3 steps; then, as
#       time allows, with CUDA-graph concurrent regions, with the blocks scanned and recomputed, and with
#       float32 matmuls (default: TF32).
#   bash benchmarks/gpu_checks.sh preset OUT_DIR [DATA_ROOT] [CALIB]
#       the `paper` preset for x4 W2A2 end to end (scripts/quantize.py); about 10 minutes on an H100. A call
#       cut off by BUDGET_S leaves its checkpoints on the machine; the next call there resumes the run (no
#       recalibration: the calibrated bounds are read back).
#
# BUDGET_S (default 560) caps a call. The preset's compilations persist in /tmp/jax_cache, so a second call
# on the same machine (the resumed preset) does not compile again; the step's are timed, so they do not. OUT_DIR receives bench.log and trace.json.gz, or preset.log,
# results.json, validation.json and comparison.png.
set -u
mode=${1:?usage: gpu_checks.sh step|preset OUT_DIR [DATA_ROOT] [CALIB]}
out=${2:?usage: gpu_checks.sh step|preset OUT_DIR [DATA_ROOT] [CALIB]}
budget=${BUDGET_S:-560}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
left() { echo $((budget - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/bench.log" 2>&1
python -c "import jax; print('jax', jax.__version__, jax.devices())" >>"$out/bench.log" 2>&1

bench() {  # bench_dqc.py at x2, batch 16, 64x64 with extra flags, appended to bench.log
    (cd benchmarks && timeout "$1" python bench_dqc.py --scale 2 --batch 16 --size 64 --runs 20 "${@:2}") \
        >>"$out/bench.log" 2>&1 || echo "bench ${*:2}: exit $?" >>"$out/bench.log"
}

case $mode in
step)
    bench "$(( $(left) < 190 ? $(left) - 10 : 180 ))" --trace /tmp/dqc_trace
    find /tmp/dqc_trace -name '*perfetto_trace.json.gz' -exec cp {} "$out/trace.json.gz" \; 2>/dev/null
    if [ "$(left)" -gt 100 ]; then
        echo "XLA_FLAGS: CUDA-graph concurrent regions, graphs of any size" >>"$out/bench.log"
        XLA_FLAGS="--xla_gpu_graph_enable_concurrent_region=true --xla_gpu_graph_min_graph_size=1" \
            bench "$(($(left) - 10))"
    fi
    if [ "$(left)" -gt 100 ]; then bench "$(($(left) - 10))" --scan --remat; fi
    if [ "$(left)" -gt 100 ]; then bench "$(($(left) - 10))" --matmul-precision float32; fi
    ;;
preset)
    data=${3:-../shared/data}
    calib=${4:+--calib $4}
    run=/tmp/x4_w2a2_paper
    export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
    if [ -f "$run/run_config.json" ]; then how=(--resume "$run"); else
        how=(--bits 2 --scale 4 --preset paper $calib --run-dir "$run"); fi
    timeout "$(($(left) - 10))" python scripts/quantize.py --data-root "$data" "${how[@]}" >"$out/preset.log" 2>&1
    echo "preset: exit $? after ${SECONDS}s" >>"$out/bench.log"
    for f in results.json validation.json comparison.png; do cp "$run/$f" "$out/" 2>/dev/null; done
    tail -c 1500 "$out/preset.log"
    cat "$run/results.md" 2>/dev/null
    ;;
*)
    echo "unknown mode $mode (step or preset)" >&2
    exit 2
    ;;
esac
cat "$out/bench.log"
