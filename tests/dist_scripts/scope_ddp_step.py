"""One SCOPE optimiser step on 2 CPU processes (torchrun, gloo) with gradient accumulation 2.

Each rank saves the micro-batches it optimised (inputs, loss, the policy's log-probs of those rows) so the
test can check that DDP optimises scope_loss of the whole global batch. Usage:
    torchrun --nproc_per_node 2 scope_ddp_step.py STUDENT_DIR TEACHER_DIR OUT_DIR AGGREGATION
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers import InProcessTeacher
from test_trainer import dataset, has_digit_reward, make_args
from test_trainer_fidelity import MicroBatchRecorder


class CountingTeacher:
    """The real in-process teacher, with a per-process request counter like ServerTeacher's."""

    def __init__(self, path):
        self.inner = InProcessTeacher(AutoModelForCausalLM.from_pretrained(path))
        self.calls = 0

    def score(self, prompt_ids, completion_ids):
        self.calls += 1
        return self.inner.score(prompt_ids, completion_ids)

    def stats_delta(self):
        delta, self.calls = {"requests": self.calls}, 0
        return delta


def main():
    student_dir, teacher_dir, out, aggregation = sys.argv[1:5]
    torch.set_num_threads(1)
    out = Path(out)
    args = make_args(out, loss_aggregation=aggregation, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     teacher_model=None)
    trainer = MicroBatchRecorder(
        AutoModelForCausalLM.from_pretrained(student_dir), reward_funcs=[has_digit_reward], args=args,
        train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(student_dir),
        teacher=CountingTeacher(teacher_dir),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"micro_batches": trainer.micro_batches}, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
