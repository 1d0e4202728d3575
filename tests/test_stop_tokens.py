"""Student and teacher tokenizers that differ only in their stop token (Qwen3-1.7B-Base student, chat teacher).

The teacher scores the student's token ids, except a completion's final stop token, which it scores as its own
stop token: "would the teacher stop here?". Scored as it is, a chat teacher gives the base student's
<|endoftext|> -12.4 nats where its own <|im_end|> gets -0.15 (SmolLM2-135M-Instruct, issue 17), an OPD
advantage of about -12 on the last token of every incorrect rollout that teaches the student not to stop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers import InProcessTeacher
from scope_opd.teachers.scorer import StopTokenMappedTeacher
from scope_opd.trainer import SCOPETrainer

from test_trainer import PROMPTS, has_digit_reward, make_args


def teacher_with_eos(tiny_pair_dir, path: Path, eos_token: str | None) -> str:
    """The tiny teacher's weights with the student's tokenizer, its eos token changed (vocabulary unchanged)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["teacher"])
    if eos_token is not None:
        tokenizer.eos_token = eos_token
    AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build(tmp_path, tiny_pair_dir, teacher_dir):
    student_tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    args = make_args(tmp_path, teacher_model=teacher_dir, teacher_allow_special_token_mismatch=True)
    return SCOPETrainer(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward],
                        args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ["1"] * 4}),
                        processing_class=student_tokenizer)


def reference_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p_T(completion[t] | prompt, completion[:t]) from one plain forward of the teacher checkpoint."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logps.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_final_student_stop_token_is_scored_as_the_teachers_stop_token(tmp_path, tiny_pair_dir):
    teacher_dir = teacher_with_eos(tiny_pair_dir, tmp_path / "teacher", "<|unk|>")
    with pytest.warns(UserWarning, match="eos_token_id"):
        trainer = build(tmp_path, tiny_pair_dir, teacher_dir)
    student_eos = trainer.processing_class.eos_token_id
    teacher_eos = AutoTokenizer.from_pretrained(teacher_dir).eos_token_id
    assert student_eos != teacher_eos
    assert isinstance(trainer.teacher, StopTokenMappedTeacher) and trainer.teacher.stop_token_map == {student_eos: teacher_eos}

    tokenizer = trainer.processing_class
    prompt = tokenizer("Add 12+7.\n", add_special_tokens=False)["input_ids"]
    ended = tokenizer("19", add_special_tokens=False)["input_ids"] + [student_eos]  # stopped by the student's eos
    truncated = tokenizer("1234", add_special_tokens=False)["input_ids"]  # no stop token: scored as it is
    width = max(len(ended), len(truncated))
    completion_ids = torch.tensor([ended + [0] * (width - len(ended)), truncated + [0] * (width - len(truncated))])
    completion_mask = torch.tensor([[1] * len(ended) + [0] * (width - len(ended)), [1] * len(truncated)])
    output = {"prompt_ids": torch.tensor([prompt, prompt]), "prompt_mask": torch.ones(2, len(prompt), dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask}
    scored = trainer._score_teacher(output, torch.tensor([True, True]))  # the trainer's own scoring path

    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    as_teacher_stop = reference_logps(model, prompt, ended[:-1] + [teacher_eos])
    as_ordinary_token = reference_logps(model, prompt, ended)
    torch.testing.assert_close(scored[0, : len(ended)], as_teacher_stop, atol=1e-5, rtol=1e-5)
    assert abs(scored[0, len(ended) - 1].item() - as_ordinary_token[-1].item()) > 1e-3, "the last token was not mapped"
    torch.testing.assert_close(scored[1], reference_logps(model, prompt, truncated), atol=1e-5, rtol=1e-5)


def test_same_stop_token_leaves_the_teacher_as_it_is(tmp_path, tiny_pair_dir):
    trainer = build(tmp_path, tiny_pair_dir, teacher_with_eos(tiny_pair_dir, tmp_path / "teacher", None))
    assert isinstance(trainer.teacher, InProcessTeacher)


def test_the_wrapper_passes_other_attributes_through():
    class Teacher:
        synced_ranks = True

        def score(self, prompt_ids, completion_ids):
            return [torch.tensor([float(i) for i in ids]) for ids in completion_ids]

    mapped = StopTokenMappedTeacher(Teacher(), {1: 2})
    assert mapped.synced_ranks is True
    # Only a final stop token is mapped; the same id elsewhere (or a final other id) is not.
    assert [t.tolist() for t in mapped.score([[5], [5], [5]], [[3, 1], [1, 3], []])] == [[3.0, 2.0], [1.0, 3.0], []]
