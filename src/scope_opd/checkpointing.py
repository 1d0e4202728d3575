"""Atomic checkpoints and resume, for any transformers ``Trainer`` subclass.

transformers writes ``checkpoint-N/`` file by file, so a job killed mid-save leaves a
folder that ``get_last_checkpoint`` happily picks up. Here the whole checkpoint is
written under ``output_dir/.tmp-checkpoint-N/`` and renamed into place only once
complete (a directory rename is atomic on POSIX filesystems), so ``checkpoint-N``
either exists whole or not at all. :func:`last_complete_checkpoint` additionally
requires ``trainer_state.json`` (the last file transformers writes), so folders left
by other tools are skipped too.
"""

from __future__ import annotations

import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """Newest ``checkpoint-N`` in ``output_dir`` that holds a ``trainer_state.json``; None if none."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


class AtomicCheckpointMixin:
    """Put before the Trainer class in the bases: ``class T(AtomicCheckpointMixin, GRPOTrainer)``."""

    _checkpoint_staging_dir: str | None = None

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
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            _fsync_dir(run_dir)
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
