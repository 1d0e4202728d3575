"""Kill -9 mid-run, resume with --resume, end with the same weights and metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scope_opd.checkpointing import last_complete_checkpoint

ROWS = [{"prompt": f"Add {a}+{b}.\n", "answer": str(a + b)} for a, b in [(12, 7), (30, 45), (9, 9), (61, 22), (5, 8), (40, 2)]]
MAX_STEPS = 4


def write_config(tmp_path: Path, tiny_pair_dir, output_dir: Path) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {
        "model_name_or_path": tiny_pair_dir["student"],
        "teacher_model": tiny_pair_dir["teacher"],
        "dataset_name": str(data),
        "verifier": "fault_helpers:slow_exact",
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": MAX_STEPS,
        "logging_steps": 1,
        "save_steps": 1,
        "learning_rate": 0.01,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "seed": 3,
        "output_dir": str(output_dir),
    }
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def scope_train(config: str, *extra: str, verifier_delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", SCOPE_TEST_VERIFIER_DELAY=str(verifier_delay))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "scope_opd.cli", "train", "--config", config, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def step_metrics(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    keep = ("loss", "scope/frac_correct", "scope/loss/mle", "scope/loss/opd", "entropy", "grad_norm")
    return [{k: h[k] for k in keep if k in h} for h in state["log_history"] if "loss" in h]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_pair_dir):
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = scope_train(write_config(tmp_path, tiny_pair_dir, reference_dir))
    config = write_config(tmp_path, tiny_pair_dir, resumed_dir)
    victim = scope_train(config, verifier_delay=0.05)  # slower steps, same results: room to kill mid-run

    # Kill -9 as soon as the second checkpoint is complete: the job is then inside step 3
    # (or even writing checkpoint-3's staging folder).
    deadline = time.time() + 300
    while last_complete_checkpoint(str(resumed_dir)) in (None, str(resumed_dir / "checkpoint-1")):
        assert victim.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finish(reference)
    killed_at = last_complete_checkpoint(str(resumed_dir))
    assert killed_at is not None and not killed_at.endswith(f"checkpoint-{MAX_STEPS}")
    # A half-written checkpoint must never be picked up: fake one a later step would write.
    partial = resumed_dir / f"checkpoint-{MAX_STEPS + 5}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert last_complete_checkpoint(str(resumed_dir)) == killed_at

    out = finish(scope_train(config, "--resume", "true"))
    assert f"resuming from {killed_at}" in out

    final_reference = load_file(str(reference_dir / "model.safetensors"))
    final_resumed = load_file(str(resumed_dir / "model.safetensors"))
    assert final_reference.keys() == final_resumed.keys()
    for name, tensor in final_reference.items():
        # Same seeds, same CPU kernels: bit-identical is expected; the tolerance only absorbs
        # summation-order noise should a kernel pick another path after the restart.
        torch.testing.assert_close(final_resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    reference_metrics, resumed_metrics = step_metrics(reference_dir), step_metrics(resumed_dir)
    assert len(resumed_metrics) == len(reference_metrics) == MAX_STEPS  # no step replayed or skipped
    for ref, res in zip(reference_metrics, resumed_metrics):
        assert res.keys() == ref.keys()
        for key in ref:
            assert res[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
