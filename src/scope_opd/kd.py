"""KD baseline (paper section 4): offline SFT of the student on teacher-generated solutions.

1. every training prompt is rendered to token ids by TRL's rule
   (:func:`scope_opd.prompts.prompt_token_ids`: chat messages through the chat template,
   text as it is), the same ids the on-policy trainer would give the student;
2. the teacher samples ``kd_samples_per_prompt`` solutions per prompt (rollout temperature,
   top-p / top-k, ``max_completion_length`` tokens) on the accelerator of each process,
   through vLLM when ``use_vllm`` is set; the prompts are split across processes in
   contiguous shards and the results gathered, so each prompt is sampled once in all;
3. the verifier scores them; with ``kd_keep_only_correct`` only verified-correct ones are kept;
4. TRL's ``SFTTrainer`` fine-tunes the student on prompt ids + the teacher's *sampled ids*,
   loss on the completion only, with the optimisation settings of the ``SCOPEConfig`` (lr,
   steps, batch size, seed, checkpoints) so that KD runs under the same budget as the
   on-policy methods.

Why token ids rather than (prompt, completion) text for the SFT rows: a conversational
completion would be re-rendered by the chat template, and DeepSeek-R1-Distill's template
drops everything up to ``</think>`` from assistant turns, so the student would be trained on
the teacher's final answer without its reasoning; re-encoding text could also double a BOS
or re-tokenise differently. A finished sample ends with an EOS id that stops the student
(the teacher's own EOS when the student's tokenizer or generation config stops on it, else
the student tokenizer's ``eos_token_id``, which is what TRL appends to text completions);
a sample cut at ``max_completion_length`` has no EOS, so the student is not taught to stop
there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from datasets import Dataset
from transformers import TrainingArguments

from .trainer import SCOPEConfig

SFT_COLUMNS = ("input_ids", "completion_mask")


def rank_shard(num_items: int, rank: int, world_size: int) -> range:
    """Indices of the contiguous shard of ``num_items`` that process ``rank`` of ``world_size`` takes.

    Shard sizes differ by at most one, the first ``num_items % world_size`` ranks taking one
    more (as ``accelerate``'s ``split_between_processes``); concatenating the shards in rank
    order gives ``range(num_items)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a process of a world of {world_size}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_shards(local: list) -> list:
    """Every process's ``local`` list, concatenated in rank order (on every process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    return [item for shard in shards for item in shard]


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def sft_row(prompt_ids: list[int], completion, *, stop_ids: set[int], eos_token_id: int | None) -> dict:
    """One SFT row: ``input_ids`` = prompt ids + the sampled completion ids, ``completion_mask`` 1 on the latter.

    ``completion`` is a :class:`~scope_opd.evaluation.sampling.Completion`. A finished one
    keeps its EOS id when it is in ``stop_ids`` (the ids that stop the student), else the
    EOS is replaced by ``eos_token_id``; an unfinished one (cut at the token budget) gets none.
    """
    ids = list(completion.token_ids)
    if completion.finished and ids and ids[-1] not in stop_ids:
        if eos_token_id is None:
            raise ValueError("KD: the student tokenizer has no eos_token_id to end the teacher's finished samples with")
        ids[-1] = eos_token_id
    return {"input_ids": list(prompt_ids) + ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(ids)}


def _sampling_settings(args: SCOPEConfig, seed: int):
    from .sampling import SamplingSettings

    return SamplingSettings(
        n=args.kd_samples_per_prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        max_new_tokens=args.max_completion_length,
        repetition_penalty=args.repetition_penalty,
        batch_size=max(1, args.per_device_train_batch_size),
        seed=seed,
    )


def _vllm_sample(args: SCOPEConfig, prompt_ids: list[list[int]], settings, world_size: int, progress: bool):
    """This process's share through an offline ``vllm.LLM`` of the teacher, one engine per process."""
    if not isinstance(args.teacher_model, str) or not args.teacher_model:
        raise ValueError("KD with use_vllm=True needs teacher_model as a hub id or path (vLLM loads it itself)")
    if args.vllm_tensor_parallel_size != 1:
        raise ValueError(
            f"KD sampling through vLLM runs one engine per process (vllm_tensor_parallel_size=1); "
            f"got vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}"
        )
    try:
        from vllm import LLM
    except ImportError as error:
        raise ValueError(f"use_vllm=True but vLLM cannot be imported ({error}); install vllm or set use_vllm=False") from error
    from .sampling import vllm_generate_completions

    llm = LLM(
        model=args.teacher_model,
        dtype=args.teacher_dtype,
        seed=settings.seed,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        # The model's own maximum (131072 for Qwen) would reserve KV cache no KD sample can use.
        max_model_len=args.vllm_max_model_length
        or max((len(ids) for ids in prompt_ids), default=0) + args.max_completion_length,
        # As TRL's colocate mode: each process drives its own engine inside the launcher's process group.
        distributed_executor_backend="external_launcher" if world_size > 1 else None,
    )
    try:
        return vllm_generate_completions(llm, prompt_ids, settings, progress=progress)
    finally:
        # Hand the accelerator's memory back for the SFT run (what vLLM frees on collection).
        import gc

        import torch

        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate_teacher_dataset(
    teacher_model, tokenizer, train_dataset: Dataset, args: SCOPEConfig, *, student_model=None, progress: bool = True
) -> tuple[Dataset, dict]:
    """SFT rows (token ids + completion mask, with the texts for reading) sampled from the teacher, verified.

    Every process of a distributed run calls this with the whole ``train_dataset``; each
    samples and verifies its shard (:func:`rank_shard`) with seed ``args.seed + rank`` and
    all return the same gathered dataset. ``teacher_model`` is a loaded causal LM (moved to
    ``args.device`` for sampling and back afterwards) or None with ``args.use_vllm``.
    ``student_model`` tells which EOS ids stop the student (its generation config).
    """
    from .sampling import generate_completions
    from .prompts import prompt_token_ids
    from .verifiers import RewardFunction, get_verifier

    if args.answer_field not in train_dataset.column_names:
        raise ValueError(
            f"KD: the training data has no answer column {args.answer_field!r} "
            f"(columns: {', '.join(train_dataset.column_names)}); set answer_field"
        )
    prompts = list(train_dataset["prompt"])
    golds = list(train_dataset[args.answer_field])
    if not prompts:
        raise ValueError("KD: the training data has no rows, so there is nothing for the teacher to solve")
    rank, world_size = args.process_index, args.world_size
    shard = rank_shard(len(prompts), rank, world_size)
    settings = _sampling_settings(args, seed=args.seed + rank)
    prompt_ids = [prompt_token_ids(tokenizer, prompts[i], chat_template_kwargs=args.chat_template_kwargs) for i in shard]

    start = time.perf_counter()
    if args.use_vllm:
        samples = _vllm_sample(args, prompt_ids, settings, world_size, progress)
    else:
        home = next(teacher_model.parameters()).device
        teacher_model.to(args.device)
        try:
            samples = generate_completions(teacher_model, tokenizer, prompt_ids, settings, progress=progress,
                                           desc="KD teacher samples")
        finally:
            teacher_model.to(home)
            if args.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
    generation_s = time.perf_counter() - start

    flat = [(i, c) for i, group in zip(shard, samples) for c in group]
    with RewardFunction(get_verifier(args.verifier), answer_field=args.answer_field, timeout_s=args.verifier_timeout) as reward:
        scores = reward.score([c.text for _, c in flat], [golds[i] for i, _ in flat])
    stop_ids = _stop_ids(student_model, tokenizer)
    local_rows = []
    for (index, completion), score, ids_of_prompt in zip(
        flat, scores, (ids for ids, group in zip(prompt_ids, samples) for _ in group)
    ):
        correct = score >= args.correct_threshold - 1e-6
        if args.kd_keep_only_correct and not correct:
            continue
        if not completion.token_ids:
            continue  # nothing to learn from an empty sample
        local_rows.append(
            {
                "prompt_index": index,
                "prompt": prompts[index],
                "completion": completion.text,
                "finished": completion.finished,
                "correct": bool(correct),
                **sft_row(ids_of_prompt, completion, stop_ids=stop_ids, eos_token_id=tokenizer.eos_token_id),
            }
        )
    local_stats = [(len(flat), sum(s >= args.correct_threshold - 1e-6 for s in scores), generation_s)]
    rows = gather_shards(local_rows)
    per_rank = gather_shards(local_stats)
    stats = {
        "teacher_samples": sum(n for n, _, _ in per_rank),
        "teacher_correct": sum(c for _, c, _ in per_rank),
        "kept": len(rows),
        "processes": world_size,
        "generation_s": max(t for _, _, t in per_rank),
    }
    if not rows:
        raise ValueError(
            f"KD: the teacher produced no verified-correct sample out of {stats['teacher_samples']}; "
            "set kd_keep_only_correct=False or check the teacher/verifier"
        )
    return Dataset.from_list(rows), stats


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
    """Sample and filter the teacher's solutions, then return the ``SFTTrainer`` (not yet trained).

    The rows are written to ``output_dir/kd_teacher_samples.jsonl`` (by the main process,
    atomically) with ``kd_stats.json``; a resumed run reads them back instead of sampling again.
    """
    from trl import SFTConfig

    AtomicSFTTrainer = _atomic_sft_trainer()
    kd_data_path = Path(args.output_dir) / "kd_teacher_samples.jsonl"
    if resume_from_checkpoint and kd_data_path.exists():
        # Resuming: reuse the sampled data so the SFT run continues on the same examples.
        sft_dataset = Dataset.from_json(str(kd_data_path))
        missing = [c for c in SFT_COLUMNS if c not in sft_dataset.column_names]
        if missing:
            raise ValueError(
                f"{kd_data_path} has no {', '.join(missing)} column (written by an older scope-opd); "
                "delete it to sample the teacher again"
            )
        stats = {}
    else:
        loaded_here = teacher_model is None and not args.use_vllm
        if teacher_model is None:
            if not args.teacher_model:
                raise ValueError("algorithm='kd' needs teacher_model (hub id or path) to generate the SFT data")
            from transformers import AutoTokenizer

            from .teachers import check_tokenizers_match

            check_tokenizers_match(
                tokenizer,
                AutoTokenizer.from_pretrained(args.teacher_model, trust_remote_code=args.trust_remote_code),
                getattr(model.config, "_name_or_path", "student"),
                args.teacher_model,
                allow_special_token_mismatch=args.teacher_allow_special_token_mismatch,
            )
            if loaded_here:
                from .teachers.in_process import load_teacher_model

                # Straight onto this process's accelerator: a 7B teacher need not pass through CPU RAM per rank.
                teacher_model = load_teacher_model(
                    args.teacher_model, dtype=args.teacher_dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code,
                )
        elif args.use_vllm:
            raise ValueError(
                "KD with use_vllm=True samples through vLLM from teacher_model's path; "
                "pass no loaded teacher_model (or set use_vllm=False)"
            )
        if teacher_model is not None:
            teacher_model.eval()
        try:
            sft_dataset, stats = generate_teacher_dataset(
                teacher_model, tokenizer, train_dataset, args, student_model=model, progress=progress
            )
        finally:
            if loaded_here:
                del teacher_model  # free the accelerator for the SFT run
                if args.device.type == "cuda":
                    import torch

                    torch.cuda.empty_cache()
        if args.process_index == 0:
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
        model=model,
        args=sft_args,
        # Token ids: TRL's SFTTrainer takes them as they are and builds labels from completion_mask.
        train_dataset=sft_dataset.select_columns(list(SFT_COLUMNS)),
        processing_class=tokenizer,
        callbacks=callbacks,
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
