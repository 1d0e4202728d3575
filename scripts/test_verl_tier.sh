#!/usr/bin/env bash
# The verl tier: tests/verl_tier run by the verl venv's python (built or reused by verl_venv.sh).
# Extra arguments go to pytest, e.g. scripts/test_verl_tier.sh -k loss -x
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/scripts/verl_venv.sh")"
cd "$REPO"
# Ray and TransferQueue stay out of these tests; keep verl from probing for accelerators.
export VERL_LOGGING_LEVEL="${VERL_LOGGING_LEVEL:-WARNING}"
exec "$VENV/bin/python" -m pytest tests/verl_tier -q -p no:cacheprovider "$@"
