#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a lent GPU machine (CPython 3.12, manylinux x86_64),
# from benchmarks/gpu_wheels.txt, without their dependencies (the machine has torch, transformers, ...).
#
#   bash scripts/gpu_wheels.sh [DIR]     # DIR defaults to .cache/gpu_wheels (git-ignored)
#
# Then carry DIR to the machine (run(carry=[".cache/gpu_wheels"])) and run
#   bash benchmarks/gpu_check.sh --wheels .cache/gpu_wheels
# Last line: the directory and its size.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$HERE/.cache/gpu_wheels}"
mkdir -p "$DIR"
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HERE/benchmarks/gpu_wheels.txt" | grep -v '^$')
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$DIR" "${PINS[@]}"
# The SmolLM2-135M tokenizer and config, for the random model of its shape (the weights are too big to carry).
SMOL="${SCOPE_CACHE:-$HOME/.cache/scope-opd}/smollm2-135m-instruct"
if [[ -f "$SMOL/config.json" ]]; then
    mkdir -p "$DIR/smollm2-shape"
    cp "$SMOL"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$DIR/smollm2-shape/" 2>/dev/null || true
else
    echo "gpu_wheels: $SMOL not built (scripts/smollm2.sh): the SmolLM2-shaped check will be skipped there" >&2
fi
echo "$DIR ($(du -sm "$DIR" | cut -f1) MiB)"
