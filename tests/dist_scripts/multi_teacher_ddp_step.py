"""One SCOPE step on 2 CPU processes (torchrun, gloo) with two key-routed in-process teachers.

Each rank saves the completions each of its teachers scored, so the test can check that the logged
teacher/<name>/* counters are sums over both processes. Usage:
    torchrun --nproc_per_node 2 multi_teacher_ddp_step.py STUDENT_DIR TEACHER_A_DIR TEACHER_B_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers import InProcessTeacher
from scope_opd.trainer import SCOPETrainer
from test_trainer import PROMPTS, has_digit_reward, make_args


class Recording:
    def __init__(self, path):
        self.inner = InProcessTeacher(AutoModelForCausalLM.from_pretrained(path))
        self.completions = []

    def score(self, prompt_ids, completion_ids):
        self.completions.extend(list(c) for c in completion_ids)
        return self.inner.score(prompt_ids, completion_ids)


def main():
    student_dir, a_dir, b_dir, out = sys.argv[1:5]
    torch.set_num_threads(1)
    out = Path(out)
    args = make_args(out, per_device_train_batch_size=8, teachers={"a": {"model": a_dir}, "b": {"model": b_dir}},
                     teacher_routing="key")
    teachers = {"a": Recording(a_dir), "b": Recording(b_dir)}
    # Two prompts of each teacher, so that each process's half of the batch holds rows of both.
    data = Dataset.from_dict({"prompt": PROMPTS * 2, "teacher": ["a", "b", "a", "b", "b", "a", "b", "a"]})
    trainer = SCOPETrainer(
        AutoModelForCausalLM.from_pretrained(student_dir), reward_funcs=[has_digit_reward], args=args,
        train_dataset=data, processing_class=AutoTokenizer.from_pretrained(student_dir), teacher=teachers,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({name: t.completions for name, t in teachers.items()}))
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
