"""Kill -9 mid-run, resume with --resume, end with the same weights and metrics as an uninterrupted run.

Six prompts, two per step: with ``steps_per_generation`` 1 an epoch is 3 steps; with 2, one
generation batch (4 prompts, 2 steps) is an epoch. One run is killed mid epoch 0; another inside
epoch 1, in the middle of a generation batch (TRL's buffered completions), and is resumed both
from there and from the epoch 0/1 boundary.
"""

from __future__ import annotations

import json
import os
import shutil
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


def write_config(tmp_path: Path, tiny_pair_dir, output_dir: Path, **overrides) -> str:
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
        **overrides,
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


def step_metrics(output_dir: Path, max_steps: int = MAX_STEPS) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
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

    assert_same_run(reference_dir, resumed_dir, MAX_STEPS)


def weight_difference(reference_dir: Path, resumed_dir: Path) -> float:
    """Largest absolute difference between the two runs' final weights."""
    final_reference = load_file(str(reference_dir / "model.safetensors"))
    final_resumed = load_file(str(resumed_dir / "model.safetensors"))
    assert final_reference.keys() == final_resumed.keys()
    return max((final_resumed[k] - t).abs().max().item() for k, t in final_reference.items())


def assert_same_run(reference_dir: Path, resumed_dir: Path, max_steps: int) -> None:
    difference = weight_difference(reference_dir, resumed_dir)
    print(f"max |resumed - uninterrupted| weight difference: {difference:.3g}")
    # Same seeds, same CPU kernels: bit-identical is expected; the tolerance only absorbs
    # summation-order noise should a kernel pick another path after the restart.
    assert difference <= 1e-6, f"resumed weights differ from the uninterrupted run's by up to {difference:.3g}"
    reference_metrics, resumed_metrics = step_metrics(reference_dir, max_steps), step_metrics(resumed_dir, max_steps)
    assert len(resumed_metrics) == len(reference_metrics) == max_steps  # no step replayed or skipped
    for step, (ref, res) in enumerate(zip(reference_metrics, resumed_metrics), start=1):
        assert res.keys() == ref.keys(), f"step {step}"
        for key in ref:
            assert res[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), f"step {step}: {key}"


def kill_just_after_checkpoint(config: str, output_dir: Path, step: int) -> None:
    """SIGKILL a run as soon as ``checkpoint-{step}`` is complete, leaving that as its last checkpoint."""
    victim = scope_train(config, verifier_delay=0.05)
    deadline = time.time() + 300
    while not (output_dir / f"checkpoint-{step}").is_dir():  # renamed into place only once complete
        assert victim.poll() is None, "run ended before it could be killed:\n" + victim.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # Should the signal land after a later checkpoint was renamed into place, drop it: the
    # resume then starts exactly where this test means it to, as if the kill came right after `step`.
    for later in output_dir.glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    assert last_complete_checkpoint(str(output_dir)) == str(output_dir / f"checkpoint-{step}")


def test_sigkill_in_epoch_1_mid_generation_batch_resumes_exactly_there_and_from_the_epoch_boundary(
    tmp_path, tiny_pair_dir
):
    # steps_per_generation 2 > gradient_accumulation_steps 1: steps 1-2 are epoch 0 (one generation
    # batch), 3-4 epoch 1, 5-6 epoch 2. Killed after step 3, the run holds checkpoint-2 (the epoch 0/1
    # boundary) and checkpoint-3 (inside epoch 1, with step 4's half of the generation batch buffered).
    settings = dict(steps_per_generation=2, max_steps=6)
    reference_dir, resumed_dir, boundary_dir = tmp_path / "reference", tmp_path / "resumed", tmp_path / "boundary"
    reference = scope_train(write_config(tmp_path, tiny_pair_dir, reference_dir, **settings))
    config = write_config(tmp_path, tiny_pair_dir, resumed_dir, **settings)
    kill_just_after_checkpoint(config, resumed_dir, 3)
    finish(reference)
    for step, epoch in ((2, 1.0), (3, 1.5)):  # where the checkpoints sit, in epochs
        state = json.loads((resumed_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["epoch"] == pytest.approx(epoch)
    # The same killed run, resumed from the epoch boundary instead: drop checkpoint-3 from a copy.
    shutil.copytree(resumed_dir, boundary_dir)
    shutil.rmtree(boundary_dir / "checkpoint-3")
    boundary_config = write_config(tmp_path, tiny_pair_dir, boundary_dir, **settings)

    mid_batch, at_boundary = scope_train(config, "--resume", "true"), scope_train(boundary_config, "--resume", "true")
    assert f"resuming from {resumed_dir / 'checkpoint-3'}" in finish(mid_batch)
    assert f"resuming from {boundary_dir / 'checkpoint-2'}" in finish(at_boundary)
    for resumed in (resumed_dir, boundary_dir):
        print(f"{resumed.name}: max weight difference {weight_difference(reference_dir, resumed):.3g}")
    assert_same_run(reference_dir, resumed_dir, 6)
    assert_same_run(reference_dir, boundary_dir, 6)
