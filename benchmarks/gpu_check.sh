#!/usr/bin/env bash
# The one script to run on a machine with a CUDA device (under 8 minutes):
#   1. the environment (nvidia-smi, torch and its CUDA build, where the
#      plugin, VISSL and ClassyVision are imported from)              -> gpu_env.txt
#   2. the tests marked gpu (pytest -m gpu tests), at most 90 s     -> gpu_tests.log
#   3. benchmarks/gpu_bench.py (training throughput first, then the
#      loss, LARC and scaling benchmarks), at most 370 s            -> gpu_bench.log, gpu_*.json
# Results go to $OUT when it is set, else to benchmarks/results.
#
# The interpreter: $PYTHON when set; else the built .venv (`make install`);
# else, on a machine with no .venv but with the wheels of
# benchmarks/gpu_wheels.sh in .whl/, python3 (which must already hold torch,
# torchvision and the scientific stack): the wheels and the plugin from this
# working tree are installed, without network, under /tmp/site
# ($GPU_CHECK_SITE), which goes on PYTHONPATH.
#
# GPU_CHECK_DRY_RUN=1 runs the same steps without a CUDA device: the gpu
# tests are collected and skip, and gpu_bench.py runs --device cpu --tiny.
# Extra arguments are passed to gpu_bench.py (e.g. --workers 12).
# Exit status: 0 when the tests passed and every benchmark step ran.
set -u
cd "$(dirname "$0")/.."

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
# Whole run under 8 minutes: the benchmarks get what the install, the
# environment report and the tests leave of this, at most 370 s.
TOTAL_S=470
start=$(date +%s)
elapsed_s() { echo $(( $(date +%s) - start )); }
elapsed() { echo "$(elapsed_s) s"; }

# Installs .whl/*.whl and this tree's plugin under $1, in three folders put on
# PYTHONPATH in this order: plugin, deps, vissl. Each pip call gets a folder of
# its own because `pip install --target` moves whole top-level folders into
# place, and hydra_plugins/ (a namespace package) has a part in each. VISSL's
# wheel bundles an older classy_vision; its folder comes last so that
# classy-vision 0.7.0 wins, as the Makefile's reinstall over it does. No
# --upgrade: classy-vision's wheel also puts classy_train.py in a data folder
# named classy_vision, which with --upgrade replaces the package itself.
install_wheels() {
    local site=$1
    local pip=(python3 -m pip install -q --disable-pip-version-check --no-index --no-deps
               --no-compile --no-cache-dir)
    local deps=()
    local w
    for w in .whl/*.whl; do
        case "$(basename "$w")" in
            vissl-*) ;;
            *) deps+=("$w") ;;
        esac
    done
    rm -rf "$site"
    "${pip[@]}" --target "$site/vissl" .whl/vissl-*.whl &&
        "${pip[@]}" --target "$site/deps" "${deps[@]}" || return 1
    # classy-vision's own unit tests: on PYTHONPATH their top-level name would
    # shadow the standard library's `test` package.
    rm -rf "$site/deps/test"
    # setuptools<81 from deps/ builds the plugin (VISSL itself needs its pkg_resources).
    export PYTHONPATH="$site/plugin:$site/deps:$site/vissl"
    "${pip[@]}" --no-build-isolation --target "$site/plugin" . || return 1
    rm -rf build swav_vissl_plugin.egg-info
}

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif compgen -G ".whl/vissl-*.whl" > /dev/null; then
    PY=python3
    SITE="${GPU_CHECK_SITE:-/tmp/site}"
    echo "== gpu_check: installing .whl/*.whl and this tree's plugin under $SITE"
    # The log stays out of $RESULTS unless it failed: the device tool returns 8 files.
    if ! install_wheels "$SITE" > "$SITE.log" 2>&1; then
        { cat "$SITE.log"; echo "gpu_check: installing the wheels failed (pip's output above)"; } \
            | tee "$RESULTS/gpu_env.txt"
        exit 2
    fi
    echo "PYTHONPATH=$PYTHONPATH ($(elapsed))"
else
    echo "gpu_check: no .venv/bin/python and no .whl/ (run 'make install' first," \
         "or benchmarks/gpu_wheels.sh and carry .whl, or set PYTHON=...)" | tee "$RESULTS/gpu_env.txt"
    exit 2
fi
if ! command -v "$PY" > /dev/null; then
    echo "gpu_check: $PY not found (run 'make install' first, or set PYTHON=...)" | tee "$RESULTS/gpu_env.txt"
    exit 2
fi
# -P: the working tree is not put first on sys.path, so the tests import the
# installed plugin (with its configs), as `make test` does.
SAFE=()
"$PY" -P -c '' 2> /dev/null && SAFE=(-P)

{
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(),
"device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    "$PY" "${SAFE[@]}" -c 'import sys, swav_vissl_plugin, vissl, classy_vision, hydra
print("python", sys.executable, sys.version.split()[0])
for m in (swav_vissl_plugin, vissl, classy_vision, hydra):
    print(m.__name__, getattr(m, "__version__", "?"), m.__file__)'
    echo "cpus: $(nproc)"
} > "$RESULTS/gpu_env.txt" 2>&1
cat "$RESULTS/gpu_env.txt"
if ! "$PY" "${SAFE[@]}" -c 'import swav_vissl_plugin' 2> /dev/null; then
    echo "gpu_check: the plugin does not import (see $RESULTS/gpu_env.txt); nothing run"
    exit 2
fi
BENCH_DEVICE=()
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check: dry run (GPU_CHECK_DRY_RUN=1): gpu tests skip without CUDA, benchmarks --device cpu --tiny"
    BENCH_DEVICE=(--device cpu --tiny)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device; nothing run"
    exit 2
fi

echo "== gpu_check: tests marked gpu ($(elapsed))"
timeout --kill-after=10 90 "$PY" "${SAFE[@]}" -m pytest -q -p no:cacheprovider -m gpu tests \
    > "$RESULTS/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$RESULTS/gpu_tests.log"

bench_s=$(( TOTAL_S - $(elapsed_s) - 10 ))
[ "$bench_s" -gt 370 ] && bench_s=370
[ "$bench_s" -lt 60 ] && bench_s=60
echo "== gpu_check: benchmarks, at most $bench_s s ($(elapsed))"
timeout --kill-after=10 "$bench_s" "$PY" benchmarks/gpu_bench.py --json-dir "$RESULTS" \
    --budget-s $(( bench_s - 30 )) "${BENCH_DEVICE[@]}" "$@" 2>&1 | tee "$RESULTS/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== gpu_check: done ($(elapsed)): tests exit $tests_rc, benchmarks exit $bench_rc;" \
     "logs and results in $RESULTS"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
