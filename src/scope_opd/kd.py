"""KD baseline (paper section 4): offline SFT of the student on teacher-generated solutions.

1. the teacher samples ``kd_samples_per_prompt`` solutions per training prompt
   (rollout temperature, ``max_completion_length`` tokens), with the same sampler as ``scope eval``;
2. the verifier scores them; with ``kd_keep_only_correct`` only verified-correct ones are kept;
3. TRL's ``SFTTrainer`` fine-tunes the student on (prompt, completion) pairs, loss on the
   completion only, with the optimisation settings of the ``SCOPEConfig`` (lr, steps, batch size,
   seed, checkpoints) so that KD runs under the same budget as the on-policy methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from .trainer import SCOPEConfig


def generate_teacher_dataset(
    teacher_model, tokenizer, train_dataset: Dataset, args: SCOPEConfig, *, progress: bool = True
) -> tuple[Dataset, dict]:
    """(prompt, completion) pairs sampled from the teacher and filtered by the verifier."""
    from .evaluation.sampling import sample_completions
    from .verifiers import RewardFunction, get_verifier

    prompts = list(train_dataset["prompt"])
    golds = list(train_dataset[args.answer_field])
    samples = sample_completions(
        teacher_model,
        tokenizer,
        prompts,
        n=args.kd_samples_per_prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        max_new_tokens=args.max_completion_length,
        batch_size=max(1, args.per_device_train_batch_size),
        seed=args.seed,
        progress=progress,
    )
    reward = RewardFunction(get_verifier(args.verifier), answer_field=args.answer_field, timeout_s=args.verifier_timeout)
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat_completions = [c for group in samples for c in group]
    flat_golds = [g for g, group in zip(golds, samples) for _ in group]
    scores = reward(prompts=flat_prompts, completions=flat_completions, **{args.answer_field: flat_golds})
    keep = [not args.kd_keep_only_correct or s >= args.correct_threshold - 1e-6 for s in scores]
    rows = {"prompt": [], "completion": []}
    for prompt, completion, kept in zip(flat_prompts, flat_completions, keep):
        if kept:
            rows["prompt"].append(prompt)
            # Conversational prompts take the completion as an assistant message.
            rows["completion"].append(
                [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
            )
    stats = {
        "teacher_samples": len(flat_completions),
        "teacher_correct": sum(s >= args.correct_threshold - 1e-6 for s in scores),
        "kept": len(rows["prompt"]),
    }
    if not rows["prompt"]:
        raise ValueError(
            f"KD: the teacher produced no verified-correct sample out of {len(flat_completions)}; "
            "set kd_keep_only_correct=False or check the teacher/verifier"
        )
    return Dataset.from_dict(rows), stats


def _atomic_sft_trainer():
    from trl import SFTTrainer

    from .checkpointing import AtomicCheckpointMixin

    class AtomicSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
        pass

    return AtomicSFTTrainer


def build_kd_trainer(
    model, tokenizer, train_dataset: Dataset, args: SCOPEConfig, *, teacher_model=None, resume_from_checkpoint=None,
    callbacks=None, progress: bool = True,
):
    """Sample and filter the teacher's solutions, then return the ``SFTTrainer`` (not yet trained)."""
    from trl import SFTConfig

    AtomicSFTTrainer = _atomic_sft_trainer()

    if teacher_model is None:
        if not args.teacher_model:
            raise ValueError("algorithm='kd' needs teacher_model (hub id or path) to generate the SFT data")
        teacher_model = AutoModelForCausalLM.from_pretrained(args.teacher_model, dtype="auto")
        teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_model)
        from .teachers import check_tokenizers_match

        check_tokenizers_match(tokenizer, teacher_tokenizer, getattr(model.config, "_name_or_path", "student"), args.teacher_model)
    teacher_model.to(model.device)
    teacher_model.eval()
    kd_data_path = Path(args.output_dir) / "kd_teacher_samples.jsonl"
    if resume_from_checkpoint and kd_data_path.exists():
        # Resuming: reuse the sampled data so the SFT run continues on the same examples.
        sft_dataset = Dataset.from_json(str(kd_data_path))
        stats = {}
    else:
        sft_dataset, stats = generate_teacher_dataset(teacher_model, tokenizer, train_dataset, args, progress=progress)
        os.makedirs(args.output_dir, exist_ok=True)
        tmp = kd_data_path.with_suffix(".jsonl.tmp")
        sft_dataset.to_json(str(tmp))
        os.replace(tmp, kd_data_path)
        (Path(args.output_dir) / "kd_stats.json").write_text(json.dumps(stats, indent=2))

    # Only the generic optimisation/logging/checkpoint settings carry over (the ones every
    # transformers TrainingArguments has); GRPO-specific fields such as loss_type do not.
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    shared.update(max_length=None, completion_only_loss=True)
    sft_args = SFTConfig(**shared)
    trainer = AtomicSFTTrainer(
        model=model, args=sft_args, train_dataset=sft_dataset, processing_class=tokenizer, callbacks=callbacks
    )
    if stats:  # kept with the run's logs (trainer_state.json) without printing before training starts
        trainer.state.log_history.append({**{f"kd/{k}": float(v) for k, v in stats.items()}, "step": 0})
    return trainer


def train_kd(
    model, tokenizer, train_dataset: Dataset, args: SCOPEConfig, *, teacher_model=None, resume_from_checkpoint=None,
    callbacks=None,
):
    """Run the KD baseline; returns the ``SFTTrainer`` after training (model saved to ``output_dir``)."""
    trainer = build_kd_trainer(model, tokenizer, train_dataset, args, teacher_model=teacher_model,
                               resume_from_checkpoint=resume_from_checkpoint, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer
