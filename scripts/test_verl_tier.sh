#!/usr/bin/env bash
# The verl tier: tests/verl_tier run by the verl venv's python (built or reused by verl_venv.sh).
# Extra arguments go to pytest, e.g. scripts/test_verl_tier.sh -k loss -x
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/scripts/verl_venv.sh")"
cd "$REPO"
# test_trainer.py starts a small local Ray (4 logical CPUs) for a real TransferQueue; no GPU, no network.
export VERL_LOGGING_LEVEL="${VERL_LOGGING_LEVEL:-WARNING}"
exec "$VENV/bin/python" -m pytest tests/verl_tier -q -p no:cacheprovider "$@"
