"""KD baseline: the teacher samples from, and the student is fine-tuned on, TRL's rendering of each prompt.

Paper presets use ``chat_prompt: true``: prompts are chat messages, rendered through the
tokenizer's chat template exactly as TRL's GRPO and SFT trainers render them. Two templates
are tested (tests/helpers.py): Qwen2.5's ChatML and DeepSeek-R1-Distill's, whose assistant
turns keep only the text after ``</think>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import chat_tokenizer, read_jsonl

from scope_opd.evaluation.sampling import Completion, generate_completions
from scope_opd.kd import build_kd_trainer, rank_shard
from scope_opd.prompts import prompt_token_ids
from scope_opd.trainer import SCOPEConfig

from conftest import build_tiny_qwen2

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTIONS = ["Add 12+7.", "Add 40+35."]
GOLDS = ["19", "75"]


def kd_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "kd"),
        algorithm="kd",
        kd_samples_per_prompt=2,
        kd_keep_only_correct=False,  # random tiny teachers are never right
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=24,
        temperature=1.0,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        learning_rate=1e-3,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return SCOPEConfig(**base)


def chat_dataset():
    """Rows as `scope train` builds them with chat_prompt: true and the paper's instruction."""
    prompts = [[{"role": "user", "content": f"{q}\n{INSTRUCTION}"}] for q in QUESTIONS]
    return Dataset.from_dict({"prompt": prompts, "answer": GOLDS})


@pytest.fixture(scope="module", params=["chatml", "r1"])
def chat_pair(request):
    """(style, tokenizer, student, teacher): tiny random models sized for the template's vocabulary."""
    tokenizer = chat_tokenizer(request.param)
    student = build_tiny_qwen2(tokenizer, hidden_size=32, seed=0)
    teacher = build_tiny_qwen2(tokenizer, hidden_size=48, seed=1)
    return request.param, tokenizer, student, teacher


# --- the prompt rendering is TRL's ---------------------------------------------------------------


@pytest.mark.parametrize("style", ["chatml", "r1"])
def test_prompt_ids_are_what_trl_grpo_and_sft_trainers_feed_the_model(tmp_path, style):
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import _tokenize

    tokenizer = chat_tokenizer(style)
    prompts = [*chat_dataset()["prompt"], *[f"{q}\n{INSTRUCTION}" for q in QUESTIONS]]  # chat, then text
    grpo = GRPOTrainer(
        model=build_tiny_qwen2(tokenizer),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                        report_to=[], use_cpu=True, bf16=False, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": prompts[:2]}),
        processing_class=tokenizer,
    )
    for group in (prompts[:2], prompts[2:]):  # TRL tokenizes a batch of one kind
        grpo_ids, _, _ = grpo._tokenize_prompts(group)
        ours = [prompt_token_ids(tokenizer, p) for p in group]
        assert ours == [list(ids) for ids in grpo_ids]
        sft_kwargs = {"add_generation_prompt": True} if isinstance(group[0], list) else {}
        assert ours == [_tokenize(tokenizer, p, **sft_kwargs)["input_ids"] for p in group]
    chat, text = prompt_token_ids(tokenizer, prompts[0]), prompt_token_ids(tokenizer, prompts[2])
    assert "user" in tokenizer.decode(chat) or "｜User｜" in tokenizer.decode(chat)
    assert tokenizer.decode(text, skip_special_tokens=True) == prompts[2]  # text prompts stay text
    if style == "r1":  # the template writes BOS, and it is not doubled
        assert chat[:2] != [tokenizer.bos_token_id] * 2 and chat[0] == tokenizer.bos_token_id


def test_prompt_ids_reject_what_is_neither_text_nor_messages(char_tokenizer):
    with pytest.raises(ValueError, match="got int"):
        prompt_token_ids(char_tokenizer, 3)
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_token_ids(char_tokenizer, [{"role": "user", "content": "hi"}])


# --- KD on chat prompts -------------------------------------------------------------------------


def test_kd_teacher_samples_from_and_student_trains_on_the_templated_chat_prompt(tmp_path, chat_pair):
    style, tokenizer, student, teacher = chat_pair
    args = kd_args(tmp_path)
    data = chat_dataset()
    trainer = build_kd_trainer(student, tokenizer, data, args, teacher_model=teacher, progress=False)

    rows = read_jsonl(Path(args.output_dir) / "kd_teacher_samples.jsonl")
    assert len(rows) == len(QUESTIONS) * args.kd_samples_per_prompt
    expected_prompts = [prompt_token_ids(tokenizer, p) for p in data["prompt"]]
    for row in rows:
        cut = row["completion_mask"].index(1)
        assert row["input_ids"][:cut] == expected_prompts[row["prompt_index"]]
        assert "{'role'" not in tokenizer.decode(row["input_ids"][:cut])  # not the repr of a message list
    # The teacher saw exactly those ids: an independent sampling call on them gives the same samples.
    settings = dict(n=args.kd_samples_per_prompt, temperature=1.0, top_p=args.top_p, top_k=0,
                    max_new_tokens=args.max_completion_length, batch_size=4, seed=args.seed)
    from scope_opd.evaluation.sampling import SamplingSettings

    again = generate_completions(teacher, tokenizer, expected_prompts, SamplingSettings(**settings), progress=False)
    assert [r["completion"] for r in rows] == [c.text for group in again for c in group]

    # SFT labels are the sampled completion ids, nothing re-rendered, the prompt masked.
    for row, sft in zip(rows, trainer.train_dataset):
        cut = row["completion_mask"].index(1)
        assert sft["input_ids"] == row["input_ids"]
        assert sft["labels"][:cut] == [-100] * cut and sft["labels"][cut:] == row["input_ids"][cut:]
    trainer.train()
    assert trainer.state.global_step == 1


def test_kd_keeps_r1_reasoning_that_a_conversational_completion_would_lose(tmp_path):
    """DeepSeek-R1-Distill's template drops assistant text up to `</think>`: SFT on token ids keeps it."""
    from trl.data_utils import _tokenize

    tokenizer = chat_tokenizer("r1")
    prompt = chat_dataset()["prompt"][0]
    reasoning, answer = "12+7: 2+7=9, 1+0=1\n", "\n\\boxed{19}"
    completion_text = f"{reasoning}</think>{answer}"
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    # What TRL's SFTTrainer would train on for a conversational completion: the reasoning is gone.
    full = _tokenize(tokenizer, prompt + [{"role": "assistant", "content": completion_text}])["input_ids"]
    assert reasoning not in tokenizer.decode(full) and "boxed{19}" in tokenizer.decode(full)

    # What KD trains on: prompt ids + the teacher's sampled ids, reasoning and </think> included.
    from scope_opd.kd import sft_row

    row = sft_row(prompt_token_ids(tokenizer, prompt), Completion(completion_text, len(completion_ids), True,
                                                                  tuple(completion_ids)),
                  stop_ids={tokenizer.eos_token_id}, eos_token_id=tokenizer.eos_token_id)
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert trained == completion_ids
    assert tokenizer.decode(trained, skip_special_tokens=False).startswith(reasoning + "</think>")


def test_kd_ends_finished_samples_with_an_eos_that_stops_the_student():
    ids = (5, 6, 7)
    finished, cut = Completion("abc", 3, True, ids), Completion("abx", 3, False, (5, 6, 8))
    from scope_opd.kd import sft_row

    assert sft_row([1], finished, stop_ids={7}, eos_token_id=9)["input_ids"] == [1, 5, 6, 7]  # teacher's EOS stops it
    assert sft_row([1], finished, stop_ids={9}, eos_token_id=9)["input_ids"] == [1, 5, 6, 9]  # else the student's
    assert sft_row([1], cut, stop_ids={9}, eos_token_id=9)["input_ids"] == [1, 5, 6, 8]  # truncated: no EOS taught
    assert sft_row([1, 2], cut, stop_ids={9}, eos_token_id=9)["completion_mask"] == [0, 0, 1, 1, 1]


def test_kd_text_prompts_stay_text_for_teacher_and_student(tmp_path):
    tokenizer = chat_tokenizer("chatml")  # a template exists, but text prompts do not go through it
    texts = [f"{q}\n{INSTRUCTION}" for q in QUESTIONS]
    args = kd_args(tmp_path, kd_samples_per_prompt=1, max_completion_length=8)
    build_kd_trainer(build_tiny_qwen2(tokenizer), tokenizer, Dataset.from_dict({"prompt": texts, "answer": GOLDS}),
                     args, teacher_model=build_tiny_qwen2(tokenizer, seed=1), progress=False)
    rows = read_jsonl(Path(args.output_dir) / "kd_teacher_samples.jsonl")
    for row, text in zip(rows, texts):
        cut = row["completion_mask"].index(1)
        assert row["input_ids"][:cut] == tokenizer(text)["input_ids"]


def test_kd_on_no_training_rows_is_a_clear_error(tmp_path, char_tokenizer):
    empty = Dataset.from_dict({"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="no rows"):
        build_kd_trainer(build_tiny_qwen2(char_tokenizer), char_tokenizer, empty, kd_args(tmp_path),
                         teacher_model=build_tiny_qwen2(char_tokenizer, seed=1), progress=False)
    with pytest.raises(ValueError, match="no answer column 'answer'"):
        build_kd_trainer(build_tiny_qwen2(char_tokenizer), char_tokenizer, Dataset.from_dict({"prompt": ["a"]}),
                         kd_args(tmp_path), teacher_model=build_tiny_qwen2(char_tokenizer, seed=1), progress=False)


def test_kd_resume_rejects_sample_files_without_token_ids(tmp_path, char_tokenizer):
    args = kd_args(tmp_path)
    os.makedirs(args.output_dir)
    (Path(args.output_dir) / "kd_teacher_samples.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match="no input_ids, completion_mask column.*delete it"):
        build_kd_trainer(build_tiny_qwen2(char_tokenizer), char_tokenizer, chat_dataset(), args,
                         resume_from_checkpoint="checkpoint-1")


# --- where KD samples: one shard per process ----------------------------------------------------


@pytest.mark.parametrize("num_items, world_size", [(0, 2), (1, 2), (5, 2), (7, 3), (8, 4), (3, 1)])
def test_rank_shards_cover_every_prompt_once_in_order_with_sizes_within_one(num_items, world_size):
    shards = [rank_shard(num_items, rank, world_size) for rank in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)  # the first ranks take more


def test_rank_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not a process of a world of 2"):
        rank_shard(4, 2, 2)


def _kd_rank_worker(rank: int, port: int, out: str) -> None:
    """One process of a 2-process gloo group, as `torchrun --nproc_per_node 2` would start it."""
    from accelerate.state import PartialState

    from scope_opd.kd import generate_teacher_dataset
    from scope_opd.toy.tokenizer import build_char_tokenizer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    PartialState._reset_state()  # the forked parent's single-process state must not carry over
    tokenizer = build_char_tokenizer()
    args = SCOPEConfig(output_dir=out, algorithm="kd", kd_samples_per_prompt=2, kd_keep_only_correct=False,
                       per_device_train_batch_size=4, num_generations=2, max_completion_length=6, temperature=1.0,
                       report_to=[], use_cpu=True, bf16=False, seed=3)
    data = Dataset.from_dict({"prompt": [f"Add {i}+1." for i in range(5)], "answer": [str(i + 1) for i in range(5)]})
    dataset, stats = generate_teacher_dataset(build_tiny_qwen2(tokenizer, seed=1), tokenizer, data, args, progress=False)
    Path(out, f"rank{args.process_index}.json").write_text(json.dumps({"rows": dataset.to_list(), "stats": stats}))


def test_kd_on_two_processes_samples_each_prompt_once_and_every_rank_gets_all_rows(tmp_path, char_tokenizer):
    # Two real processes in a gloo group (forked, so they skip the imports a torchrun start would pay).
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_kd_rank_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        if worker.is_alive():
            worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["rows"] == results[1]["rows"]  # gathered: every rank trains on the same data
    rows = results[0]["rows"]
    assert [r["prompt_index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert results[0]["stats"]["processes"] == 2 and results[0]["stats"]["teacher_samples"] == 10
    # Rank 0 sampled prompts 0-2 with seed 3, rank 1 prompts 3-4 with seed 4: the same as sampling them here.
    from scope_opd.evaluation.sampling import SamplingSettings

    teacher = build_tiny_qwen2(char_tokenizer, seed=1)
    expected = []
    for shard, seed in ((range(0, 3), 3), (range(3, 5), 4)):
        settings = SamplingSettings(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, batch_size=4, seed=seed)
        prompts = [char_tokenizer(f"Add {i}+1.")["input_ids"] for i in shard]
        expected += [c.text for group in generate_completions(teacher, char_tokenizer, prompts, settings, progress=False)
                     for c in group]
    assert [r["completion"] for r in rows] == expected
