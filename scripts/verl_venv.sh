#!/usr/bin/env bash
# Build (once) and print the path of the verl venv used by tests/verl_tier.
#
# verl pulls Ray, Hydra, TensorDict and friends; they must never land in the
# system python, so they get their own venv outside the checkout, cached at
# ${SCOPE_CACHE:-$HOME/.cache/scope-opd}/venv-verl. The `.complete` marker is
# written last and holds the pin set: an interrupted build, or a change of pins,
# is rebuilt from scratch instead of being half-reused. A lock file serialises concurrent callers (two test
# runs starting at once build it, or re-point it, only once at a time).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCOPE_CACHE:-$HOME/.cache/scope-opd}/venv-verl"
PYTHON="${SCOPE_VERL_PYTHON:-python3.11}"

# torch==2.13.0: pip takes the local CPU wheel (find-links) and never a CUDA one.
# verl 0.9.1 is the release the plugin is written and tested against.
PINS=(
  "torch==2.13.0"
  "verl[verl-core]==0.9.1"
)
# The stamp holds the heavy pins only, not this checkout's path: CI runs every submission from a
# fresh clone in another folder, and must reuse the cached venv rather than rebuild it (minutes).
STAMP="${PINS[*]} | scope-opd[verl,test]"

install_this_checkout() {
  # Cheap when the dependencies are already there: re-points the editable install at $REPO.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[0]}" -e "${REPO}[verl,test]" >&2
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [[ -f "$VENV/.complete" && "$(cat "$VENV/.complete")" == "$STAMP" ]]; then
  where="$("$VENV/bin/python" -c 'import scope_opd, os; print(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(scope_opd.__file__)))))' 2>/dev/null || true)"
  if [[ "$where" != "$REPO" ]]; then
    echo "verl venv: pointing its scope-opd at $REPO" >&2
    install_this_checkout
  fi
  echo "$VENV"
  exit 0
fi

echo "building verl venv at $VENV" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and alone, so that nothing later can resolve a different build.
"${PIP[@]}" "${PINS[0]}" >&2
"${PIP[@]}" "${PINS[@]}" >&2
install_this_checkout
"$VENV/bin/python" - <<'PY' >&2
import torch, verl
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
print("verl", verl.__version__, "torch", torch.__version__)
PY
echo "$STAMP" > "$VENV/.complete"
echo "$VENV"
