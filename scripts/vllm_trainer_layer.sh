#!/usr/bin/env bash
# Add the trainer's packages (TRL and what scope_opd imports) to the vLLM venv, and print its python.
#
# TRL's colocate mode (use_vllm=True, vllm_mode="colocate") runs vLLM inside the training process, so a test
# of it must run the trainer in the vLLM venv. scripts/vllm_venv.sh builds that venv (vLLM, its torch and
# transformers) and is left alone: changing its STAMP would rebuild 3.4 GB. This layer goes on top, once:
# the pins below, installed against constraints that keep the venv's torch / transformers / huggingface_hub
# exactly where vLLM needs them. Its marker `.trainer-layer` holds the pin set, written last, so an
# interrupted install or a pin change is redone; a rebuilt base venv (rm -rf) loses the marker with it.
# scope_opd itself is not installed: callers put the checkout's src/ on PYTHONPATH, so the venv never holds
# a stale copy of the code under test.
#
# Output: the venv's python path on stdout (progress goes to stderr).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$(bash "$HERE/vllm_venv.sh")"
VENV="$(dirname "$(dirname "$PY")")"

# The main environment's versions (pyproject pins trl exactly; the others as tested there).
LAYER_PINS="trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 math-verify==0.9.0"
MARKER="$VENV/.trainer-layer"

is_complete() { [[ -f "$MARKER" && "$(cat "$MARKER")" == "$LAYER_PINS" ]]; }

if is_complete; then
  echo "$PY"
  exit 0
fi

exec 9>"$VENV.trainer-layer.lock"
flock 9
if is_complete; then
  echo "$PY"
  exit 0
fi

echo "adding the trainer layer ($LAYER_PINS) to $VENV" >&2
START=$SECONDS
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# Whatever vLLM's venv has now for these stays: the resolver may add packages, never move these.
"$PY" -m pip freeze --disable-pip-version-check | grep -iE '^(torch|transformers|huggingface[-_]hub|tokenizers|numpy)==' \
  > "$CONSTRAINTS"
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" $LAYER_PINS >&2
"$PY" - <<'PY' >&2
import torch, transformers, trl, vllm  # noqa: F401
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
print("trainer layer ok: trl", trl.__version__, "transformers", transformers.__version__, "torch", torch.__version__)
PY
echo "trainer layer added in $((SECONDS - START)) s" >&2
echo "$LAYER_PINS" > "$MARKER"
echo "$PY"
