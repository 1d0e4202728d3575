#!/usr/bin/env bash
# The verl tier: tests/verl_tier run by the verl venv's python (built or reused by verl_venv.sh).
# Extra arguments go to pytest, e.g. scripts/test_verl_tier.sh -k loss -x
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/scripts/verl_venv.sh")"
cd "$REPO"
# test_trainer.py starts a small local Ray (4 logical CPUs) for a real TransferQueue; no GPU, no network.
export VERL_LOGGING_LEVEL="${VERL_LOGGING_LEVEL:-WARNING}"
# One process (-o addopts): pyproject's addopts run the main suite on two pytest-xdist workers, but here
# test_trainer.py's local Ray takes the cores, and a verl venv built before xdist joined the test extra lacks it.
exec "$VENV/bin/python" -m pytest tests/verl_tier -q -p no:cacheprovider -o addopts=-ra "$@"
