"""Checkpoint manifests and the final save attacked after issue 18's hardening: each finding on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from scope_opd.checkpointing import MANIFEST_NAME, atomic_publish, verify_checkpoint, write_manifest


def _staging(tmp_path, name="staging"):
    staging = tmp_path / name
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"new weights")
    write_manifest(str(staging), kind="final", global_step=1)
    return staging


def test_the_final_save_never_deletes_files_outside_the_output_dir_named_by_its_old_manifest(tmp_path):
    """atomic_publish removed every file the target's old manifest listed that the new save lacks, wherever it was.

    A manifest left in output_dir (planted, or another tool's) listing '../x', an absolute path or a path
    through a symlinked folder deleted those files when the trainer saved its final model.
    """
    target, outside = tmp_path / "run", tmp_path / "elsewhere"
    target.mkdir()
    outside.mkdir()
    victims = [outside / "relative.txt", outside / "absolute.txt", outside / "through_link.txt"]
    for victim in victims:
        victim.write_text("keep me")
    (target / "linked").symlink_to(outside, target_is_directory=True)
    (target / "stale.bin").write_bytes(b"old save")  # a file of the previous save: removal is the intended behaviour
    entry = {"size": 1, "sha256": "0" * 64}
    old_files = {"../elsewhere/relative.txt": entry, str(victims[1]): entry, "linked/through_link.txt": entry,
                 "stale.bin": entry}
    (target / MANIFEST_NAME).write_text(json.dumps({"format": 1, "kind": "final", "files": old_files}))

    atomic_publish(str(_staging(tmp_path)), str(target))

    for victim in victims:
        assert victim.read_text() == "keep me", f"{victim} was deleted by the final save"
    assert not (target / "stale.bin").exists()
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert "model.safetensors" in json.loads((target / MANIFEST_NAME).read_text())["files"]


@pytest.mark.parametrize("manifest_text", [
    "[" * 100_000 + "]" * 100_000,
    '{"files": {"model.safetensors": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    '{"files": {"model.safetensors": {}}}',
    '{"files": {"model.safetensors": {"size": 11}}}',
    "[]",
], ids=["deep", "deep-entry", "entry-without-size", "entry-without-sha256", "not-an-object"])
def test_a_malformed_manifest_is_a_problem_naming_it_not_a_crash(tmp_path, manifest_text):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"new weights")
    (checkpoint / MANIFEST_NAME).write_text(manifest_text)
    check = verify_checkpoint(str(checkpoint))  # before: RecursionError / KeyError out of the resume check
    assert any(MANIFEST_NAME in problem and "unreadable manifest" in problem for problem in check.problems), check.problems


def test_a_symlinked_manifest_is_refused_not_read(tmp_path):
    checkpoint = _staging(tmp_path, "checkpoint-1")
    real = tmp_path / "elsewhere.json"
    os.replace(checkpoint / MANIFEST_NAME, real)
    (checkpoint / MANIFEST_NAME).symlink_to(real)
    check = verify_checkpoint(str(checkpoint))
    assert any("symbolic link" in problem and MANIFEST_NAME in problem for problem in check.problems), check.problems


def test_fifos_in_a_checkpoint_never_block_its_check(tmp_path):
    """A FIFO as the manifest, as a listed file and as an unlisted one: the check returns, naming each problem."""
    script = textwrap.dedent(f"""
        import json, os
        from scope_opd.checkpointing import MANIFEST_NAME, verify_checkpoint, write_manifest
        root = {str(tmp_path)!r}
        listed = os.path.join(root, "checkpoint-1")
        os.makedirs(listed)
        open(os.path.join(listed, "model.safetensors"), "wb").write(b"w")
        write_manifest(listed, kind="checkpoint", global_step=1)
        os.remove(os.path.join(listed, "model.safetensors"))
        os.mkfifo(os.path.join(listed, "model.safetensors"))
        os.mkfifo(os.path.join(listed, "extra.pt"))
        as_manifest = os.path.join(root, "checkpoint-2")
        os.makedirs(as_manifest)
        os.mkfifo(os.path.join(as_manifest, MANIFEST_NAME))
        print(json.dumps([verify_checkpoint(listed).problems, verify_checkpoint(as_manifest).problems]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed_problems, manifest_problems = json.loads(done.stdout)
    assert any(p.startswith("model.safetensors") for p in listed_problems), listed_problems
    assert any(p.startswith("extra.pt") for p in listed_problems), listed_problems
    assert manifest_problems, "a FIFO manifest passed as a checkpoint"
