#!/usr/bin/env bash
# The one script to run on a machine with a CUDA device (under 9 minutes):
#   1. the environment (nvidia-smi, torch and its CUDA build)       -> gpu_env.txt
#   2. the tests marked gpu (pytest -m gpu tests), at most 90 s     -> gpu_tests.log
#   3. benchmarks/gpu_bench.py (training throughput first, then the
#      loss, LARC and scaling benchmarks), at most 430 s            -> gpu_bench.log, gpu_*.json
# Results go to $OUT when it is set, else to benchmarks/results. Nothing is
# installed: it uses the built .venv (PYTHON=... to use another interpreter).
# Extra arguments are passed to gpu_bench.py (e.g. --workers 12).
# Exit status: 0 when the tests passed and every benchmark step ran.
set -u
cd "$(dirname "$0")/.."

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "gpu_check: $PY not found (run 'make install' first, or set PYTHON=...)" | tee "$RESULTS/gpu_env.txt"
    exit 2
fi
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

{
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(),
"device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    echo "cpus: $(nproc)"
} > "$RESULTS/gpu_env.txt" 2>&1
cat "$RESULTS/gpu_env.txt"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device; nothing run"
    exit 2
fi

echo "== gpu_check: tests marked gpu ($(elapsed))"
timeout --kill-after=10 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests \
    > "$RESULTS/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$RESULTS/gpu_tests.log"

echo "== gpu_check: benchmarks ($(elapsed))"
timeout --kill-after=10 430 "$PY" benchmarks/gpu_bench.py --json-dir "$RESULTS" --budget-s 400 "$@" \
    2>&1 | tee "$RESULTS/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== gpu_check: done ($(elapsed)): tests exit $tests_rc, benchmarks exit $bench_rc;" \
     "logs and results in $RESULTS"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
