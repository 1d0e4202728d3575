"""Checkpoint integrity: manifests, damaged or incomplete checkpoints, one run per output_dir, the final save, a full disk.

The checkpoints are real: one tiny in-process SCOPE run (3 steps, a checkpoint each) is copied
into each test's folder and damaged there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from scope_opd.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointWarning,
    OutputDirInUseError,
    OutputDirLockError,
    OutputDirNotEmptyError,
    check_resume_path,
    epoch_seeded,
    last_complete_checkpoint,
    manifest_problems,
    output_dir_lock,
    read_manifest,
    select_resume_checkpoint,
    verify_checkpoint,
)
from scope_opd.cli import main as scope_main

ROWS = [{"prompt": f"Add {a}+{b}.\n", "answer": str(a + b)} for a, b in [(12, 7), (30, 45), (9, 9), (61, 22)]]


def scope_config(output_dir, tiny_pair_dir, **overrides):
    from scope_opd.trainer import SCOPEConfig

    settings = dict(
        output_dir=str(output_dir), teacher_model=tiny_pair_dir["teacher"], verifier="exact",
        per_device_train_batch_size=8, num_generations=4, max_completion_length=8, max_steps=3, logging_steps=1,
        save_steps=1, learning_rate=0.01, report_to=[], use_cpu=True, bf16=False, seed=3, disable_tqdm=True,
    )
    settings.update(overrides)
    return SCOPEConfig(**settings)


def scope_trainer(output_dir, tiny_pair_dir, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_opd.trainer import SCOPETrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    return SCOPETrainer(model, args=scope_config(output_dir, tiny_pair_dir, **overrides),
                        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pair_dir):
    """output_dir of a finished 3-step run: checkpoint-1..3 and the final save."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer = scope_trainer(out, tiny_pair_dir)
    trainer.train()
    trainer.save_model()
    return out


@pytest.fixture
def run_copy(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def warned(records, *fragments) -> bool:
    return any(all(f in str(r.message) for f in fragments) for r in records if issubclass(r.category, CheckpointWarning))


# ---------------------------------------------------------------------------- manifest


def test_every_checkpoint_and_the_final_save_carry_a_manifest_of_all_their_files(finished_run):
    for folder in [finished_run / f"checkpoint-{n}" for n in (1, 2, 3)] + [finished_run]:
        manifest = read_manifest(str(folder))
        assert manifest is not None, folder
        assert manifest_problems(str(folder), manifest) == []
        listed = set(manifest["files"])
        assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= listed
        if folder != finished_run:
            assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                    "scope_generation_state_0.pt"} <= listed
            on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
            assert listed == on_disk
            assert verify_checkpoint(str(folder)).complete
    assert not list(finished_run.glob(".tmp-*"))  # no staging folder left behind
    assert last_complete_checkpoint(str(finished_run)) == str(finished_run / "checkpoint-3")


# ---------------------------------------------------------------------------- missing state


@pytest.mark.parametrize("removed", [("optimizer.pt",), ("scheduler.pt", "rng_state.pth")],
                         ids=["optimizer", "scheduler-and-rng"])
def test_checkpoint_missing_training_state_is_skipped_for_the_previous_complete_one(run_copy, removed):
    for name in removed:
        (run_copy / "checkpoint-3" / name).unlink()
    with pytest.warns(CheckpointWarning) as records:
        chosen = select_resume_checkpoint(str(run_copy))
    assert chosen == str(run_copy / "checkpoint-2")
    assert all(warned(records, str(run_copy / "checkpoint-3"), f"no {name}") for name in removed)


@pytest.mark.parametrize("removed", [("optimizer.pt",), ("scheduler.pt", "rng_state.pth")],
                         ids=["optimizer", "scheduler-and-rng"])
def test_resume_without_training_state_is_refused_unless_asked_for(run_copy, removed):
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(run_copy / name)
    for name in removed:
        (run_copy / "checkpoint-3" / name).unlink()
    with pytest.raises(CheckpointError) as err:
        select_resume_checkpoint(str(run_copy))
    message = str(err.value)
    assert str(run_copy / "checkpoint-3") in message and "--resume_allow_incomplete true" in message
    assert all(f"no {name}" in message for name in removed)
    with pytest.raises(CheckpointError, match=re.escape(f"no {removed[0]}")):
        check_resume_path(str(run_copy / "checkpoint-3"))
    with pytest.warns(CheckpointWarning, match="starts fresh"):
        assert select_resume_checkpoint(str(run_copy), allow_incomplete=True) == str(run_copy / "checkpoint-3")


def test_python_api_resume_true_refuses_a_checkpoint_without_optimizer_state(run_copy, tiny_pair_dir):
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(run_copy / name)
    (run_copy / "checkpoint-3" / "optimizer.pt").unlink()
    trainer = scope_trainer(run_copy, tiny_pair_dir, max_steps=4)
    with pytest.raises(CheckpointError, match="no optimizer.pt"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0  # refused before any step


# ---------------------------------------------------------------------------- corrupted checkpoints


def _truncate_model(checkpoint: Path) -> str:
    path = checkpoint / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"model.safetensors has {size // 2} bytes, the manifest says {size}"


def _garbage_trainer_state(checkpoint: Path) -> str:
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    return "trainer_state.json has"


@pytest.mark.parametrize("damage", [_truncate_model, _garbage_trainer_state], ids=["truncated-model", "garbage-state"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one_naming_the_damage(run_copy, damage):
    problem = damage(run_copy / "checkpoint-3")
    with pytest.warns(CheckpointWarning) as records:
        assert select_resume_checkpoint(str(run_copy)) == str(run_copy / "checkpoint-2")
    assert warned(records, f"skipping checkpoint {run_copy / 'checkpoint-3'}", problem)
    # Named explicitly, the damaged checkpoint is an error naming its path and the file.
    with pytest.raises(CheckpointError, match=re.escape(f"cannot resume from {run_copy / 'checkpoint-3'}: {problem}")):
        check_resume_path(str(run_copy / "checkpoint-3"))


def test_python_api_resume_true_skips_a_truncated_checkpoint_and_continues_from_the_previous(run_copy, tiny_pair_dir):
    _truncate_model(run_copy / "checkpoint-3")
    trainer = scope_trainer(run_copy, tiny_pair_dir, max_steps=3)
    with pytest.warns(CheckpointWarning, match=re.escape(f"skipping checkpoint {run_copy / 'checkpoint-3'}")):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3]  # steps 1-2 from checkpoint-2's history, step 3 trained again
    assert verify_checkpoint(str(run_copy / "checkpoint-3")).complete  # rewritten whole


def test_no_intact_checkpoint_is_an_error_listing_each_one(run_copy):
    _truncate_model(run_copy / "checkpoint-3")
    _garbage_trainer_state(run_copy / "checkpoint-2")
    (run_copy / "checkpoint-1" / MANIFEST_NAME).write_text("not json")
    (run_copy / "checkpoint-7").mkdir()  # a folder some other tool left half-written
    (run_copy / "checkpoint-7" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError) as err:
        select_resume_checkpoint(str(run_copy))
    message = str(err.value)
    for n, problem in [(7, f"no {MANIFEST_NAME}"), (3, "model.safetensors has"), (2, "trainer_state.json has"),
                       (1, "unreadable manifest")]:
        assert re.search(re.escape(str(run_copy / f"checkpoint-{n}")) + ": .*" + re.escape(problem), message), n


def test_mid_generation_batch_state_missing_from_a_checkpoint_is_named(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    trainer = scope_trainer(out, tiny_pair_dir, steps_per_generation=2, max_steps=2)
    trainer.train()
    import torch

    mid = torch.load(out / "checkpoint-1" / "scope_generation_state_0.pt", weights_only=True)
    boundary = torch.load(out / "checkpoint-2" / "scope_generation_state_0.pt", weights_only=True)
    assert mid["step"] == 1 and len(mid["buffered_inputs"]) == 2  # the batch's second slice is still to train
    assert boundary["step"] == 2 and boundary["buffered_inputs"] is None  # step 3 samples afresh
    (out / "checkpoint-1" / "scope_generation_state_0.pt").unlink()
    with pytest.raises(CheckpointError, match=re.escape("scope_generation_state_0.pt is missing")):
        check_resume_path(str(out / "checkpoint-1"))


def _unlisted_garbage_optimizer(checkpoint: Path) -> str:
    """The issue's attack: garbage in optimizer.pt, its manifest entry removed so no checksum is compared."""
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    del manifest["files"]["optimizer.pt"]
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    (checkpoint / "optimizer.pt").write_bytes(b"garbage, not a pickle")
    return "optimizer.pt is a file the manifest does not list"


def _extra_file(checkpoint: Path) -> str:
    (checkpoint / "extra.pt").write_bytes(b"x")
    return "extra.pt is a file the manifest does not list"


def _entry_outside(checkpoint: Path) -> str:
    outside = checkpoint.parent.parent / "outside.txt"
    outside.write_text("secret")
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    manifest["files"]["../../outside.txt"] = {"size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    return "manifest entry '../../outside.txt' is not a plain path inside the folder"


def _listed_file_swapped_for_a_symlink(checkpoint: Path) -> str:
    outside = checkpoint.parent.parent / "scheduler-elsewhere.pt"
    shutil.copy(checkpoint / "scheduler.pt", outside)  # same bytes: only the path gives it away
    (checkpoint / "scheduler.pt").unlink()
    (checkpoint / "scheduler.pt").symlink_to(outside)
    return "manifest entry 'scheduler.pt' is not a plain path inside the folder"


@pytest.mark.parametrize("damage", [_unlisted_garbage_optimizer, _extra_file, _entry_outside,
                                    _listed_file_swapped_for_a_symlink],
                         ids=["unlisted-garbage-optimizer", "extra-file", "entry-dot-dot", "listed-file-is-a-symlink"])
def test_every_file_a_resume_reads_is_listed_and_inside_the_checkpoint(run_copy, damage):
    problem = damage(run_copy / "checkpoint-3")
    with pytest.warns(CheckpointWarning) as records:
        assert select_resume_checkpoint(str(run_copy)) == str(run_copy / "checkpoint-2")
    assert warned(records, f"skipping checkpoint {run_copy / 'checkpoint-3'}", problem)
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        check_resume_path(str(run_copy / "checkpoint-3"))


def test_a_symlinked_newest_checkpoint_is_refused_saying_so_and_named_explicitly_it_is_resolved(run_copy, tmp_path):
    other = tmp_path / "other-run-checkpoint"
    shutil.copytree(run_copy / "checkpoint-3", other)
    shutil.rmtree(run_copy / "checkpoint-3")
    (run_copy / "checkpoint-3").symlink_to(other)
    with pytest.warns(CheckpointWarning) as records:
        assert select_resume_checkpoint(str(run_copy)) == str(run_copy / "checkpoint-2")
    assert warned(records, f"skipping checkpoint {run_copy / 'checkpoint-3'}", f"is a symbolic link to {other}")
    with pytest.warns(CheckpointWarning, match=re.escape(f"is a symbolic link: resolved to {other}")):
        check_resume_path(str(run_copy / "checkpoint-3"))


def test_overwrite_removes_a_symlinked_checkpoint_link_not_its_target(tmp_path, tiny_pair_dir, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    other = tmp_path / "other-run-checkpoint"
    shutil.copytree(out / "checkpoint-3", other)
    shutil.rmtree(out / "checkpoint-3")
    (out / "checkpoint-3").symlink_to(other)
    assert scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out), "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert verify_checkpoint(str(other)).complete  # the other run's checkpoint is untouched


# ---------------------------------------------------------------------------- one run per output_dir


def hold_lock(output_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from scope_opd.checkpointing import output_dir_lock\n"
            f"with output_dir_lock({str(output_dir)!r}):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def cli_config(tmp_path: Path, tiny_pair_dir, output_dir: Path, **overrides) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {"model_name_or_path": tiny_pair_dir["student"], "teacher_model": tiny_pair_dir["teacher"],
              "dataset_name": str(data), "verifier": "exact", "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 8, "max_steps": 1, "save_steps": 1, "logging_steps": 1, "report_to": [], "use_cpu": True,
              "bf16": False, "seed": 3, "output_dir": str(output_dir), "disable_tqdm": True, **overrides}
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_second_run_into_a_locked_output_dir_refuses_and_a_killed_holder_frees_it(tmp_path, tiny_pair_dir):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputDirInUseError, match=re.escape(f"output_dir {out} is in use by another training run "
                                                                f"(pid {holder.pid} on ")):
            scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out)])
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            scope_trainer(out, tiny_pair_dir).train()  # the Python API takes the same lock
        with pytest.raises(OutputDirInUseError):
            scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out), "--resume", "true"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the killed holder's flock: the lock is free at once, no stale file to delete.
    with output_dir_lock(str(out)), output_dir_lock(str(out)):  # re-entrant within one process
        pass
    assert scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out)]) == 0
    assert (out / "checkpoint-1").is_dir()


def test_a_symlinked_lock_file_is_never_followed(tmp_path, tiny_pair_dir, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".scope-run.lock").unlink(missing_ok=True)  # the finished run's own lock file
    (out / ".scope-run.lock").symlink_to(victim)
    with pytest.raises(OutputDirLockError, match=re.escape(f"{out / '.scope-run.lock'} is not a plain file (a symbolic link)")):
        scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out), "--resume", "true"])
    assert victim.read_text() == "precious"
    (out / ".scope-run.lock").unlink()
    os.link(victim, out / ".scope-run.lock")  # a hard link would be written through the same way
    with pytest.raises(OutputDirLockError, match="hard links"):
        with output_dir_lock(str(out)):
            pass
    assert victim.read_text() == "precious"


def test_the_lock_dies_with_its_holder_even_while_forked_workers_live_on(tmp_path):
    """A trainer killed while a forked verifier worker is busy: the orphaned worker must not keep the lock."""
    out = tmp_path / "out"
    code = ("import multiprocessing as mp, os, sys, time\n"
            "from scope_opd.checkpointing import output_dir_lock\n"
            "def worker():\n    time.sleep(600)\n"
            f"with output_dir_lock({str(out)!r}):\n"
            "    child = mp.get_context('fork').Process(target=worker, daemon=False)\n    child.start()\n"
            "    print(child.pid, flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker_pid = int(holder.stdout.readline())
    try:
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            with output_dir_lock(str(out)):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker_pid, 0)  # the orphaned worker still runs
        with output_dir_lock(str(out)):  # and yet the lock is free
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)


def test_a_fresh_run_refuses_a_reused_output_dir_unless_resuming_or_overwriting(tmp_path, tiny_pair_dir, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)  # the old run: checkpoint-1..3 and a final save
    config = cli_config(tmp_path, tiny_pair_dir, out)
    with pytest.raises(OutputDirNotEmptyError) as err:
        scope_main(["train", "--config", config])
    message = str(err.value)
    assert f"output_dir {out} is not empty" in message and "checkpoint-1" in message
    assert "--resume true" in message and "--overwrite_output_dir true" in message
    with pytest.raises(OutputDirNotEmptyError, match="holds checkpoints of a previous run"):
        scope_trainer(out, tiny_pair_dir).train()  # the Python API refuses too
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("x")
    with pytest.raises(OutputDirNotEmptyError, match="notes.txt"):
        scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, tmp_path / "stray")])

    assert scope_main(["train", "--config", config, "--overwrite_output_dir", "true"]) == 0
    # Only the new run's checkpoint is left, so a later --resume cannot mix the two runs.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1
    assert manifest_problems(str(out), read_manifest(str(out))) == []


# ---------------------------------------------------------------------------- the final save and a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only); filled to the brim on request."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield disk
    finally:
        # Lazy: a traceback kept alive by pytest may still hold a half-written file open in there.
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return filler


def test_full_disk_during_a_checkpoint_says_no_space_left_and_leaves_no_partial_checkpoint(small_disk, tiny_pair_dir):
    out = small_disk / "run"
    trainer = scope_trainer(out, tiny_pair_dir, max_steps=1)
    fill(small_disk, leave_bytes=40_000)  # less than one checkpoint
    with pytest.raises(OSError) as err:
        trainer.train()
    assert err.value.errno == errno.ENOSPC
    assert f"no space left on device while saving checkpoint {out / 'checkpoint-1'} (" in str(err.value)
    assert "iostream" not in str(err.value).split("original error")[0]
    assert not (out / "checkpoint-1").exists() and not list(out.glob(".tmp-*"))  # staging removed


def test_final_save_on_a_full_disk_keeps_the_previous_save_whole(small_disk, tiny_pair_dir):
    out = small_disk / "run"
    trainer = scope_trainer(out, tiny_pair_dir, max_steps=1, save_strategy="no")
    trainer.save_model()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert before["tokenizer_config.json"] and manifest_problems(str(out), read_manifest(str(out))) == []
    fill(small_disk, leave_bytes=20_000)
    with pytest.raises(OSError) as err:
        trainer.save_model()
    assert err.value.errno == errno.ENOSPC and f"no space left on device while saving the model to {out}" in str(err.value)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert after == before  # no 0-byte tokenizer_config.json, no half-written weights
    assert not (out / ".tmp-save").exists()


# ---------------------------------------------------------------------------- epoch-aware sampler


def test_train_sampler_order_is_a_function_of_seed_and_epoch_and_epoch_0_is_trl_order():
    from trl.trainer.utils import RepeatSampler

    def trl_sampler():
        return RepeatSampler(list(range(10)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7)

    reference = trl_sampler()
    trl_epochs = [list(reference), list(reference)]
    sampler = epoch_seeded(trl_sampler())
    assert list(sampler) == trl_epochs[0]  # epoch 0 exactly as TRL draws it
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != trl_epochs[0] and list(sampler) == epoch1  # same epoch, same order, however often
    fresh = epoch_seeded(trl_sampler())  # a resumed process
    fresh.set_epoch(1)
    assert list(fresh) == epoch1
    # Still TRL's structure: 3 full groups of 3 prompts (one of the 10 dropped), each index twice, twice over.
    assert len(epoch1) == len(reference) == 36 and len(set(epoch1)) == 9 and set(epoch1) <= set(range(10))


def test_the_trainer_uses_the_epoch_seeded_sampler(tiny_pair_dir, tmp_path):
    from scope_opd.checkpointing import EpochSeededRepeatSampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = scope_trainer(tmp_path / "out", tiny_pair_dir, save_strategy="no")
    assert isinstance(trainer._get_train_sampler(), EpochSeededRepeatSampler)


def test_kd_baseline_checkpoints_and_final_save_are_verified_and_resume(tmp_path, tiny_pair_dir):
    out = tmp_path / "kd"
    kd = ["--algorithm", "kd", "--kd_keep_only_correct", "false", "--kd_samples_per_prompt", "2"]
    assert scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out), *kd]) == 0
    assert verify_checkpoint(str(out / "checkpoint-1")).complete  # SFTTrainer through the same mixin
    assert manifest_problems(str(out), read_manifest(str(out))) == []
    assert scope_main(["train", "--config", cli_config(tmp_path, tiny_pair_dir, out), *kd,
                       "--max_steps", "2", "--resume", "true"]) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]
