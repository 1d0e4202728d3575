"""The teacher under a real DeepSpeed ZeRO config on CPU (one process, gloo), registered as TrainingArguments does.

Usage: python zero_teacher_load.py STUDENT_DIR TEACHER_DIR OUT_DIR STAGE
Writes OUT_DIR/result.json:
  load:    the teacher loaded by the trainer's rule (load_teacher_model(..., distributed_type=...)): per parameter,
           whether zero.Init partitioned it (ds_status) and its full shape (ds_shape);
  replica: KD's load (an explicit device) under the same registered config: whole parameters;
  trainer: a SCOPETrainer built on that config: its teacher's wrapper, and whether it counts as sharded.
"""

import json
import os
import sys
from pathlib import Path

for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402

from scope_opd.teachers import load_teacher_model  # noqa: E402
from test_trainer import dataset, has_digit_reward, make_args  # noqa: E402


def main():
    student_dir, teacher_dir, out, stage = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    zero = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto"}
    # TrainingArguments(deepspeed=...) builds HfTrainerDeepSpeedConfig, which registers the config with transformers
    # (transformers.integrations.deepspeed.set_hf_deepspeed_config): from then on from_pretrained runs under zero.Init.
    args = make_args(out, deepspeed=zero, use_cpu=False, teacher_model=teacher_dir)
    result = {"zero3_registered": is_deepspeed_zero3_enabled(), "distributed_type": str(args.distributed_state.distributed_type)}

    teacher = load_teacher_model(teacher_dir, dtype="float32", distributed_type=args.distributed_state.distributed_type)
    result["load"] = [{"name": n, "ds_status": str(getattr(p, "ds_status", None)), "numel": p.numel(),
                       "ds_shape": list(getattr(p, "ds_shape", p.shape))} for n, p in teacher.named_parameters()]
    result["load_frozen"] = not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    replica = load_teacher_model(teacher_dir, dtype="float32", device="cpu")
    result["replica"] = [{"name": n, "has_ds_status": hasattr(p, "ds_status"), "shape": list(p.shape)}
                         for n, p in replica.named_parameters()]
    result["zero3_registered_after_replica"] = is_deepspeed_zero3_enabled()
    del teacher, replica

    from scope_opd.trainer import SCOPETrainer

    trainer = SCOPETrainer(AutoModelForCausalLM.from_pretrained(student_dir), reward_funcs=[has_digit_reward], args=args,
                           train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(student_dir))
    result["trainer"] = {"teacher_wrapper": type(trainer.teacher.model).__name__,
                         "sharded": trainer._teacher_parameters_sharded(), "synced_ranks": trainer.teacher.synced_ranks,
                         "scores": [round(float(x), 6) for x in trainer.teacher.score([[5, 6, 7]], [[8, 9]])[0]]}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
