"""SCOPETrainer on tiny local Qwen2 models: one step of each algorithm, the exact loss, whole-group weights."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from scope_opd import dual_path_weights, scope_loss, sequence_mean_logp
from scope_opd.teachers import InProcessTeacher
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

PROMPTS = ["Add 12+7.\n", "Add 30+45.\n", "Add 9+9.\n", "Add 61+22.\n"]


def has_digit_reward(prompts, completions, **kwargs):
    """A deterministic outcome reward for random tiny models: 1 if the completion contains a digit."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def make_args(tmp_path, algorithm="scope", **overrides):
    base = dict(
        output_dir=str(tmp_path / algorithm),
        algorithm=algorithm,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        temperature=1.0,
        learning_rate=1e-2,
        dataloader_num_workers=0,
        bf16=False,  # TRL's configs default to bf16 autocast, which would make the comparisons approximate
    )
    base.update(overrides)
    return SCOPEConfig(**base)


def dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "answer": ["19", "75", "18", "83"]})


def load_student(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


class RecordingTrainer(SCOPETrainer):
    """Keeps what the trainer generated and what each micro-batch optimised, for checking."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generation_batches, self.micro_batches = [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.generation_batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in output.items()})
        return output

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        gen = self.generation_batches[-1]
        with torch.no_grad():  # the policy's log-probs of the whole generation batch, in generation order
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model,
                torch.cat([gen["prompt_ids"], gen["completion_ids"]], 1),
                torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1),
                gen["completion_ids"].size(1),
            )
        self.micro_batches.append({"inputs": dict(inputs), "loss": loss.detach().clone(), "batch_logps": logps})
        return loss


@pytest.mark.parametrize("algorithm", ["scope", "opd", "grpo"])
def test_one_step_of_each_algorithm_changes_the_student(tmp_path, tiny_pair_dir, algorithm):
    student = load_student(tiny_pair_dir["student"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = make_args(tmp_path, algorithm, teacher_model=None if algorithm == "grpo" else tiny_pair_dir["teacher"])
    from transformers import AutoTokenizer

    trainer = SCOPETrainer(
        student, reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )
    trainer.train()
    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, f"{algorithm}: no parameter changed after one step"
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"])
    for key in ("timing/generation", "timing/reward", "timing/update", "entropy"):
        assert key in logged, key
    if algorithm != "grpo":
        for key in ("timing/teacher", "timing/old_logprob", "scope/frac_correct", "scope/frac_all_correct_groups",
                    "scope/frac_all_wrong_groups", "scope/student_weight_max", "scope/teacher_weight_max",
                    "scope/student_ppl_correct", "scope/teacher_ppl_incorrect", "scope/loss/mle", "scope/loss/opd"):
            assert key in logged, key
        assert logged["timing/teacher"] > 0


def test_trainer_loss_is_scope_loss_of_independently_recomputed_weights(tmp_path, tiny_pair_dir):
    """Recompute the verdicts' weights and the loss from scratch (fresh teacher, pure functions) and compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = load_student(tiny_pair_dir["student"])
    args = make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"], weight_normalization="sum", tau=0.5)
    trainer = RecordingTrainer(
        student, reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )
    trainer.train()
    (gen,) = trainer.generation_batches
    (micro,) = trainer.micro_batches  # one micro-batch = the whole generation batch here
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    completions = tokenizer.batch_decode(
        [ids[m.bool()] for ids, m in zip(gen["completion_ids"], gen["completion_mask"])], skip_special_tokens=True
    )
    correct = torch.tensor(has_digit_reward(None, completions)) == 1.0
    assert 0 < correct.sum() < len(correct), "fixture should mix right and wrong rollouts"
    mask = gen["completion_mask"].bool()
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]))
    prompt_rows = [p[m.bool()].tolist() for p, m in zip(gen["prompt_ids"], gen["prompt_mask"])]
    completion_rows = [c[m].tolist() for c, m in zip(gen["completion_ids"], mask)]
    teacher_rows = teacher.score(prompt_rows, completion_rows)
    teacher_logps = torch.zeros(mask.shape)
    for i, row in enumerate(teacher_rows):
        teacher_logps[i, : len(row)] = row
    group_ids = torch.arange(len(correct)) // args.num_generations
    w_stu, w_tea = dual_path_weights(
        group_ids, correct, sequence_mean_logp(gen["old_per_token_logps"], mask),
        sequence_mean_logp(teacher_logps, mask), tau=0.5, normalization="sum",
    )
    torch.testing.assert_close(gen["scope_student_weights"], w_stu)
    torch.testing.assert_close(gen["scope_teacher_weights"], w_tea)
    torch.testing.assert_close(gen["teacher_per_token_logps"], torch.where(mask & ~correct[:, None], teacher_logps, 0.0), atol=1e-5, rtol=0)
    expected, _ = scope_loss(micro["batch_logps"], gen["old_per_token_logps"], teacher_logps, mask, correct, w_stu, w_tea)
    assert micro["loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_weights_use_whole_groups_when_trl_splits_the_batch(tmp_path, tiny_pair_dir):
    """8 rollouts (2 prompts x 4) split into 4 shuffled micro-batches of 2: weights still per whole group."""
    from transformers import AutoTokenizer

    student = load_student(tiny_pair_dir["student"])
    args = make_args(
        tmp_path, teacher_model=tiny_pair_dir["teacher"], per_device_train_batch_size=2,
        gradient_accumulation_steps=4, steps_per_generation=4,
    )
    trainer = RecordingTrainer(
        student, reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )
    trainer.train()
    (gen,) = trainer.generation_batches
    assert len(trainer.micro_batches) == 4
    correct, w_stu, w_tea = gen["scope_correct"], gen["scope_student_weights"], gen["scope_teacher_weights"]
    group_ids = torch.arange(8) // 4
    for g in (0, 1):
        for weights, path in ((w_stu, correct), (w_tea, ~correct)):
            members = (group_ids == g) & path
            if members.any():  # "mean" normalisation: a path's weights in a group sum to its size
                assert weights[members].sum().item() == pytest.approx(float(members.sum()), rel=1e-5)
    # Every micro-batch carries the weights computed on the whole generation batch (a shuffled split of them).
    split = torch.cat([m["inputs"]["scope_teacher_weights"] for m in trainer.micro_batches])
    torch.testing.assert_close(split.sort().values, w_tea.sort().values)
    # Micro-batch losses are normalised by the generation batch's token count, so they add up to the batch loss.
    total = sum(m["loss"].item() for m in trainer.micro_batches)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(total, rel=1e-4, abs=1e-6)


def test_opd_accepts_one_rollout_per_prompt_like_the_paper(tmp_path, tiny_pair_dir):
    from transformers import AutoTokenizer

    args = make_args(tmp_path, "opd", teacher_model=tiny_pair_dir["teacher"], num_generations=1, per_device_train_batch_size=4)
    assert args.num_generations == 1
    trainer = RecordingTrainer(
        load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )
    trainer.train()
    (gen,) = trainer.generation_batches
    assert not gen["scope_correct"].any()  # OPD ignores the verdict: every rollout on the teacher path
    assert torch.equal(gen["scope_teacher_weights"], torch.ones(4))


def test_config_rejects_bad_settings():
    cpu = dict(report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        SCOPEConfig("o", algorithm="ppo", **cpu)
    with pytest.raises(ValueError, match="student_weighting"):
        SCOPEConfig("o", student_weighting="entropy", **cpu)
    with pytest.raises(ValueError, match="beta"):
        SCOPEConfig("o", algorithm="scope", beta=0.1, **cpu)
    with pytest.raises(ValueError, match="either teacher_model"):
        SCOPEConfig("o", teacher_model="a", teacher_server_url="http://127.0.0.1:1", **cpu)
    assert SCOPEConfig("o", algorithm="grpo", **cpu).beta == 1e-4  # paper's GRPO KL coefficient
    assert SCOPEConfig("o", **cpu).beta == 0.0
    paper = SCOPEConfig("o", **cpu)  # Table 3 defaults
    assert (paper.learning_rate, paper.weight_decay, paper.temperature, paper.num_generations, paper.tau) == (5e-5, 0.01, 0.6, 8, 1.0)


def test_scope_without_teacher_is_a_clear_error(tmp_path, tiny_pair_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="needs a teacher"):
        SCOPETrainer(
            load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=make_args(tmp_path),
            train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
        )
