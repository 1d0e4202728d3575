"""Checkpoints that are whole or absent, verified on resume, in an output_dir one run owns.

transformers writes ``checkpoint-N/`` file by file and resumes from whatever it finds, so a
killed save, a truncated file, a deleted ``optimizer.pt`` or a second run writing into the same
folder all resume "successfully" with wrong state. Here:

* **Atomic checkpoints.** The whole checkpoint is written under ``output_dir/.tmp-checkpoint-N/``
  and renamed into place only once complete (a directory rename is atomic on POSIX filesystems).
* **Manifest.** The last file written into a checkpoint (and into a final save) is
  ``scope_manifest.json``: every file's size and sha256. :func:`select_resume_checkpoint` checks it
  and falls back to the newest checkpoint that is intact and complete (model, optimizer,
  scheduler, RNG, trainer state), warning what was wrong with each newer one; resuming from a
  checkpoint without optimizer/scheduler/RNG state is refused unless asked for.
* **One run per output_dir.** :func:`output_dir_lock` takes ``fcntl.flock`` on
  ``output_dir/.scope-run.lock``; the kernel drops it when the process dies, so a killed run never
  leaves it stuck. A fresh run refuses an output_dir that holds another run's checkpoints
  (the CLI: any file) unless resuming or overwriting is asked for.
* **Final save.** ``save_model`` writes into ``output_dir/.tmp-save/``, then moves each file into
  place with an atomic rename and writes the manifest last: a failed save never leaves a
  half-written file, and the manifest tells a complete set from an interrupted one.
* **Full disk.** A save that fails because the filesystem is full raises
  ``OSError(ENOSPC, "no space left on device ...")`` naming the folder, not torch's
  ``basic_ios::clear: iostream error``; the staging folder is removed, older checkpoints are intact.

:class:`AtomicCheckpointMixin` brings all of this to any ``Trainer`` subclass (SCOPETrainer, the
KD baseline's SFTTrainer) for the Python API as well as ``scope train``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
import warnings
from dataclasses import dataclass, field

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = ".tmp-"
FINAL_STAGING_NAME = ".tmp-save"
MANIFEST_NAME = "scope_manifest.json"
LOCK_NAME = ".scope-run.lock"
MANIFEST_FORMAT = 1
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Below this many free bytes (or 5% of a small filesystem), a failed save is a full disk (torch drops the errno).
_FULL_DISK_SLACK_BYTES = 1 << 20


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or is resumed from with missing state."""


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from as asked; the message names each one and what is wrong."""


class OutputDirInUseError(RuntimeError):
    """Another live process holds the output_dir lock."""


class OutputDirNotEmptyError(FileExistsError):
    """A fresh run was pointed at an output_dir holding a previous run's files."""


# ---------------------------------------------------------------------------- manifest


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: str) -> None:
    """Flush a file's data, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(directory: str) -> list[str]:
    """Relative paths of every regular file under ``directory``, manifest excluded, sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str, *, kind: str, global_step: int | None = None) -> dict:
    """Flush every file under ``directory`` to disk, then write (atomically) their sizes and sha256."""
    files = {}
    for rel in _files_under(directory):
        path = os.path.join(directory, rel)
        _fsync(path)
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "global_step": global_step,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    tmp = os.path.join(directory, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST_NAME))
    for root, _, _ in os.walk(directory):
        _fsync(root)
    return manifest


def read_manifest(directory: str) -> dict | None:
    """The manifest of ``directory``; None if there is none; ValueError naming the file if unreadable."""
    path = os.path.join(directory, MANIFEST_NAME)
    if os.path.islink(path):  # it would be read (and trusted) wherever it points
        raise ValueError(f"{path}: unreadable manifest (a symbolic link; a manifest is a file of its folder)")
    if not os.path.isfile(path):
        return None
    try:
        # O_NONBLOCK: a FIFO swapped in after the isfile check must not block the reader; fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            manifest = json.loads(f.read())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        for rel, entry in manifest["files"].items():
            if not (isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"entry {rel[:200]!r} has no integer 'size' and string 'sha256'")
    except RecursionError:
        raise ValueError(f"{path}: unreadable manifest (JSON nested too deeply)") from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable manifest ({err})") from err
    return manifest


_TRAINING_STATE_RE = re.compile(r"^(optimizer|scheduler|scaler|rng_state)[^/]*\.(pt|pth|bin)$")


def _escapes(directory: str, rel: str) -> bool:
    """Whether manifest entry ``rel`` names anything but a plain path inside ``directory`` (no '..', no symlink)."""
    parts = rel.split("/")
    if not rel or os.path.isabs(rel) or any(part in ("", ".", "..") for part in parts) or "\0" in rel:
        return True
    real_directory = os.path.realpath(directory)
    return os.path.realpath(os.path.join(real_directory, rel)) != os.path.join(real_directory, *parts)


def _unlisted(directory: str, listed) -> list[str]:
    """Entries under ``directory`` its manifest does not list: files, symlinks (followed or not), odd files."""
    found = []
    for root, dirs, files in os.walk(directory):  # does not descend into symlinked folders: they are reported
        for name in sorted(dirs):
            if os.path.islink(os.path.join(root, name)):
                found.append(os.path.relpath(os.path.join(root, name), directory))
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in listed and rel != MANIFEST_NAME or os.path.islink(os.path.join(root, name)):
                found.append(rel)
    return sorted(found)


def manifest_problems(directory: str, manifest: dict, *, tolerate_missing_state: bool = False,
                      unlisted: bool = False) -> list[str]:
    """What differs between ``directory`` and its manifest: missing files, sizes, checksums, paths outside it.

    ``tolerate_missing_state``: a missing optimizer/scheduler/scaler/RNG file is not reported here
    (the caller reports it as missing training state, which a user may choose to resume without).
    ``unlisted``: files (and symlinks) present but not listed are problems too: a checkpoint's
    manifest lists every file a resume may read, so an unlisted one is not part of the save.
    """
    problems = []
    listed = manifest["files"]
    for rel, entry in sorted(listed.items()):
        if not isinstance(rel, str) or not isinstance(entry, dict) or _escapes(directory, rel):
            problems.append(f"manifest entry {rel!r} is not a plain path inside the folder (refused, not read)")
            continue
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            if tolerate_missing_state and _TRAINING_STATE_RE.match(rel):
                continue
            problems.append(f"{rel} is missing (the manifest lists it, {entry['size']} bytes)")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            problems.append(f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (corrupted or rewritten)")
    if unlisted:
        for rel in _unlisted(directory, listed):
            kind = "a symbolic link" if os.path.islink(os.path.join(directory, rel)) else "a file"
            problems.append(f"{rel} is {kind} the manifest does not list (not part of the save; refused)")
    return problems


# ---------------------------------------------------------------------------- verifying checkpoints


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def _has_any(path: str, names=(), prefixes=()) -> bool:
    entries = os.listdir(path)
    return any(e in names for e in entries) or any(e.startswith(p) for e in entries for p in prefixes)


def _missing_training_state(path: str) -> list[str]:
    """Training state a checkpoint lacks (DeepSpeed keeps it in ``global_step*/``, FSDP in ``optimizer_0/``)."""
    missing = []
    deepspeed = _has_any(path, prefixes=("global_step",))
    if not (deepspeed or _has_any(path, names=("optimizer.pt", "optimizer.bin"), prefixes=("optimizer_",))):
        missing.append("optimizer.pt (optimizer state)")
    if not (deepspeed or _has_any(path, names=("scheduler.pt",))):
        missing.append("scheduler.pt (learning-rate schedule)")
    if not _has_any(path, names=("rng_state.pth",), prefixes=("rng_state_",)):
        missing.append("rng_state.pth (random-number generator state)")
    return missing


@dataclass
class CheckpointCheck:
    """The verdict on one checkpoint folder."""

    path: str
    problems: list[str] = field(default_factory=list)  # unusable: corrupt, truncated, unreadable
    missing_state: list[str] = field(default_factory=list)  # usable, but would resume with fresh state
    has_manifest: bool = True

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def complete(self) -> bool:
        return not self.problems and not self.missing_state

    def describe(self) -> str:
        return "; ".join(self.problems + [f"no {m}" for m in self.missing_state]) or "complete"


# Verifying a large checkpoint reads it whole; the CLI and the trainer check the same folder, so
# remember folders already verified in this process (keyed by the manifest's identity).
_VERIFIED: dict[tuple, CheckpointCheck] = {}


def verify_checkpoint(path: str) -> CheckpointCheck:
    """Check one ``checkpoint-N`` folder against its manifest and for complete training state.

    A checkpoint that is a symbolic link is refused (it may be another run's); a resume names the
    target itself to use it (:func:`check_resume_path` resolves it, saying so).
    """
    check = CheckpointCheck(path)
    if os.path.islink(path):
        check.problems.append(f"is a symbolic link to {os.path.realpath(path)} (refused: a checkpoint must be a folder "
                              "of this run; name the target to resume from it)")
        return check
    try:
        manifest = read_manifest(path)
    except ValueError as err:
        check.problems.append(str(err).replace(path + os.sep, ""))
        return check
    manifest_path = os.path.join(path, MANIFEST_NAME)
    key = None
    if manifest is not None:
        stat = os.stat(manifest_path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key in _VERIFIED:
            return _VERIFIED[key]
        check.problems += manifest_problems(path, manifest, tolerate_missing_state=True, unlisted=True)
    else:
        check.has_manifest = False
        check.problems.append(f"no {MANIFEST_NAME} (not a complete save by scope-opd)")
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        check.problems.append("no trainer_state.json")
    elif not any("trainer_state.json" in p for p in check.problems):
        try:
            with open(state_path) as f:
                json.load(f)["global_step"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            check.problems.append(f"trainer_state.json is not a valid trainer state ({type(err).__name__}: {err})")
    if not (_has_any(path, names=_WEIGHT_FILES, prefixes=("pytorch_model_fsdp_", "global_step"))):
        check.problems.append("no model weights (model.safetensors or similar)")
    if not check.problems:
        check.missing_state = _missing_training_state(path)
    if key is not None and not check.problems:
        _VERIFIED[key] = check
    return check


def checkpoint_global_step(path: str) -> int:
    """``global_step`` recorded in a checkpoint's ``trainer_state.json``."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def _checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """Newest ``checkpoint-N`` in ``output_dir`` that matches its manifest and holds full training state."""
    for _, path in _checkpoint_dirs(output_dir):
        if verify_checkpoint(path).complete:
            return path
    return None


def select_resume_checkpoint(output_dir: str, *, allow_incomplete: bool = False) -> str | None:
    """The checkpoint a resume of ``output_dir`` should load; None if the folder has no checkpoint.

    Newer checkpoints that are damaged or lack training state are skipped with a
    :class:`CheckpointWarning` naming what is wrong. When none is complete, ``allow_incomplete``
    takes the newest intact one (fresh optimizer/schedule/RNG, warned); otherwise, and when none is
    even intact, :class:`CheckpointError` lists every checkpoint and its problems.
    """
    checks = [verify_checkpoint(path) for _, path in _checkpoint_dirs(output_dir)]
    if not checks:
        return None
    chosen = next((c for c in checks if c.complete), None)
    if chosen is None and allow_incomplete:
        chosen = next((c for c in checks if c.intact), None)
    if chosen is None:
        listing = "\n".join(f"  {c.path}: {c.describe()}" for c in checks)
        options = []
        if any(c.intact for c in checks):
            options.append("pass --resume_allow_incomplete true (Python: train(..., allow_incomplete_checkpoint=True)) "
                           "to resume from the newest intact one with fresh optimizer/scheduler/RNG state")
        options += ["pass a checkpoint you trust to trainer.train(resume_from_checkpoint=PATH)",
                    "start over with --overwrite_output_dir true"]
        raise CheckpointError(
            f"no complete checkpoint to resume from in {output_dir}:\n{listing}\nTo go on: {'; or '.join(options)}."
        )
    for check in checks:
        if check is chosen:
            break
        warnings.warn(f"skipping checkpoint {check.path}: {check.describe()}; resuming from the older {chosen.path}",
                      CheckpointWarning, stacklevel=2)
    if chosen.missing_state:
        warnings.warn(f"resuming from {chosen.path} without {', '.join(chosen.missing_state)}: that state starts "
                      "fresh, so the run will not continue as it would have", CheckpointWarning, stacklevel=2)
    return chosen.path


def check_resume_path(path: str, *, allow_incomplete: bool = False) -> str:
    """Verify a checkpoint the user named explicitly: damage is an error, missing state too unless allowed."""
    if not os.path.isdir(path):
        raise CheckpointError(f"cannot resume from {path}: no such checkpoint folder")
    if os.path.islink(path):
        target = os.path.realpath(path)
        warnings.warn(f"resume checkpoint {path} is a symbolic link: resolved to {target}, whose files are verified and "
                      "read", CheckpointWarning, stacklevel=2)
        check = verify_checkpoint(target)
    else:
        check = verify_checkpoint(path)
    problems = [p for p in check.problems if check.has_manifest or MANIFEST_NAME not in p]
    if problems:
        raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
    if not check.has_manifest:
        check.missing_state = _missing_training_state(path)
        warnings.warn(f"{path} has no {MANIFEST_NAME} (not written by scope-opd): its files cannot be verified",
                      CheckpointWarning, stacklevel=2)
    if check.missing_state:
        if not allow_incomplete:
            raise CheckpointError(
                f"cannot resume from {path}: no {', '.join(check.missing_state)}; the optimizer/schedule/RNG would "
                "silently start fresh. Pass --resume_allow_incomplete true (Python: "
                "train(..., allow_incomplete_checkpoint=True)) to resume anyway."
            )
        warnings.warn(f"resuming from {path} without {', '.join(check.missing_state)}: that state starts fresh",
                      CheckpointWarning, stacklevel=2)
    return path


# ---------------------------------------------------------------------------- one run per output_dir

# output_dir (real path) -> [fd, depth]: flock is per open file, so a second flock from this same
# process (the CLI, then the trainer inside it) must reuse the first instead of blocking itself.
_HELD_LOCKS: dict[str, list[int]] = {}


def _close_held_locks_in_child() -> None:
    """In a forked child (a verifier worker), close the inherited lock descriptors.

    flock belongs to the open file, which a fork shares: a worker orphaned when the trainer is killed
    (or one that hangs) would otherwise hold the run's lock after the trainer is gone, and a resume
    would be refused naming a dead pid. Closing a duplicate never unlocks it for the parent.
    """
    for fd, _ in _HELD_LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class OutputDirLockError(RuntimeError):
    """The output_dir lock file is not a plain file of its own (a symbolic link, a hard link, a folder)."""


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """Hold an exclusive lock on ``output_dir`` (created if missing) for the duration of the block.

    Raises :class:`OutputDirInUseError` at once if another live process holds it. The lock is an
    ``flock`` on ``output_dir/.scope-run.lock``, released by the kernel when the holder exits or is killed.
    """
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
    else:
        lock_path = os.path.join(output_dir, LOCK_NAME)
        # O_NOFOLLOW: a symlink planted there would have its target truncated and overwritten below.
        # O_CLOEXEC: a program the trainer runs does not inherit the lock (forks: _close_held_locks_in_child).
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise OutputDirLockError(
                    f"{lock_path} is not a plain file ({'a symbolic link' if os.path.islink(lock_path) else err.strerror}); "
                    "refusing to follow or write it. Remove it (nothing a run needs is kept there) and start again."
                ) from None
            raise
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            os.close(fd)
            raise OutputDirLockError(
                f"{lock_path} is not a plain file of its own ({status.st_nlink} hard links); refusing to write it. "
                "Remove it (nothing a run needs is kept there) and start again."
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise OutputDirInUseError(
                f"output_dir {output_dir} is in use by another training run ({holder}; lock {lock_path}). "
                "Two runs in one output_dir overwrite each other's checkpoints: wait for that run to end, or use "
                "another output_dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}: {' '.join(sys.argv)[:500]}\n".encode(), 0)
        _HELD_LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        held = _HELD_LOCKS[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD_LOCKS[key]
            os.close(held[0])  # closing the last descriptor releases the flock


def _previous_run_entries(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(e for e in os.listdir(output_dir) if e != LOCK_NAME)


def remove_previous_checkpoints(output_dir: str) -> list[str]:
    """Delete the ``checkpoint-N`` and staging folders (what a resume would read) of a previous run."""
    removed = []
    for name in _previous_run_entries(output_dir):
        path = os.path.join(output_dir, name)
        if not (_CHECKPOINT_RE.match(name) or name.startswith(STAGING_PREFIX)):
            continue
        if os.path.islink(path):  # the link goes, never what it points to (it may be another run's)
            os.unlink(path)
            removed.append(name)
        elif os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
    return removed


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """``scope train``: refuse a non-empty output_dir unless resuming, or clear its checkpoints when overwriting."""
    entries = _previous_run_entries(output_dir)
    if not entries or resume:
        return
    if overwrite:
        removed = remove_previous_checkpoints(output_dir)
        if removed:
            print(f"scope train: --overwrite_output_dir: removed {len(removed)} checkpoint folder(s) of the previous "
                  f"run in {output_dir} ({', '.join(removed[:5])}{', ...' if len(removed) > 5 else ''})")
        return
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    raise OutputDirNotEmptyError(
        f"output_dir {output_dir} is not empty ({shown}). A new run there would overwrite some of the old run's "
        "checkpoints and keep others, and a later --resume would mix the two runs. Pass --resume true to continue "
        "that run, --overwrite_output_dir true to replace it, or choose another output_dir."
    )


# ---------------------------------------------------------------------------- full disk


def _free_bytes(path: str) -> tuple[int, int] | None:
    """(free bytes for unprivileged users, filesystem size) of the filesystem holding ``path``."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _is_disk_full(err: BaseException, free: tuple[int, int] | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    # torch's C++ stream writer drops the errno ("basic_ios::clear: iostream error", "unexpected pos
    # 576 vs 534"): a save that fails while the filesystem has (nearly) no space left is a full disk.
    return free is not None and free[0] < min(_FULL_DISK_SLACK_BYTES, free[1] // 20)


@contextlib.contextmanager
def disk_full_is_named(directory: str, what: str, cleanup=None):
    """Run a save; on failure run ``cleanup``, and re-raise a full disk as ``OSError(ENOSPC)`` naming ``directory``."""
    try:
        yield
    except BaseException as err:
        free = _free_bytes(directory)  # before cleanup gives the space back
        if cleanup is not None:
            cleanup()
        if isinstance(err, Exception) and _is_disk_full(err, free):
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while {what} {directory} ({free[0] if free else '?'} bytes free "
                f"there; original error: {type(err).__name__}: {str(err)[:200]}). Free some space or lower "
                "save_total_limit, then resume",
            ) from err
        raise


# ---------------------------------------------------------------------------- the final save


def atomic_publish(staging: str, target: str) -> None:
    """Move the files of a complete ``staging`` folder into ``target``, each by atomic rename, manifest last.

    The target's old manifest is removed first, so an interruption midway leaves whole files but no
    manifest claiming a complete set; files of the previous save that this one does not have are removed.
    """
    os.makedirs(target, exist_ok=True)
    try:
        old = read_manifest(target)
    except ValueError:
        old = None
    new_files = _files_under(staging)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(target, MANIFEST_NAME))
    _fsync(target)
    for rel in new_files:
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(os.path.join(staging, rel), destination)
    for rel in (old or {}).get("files", {}):
        # The old manifest is whatever sits in target: an entry naming a path outside it ('../x', '/x',
        # through a symlinked folder) would otherwise delete that file.
        if rel not in new_files and not _escapes(target, rel):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target, rel))
    for folder in {os.path.dirname(os.path.join(target, rel)) for rel in new_files}:
        _fsync(folder)
    os.replace(os.path.join(staging, MANIFEST_NAME), os.path.join(target, MANIFEST_NAME))
    _fsync(target)
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- epoch-aware sampling


def epoch_seeded(sampler):
    """Make TRL's ``RepeatSampler`` shuffle each epoch with ``seed + epoch`` (the Trainer calls ``set_epoch``).

    TRL's sampler seeds its generator once and draws one permutation per ``__iter__``, so a fresh
    process resumed in epoch ``e`` draws epoch 0's order again. Epoch 0 keeps TRL's order exactly
    (``seed + 0``); everything else (groups, repeats, dropped last batch) is TRL's.
    """
    if type(sampler) is not _repeat_sampler_class():
        raise TypeError(f"expected TRL's RepeatSampler, got {type(sampler).__name__}: adapt epoch_seeded")
    return EpochSeededRepeatSampler(
        data_source=sampler.data_source, mini_repeat_count=sampler.mini_repeat_count, batch_size=sampler.batch_size,
        repeat_count=sampler.repeat_count, shuffle=sampler.shuffle, seed=sampler.seed,
    )


def _repeat_sampler_class():
    from trl.trainer.utils import RepeatSampler

    return RepeatSampler


class EpochSeededRepeatSampler(_repeat_sampler_class()):
    """``trl.trainer.utils.RepeatSampler`` whose permutation is a function of (seed, epoch) only."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + self.epoch)
        yield from super().__iter__()


# ---------------------------------------------------------------------------- the trainer mixin


class AtomicCheckpointMixin:
    """Put before the Trainer class in the bases: ``class T(AtomicCheckpointMixin, GRPOTrainer)``.

    Subclasses may save extra resume state into each checkpoint by overriding
    :meth:`_save_resume_state` / :meth:`_load_resume_state` (covered by the manifest).
    """

    _checkpoint_staging_dir: str | None = None

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, *,
              allow_incomplete_checkpoint: bool = False, overwrite_output_dir: bool = False):
        """``Trainer.train`` with verified resume and an output_dir this run owns.

        ``resume_from_checkpoint=True`` picks :func:`select_resume_checkpoint`; a path is verified by
        :func:`check_resume_path`. ``allow_incomplete_checkpoint`` accepts a checkpoint without
        optimizer/scheduler/RNG state. A fresh run refuses an output_dir holding checkpoints unless
        ``overwrite_output_dir`` (which deletes them).
        """
        args = self.args
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        writes_checkpoints = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        lock = output_dir_lock(args.output_dir) if args.should_save and writes_checkpoints else contextlib.nullcontext()
        with lock:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = select_resume_checkpoint(args.output_dir,
                                                                  allow_incomplete=allow_incomplete_checkpoint)
                if resume_from_checkpoint is None:
                    raise CheckpointError(f"resume_from_checkpoint=True but {args.output_dir} holds no checkpoint")
            elif resume_from_checkpoint is not None:
                check_resume_path(str(resume_from_checkpoint), allow_incomplete=allow_incomplete_checkpoint)
            else:
                previous = [p for _, p in _checkpoint_dirs(args.output_dir)]
                if previous and overwrite_output_dir:
                    if args.should_save:
                        remove_previous_checkpoints(args.output_dir)
                elif previous:
                    raise OutputDirNotEmptyError(
                        f"output_dir {args.output_dir} holds checkpoints of a previous run ({os.path.basename(previous[0])}"
                        f"{', ...' if len(previous) > 1 else ''}): a fresh run would overwrite some and keep others. "
                        "Pass resume_from_checkpoint=True to continue it, overwrite_output_dir=True to replace it, "
                        "or use another output_dir."
                    )
            if resume_from_checkpoint is not None:
                self._load_resume_state(str(resume_from_checkpoint), allow_incomplete=allow_incomplete_checkpoint)
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval)

    def _save_resume_state(self, checkpoint_dir: str) -> None:
        """Hook: write extra state needed to resume exactly (called on every process)."""

    def _load_resume_state(self, checkpoint_dir: str, allow_incomplete: bool = False) -> None:
        """Hook: restore what :meth:`_save_resume_state` wrote, before training resumes."""

    def _get_output_dir(self, trial):
        # While saving, the parent writes its checkpoint folder under the staging directory.
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed save
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging
        written = os.path.join(staging, name)
        with disk_full_is_named(os.path.join(run_dir, name), "saving checkpoint",
                                cleanup=lambda: shutil.rmtree(staging, ignore_errors=True)):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._checkpoint_staging_dir = None
            self._save_resume_state(written)
            self.accelerator.wait_for_everyone()  # every rank's shards are written
            if self.args.should_save:
                write_manifest(written, kind="checkpoint", global_step=self.state.global_step)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.islink(final):
                os.unlink(final)
            elif os.path.exists(final):
                shutil.rmtree(final)
            os.replace(written, final)
            _fsync(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._checkpoint_staging_dir is not None or _internal_call:
            return super().save_model(output_dir, _internal_call)  # inside a checkpoint: already staged
        target = output_dir if output_dir is not None else self.args.output_dir
        staging = os.path.join(target, FINAL_STAGING_NAME)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        with disk_full_is_named(target, "saving the model to",
                                cleanup=lambda: shutil.rmtree(staging, ignore_errors=True)):
            super().save_model(staging, _internal_call=True)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_manifest(staging, kind="final", global_step=self.state.global_step)
                atomic_publish(staging, target)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
