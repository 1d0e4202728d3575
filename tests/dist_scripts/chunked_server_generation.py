"""Chunked generation (rollout_chunk_groups) through TRL's vLLM server mode on 2 CPU processes (torchrun, gloo).

For each case (per_device_train_batch_size, rollout_chunk_groups), with num_generations 4: build the
SCOPEConfig (which may refuse the setting), else run one GRPO step whose prompts go through TRL's real
server-mode generation to the stand-in server (tests/stand_in_vllm.py), and record, as the reward function
sees them, how many rows got a completion that is not derived from their own prompt. Usage:
    torchrun --nproc_per_node 2 chunked_server_generation.py STUDENT_DIR SERVER_URL OUT_DIR B:K [B:K ...]
"""

import json
import os
import sys
from pathlib import Path

import torch
import trl.trainer.grpo_trainer as grpo_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from stand_in_vllm import StandInServerGeneration
from test_trainer import dataset, make_args
from scope_opd.trainer import SCOPETrainer

grpo_trainer.VLLMGeneration = StandInServerGeneration  # TRL builds its server-mode backend from this name


def run_case(student_dir, url, out, batch, chunks):
    seen = []

    def own_prompt_reward(prompts, completions, **kwargs):
        seen.extend(zip(prompts, completions))
        return [float(prompt.endswith(completion)) for prompt, completion in zip(prompts, completions)]

    try:
        args = make_args(out / f"b{batch}k{chunks}", algorithm="grpo", per_device_train_batch_size=batch,
                         num_generations=4, rollout_chunk_groups=chunks, use_vllm=True, vllm_mode="server",
                         vllm_server_base_url=url, vllm_importance_sampling_correction=False, teacher_model=None)
    except ValueError as err:
        return {"refused": str(err)}
    trainer = SCOPETrainer(AutoModelForCausalLM.from_pretrained(student_dir), reward_funcs=[own_prompt_reward],
                           args=args, train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(student_dir))
    trainer.train()
    mispaired = [[p, c] for p, c in seen if not p.endswith(c)]
    return {"rows": len(seen), "mispaired": mispaired}


def main():
    student_dir, url, out = sys.argv[1:4]
    torch.set_num_threads(1)
    out = Path(out)
    results = {}
    for case in sys.argv[4:]:
        batch, chunks = (int(x) for x in case.split(":"))
        results[case] = run_case(student_dir, url, out, batch, chunks)
    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
