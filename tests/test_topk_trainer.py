"""opd_loss='topk_reverse' / 'topk_forward' in SCOPETrainer (issue 20): one step's loss and gradient against the
formulas written again here from the student's and the teacher's full logits, under every loss_aggregation;
the options' refusals; student_logprob_source='sampler' with a top-k loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers.chunked_scorer import ChunkedTeacherScorer
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

from test_trainer import dataset, has_digit_reward, load_student, make_args

ROLLOUT_TEMPERATURE = 0.7
TOP_K = 5


class GradientRecorder(SCOPETrainer):
    """Keeps, per micro-batch, the optimised loss, its gradient, and the same computed by hand (see ``by_hand``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        expected = by_hand(model, inputs, self.args)
        expected_grads = torch.autograd.grad(expected, params)
        self.records.append({"inputs": dict(inputs), "loss": loss.detach(), "grads": grads,
                             "expected": expected.detach(), "expected_grads": expected_grads})
        return loss


def by_hand(model, inputs, args: SCOPEConfig) -> torch.Tensor:
    """SCOPE's loss with a top-k OPD path, from the model's full logits (one micro-batch = the whole batch)."""
    prompt_len = inputs["prompt_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_len - 1 : -1].float() / ROLLOUT_TEMPERATURE
    logp_all = torch.log_softmax(logits, -1)  # [B, T, V]
    logp = logp_all.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    mask = inputs["scope_loss_mask"].bool()
    correct = inputs["scope_correct"].bool()
    w_stu, w_tea = inputs["scope_student_weights"][:, None], inputs["scope_teacher_weights"][:, None]
    old = inputs.get("old_per_token_logps", logp.detach())

    mle = -w_stu * torch.exp(logp - old)  # eq. 6, correct rows
    ids_k, teacher = inputs["teacher_topk_ids"], inputs["teacher_topk_logps"]
    student_k = logp_all.gather(-1, ids_k)  # the student's full-vocabulary log-probs at the teacher's top-k
    if args.opd_loss == "topk_reverse":
        p = torch.exp(student_k - torch.logsumexp(student_k, -1, keepdim=True))
        q = torch.exp(teacher - torch.logsumexp(teacher, -1, keepdim=True))
        divergence = (p * (p.log() - q.log())).sum(-1)
    else:  # forward KL over the top-k and one tail bucket
        student_tail = 1 - student_k.exp().sum(-1)
        teacher_tail = 1 - teacher.exp().sum(-1)
        divergence = (teacher.exp() * (teacher - student_k)).sum(-1) + teacher_tail * (teacher_tail.log() - student_tail.log())
    mle_mask, opd_mask = mask & correct[:, None], mask & ~correct[:, None]
    opd = w_tea * torch.where(opd_mask, divergence, 0.0)  # off the OPD path the top-k inputs are zero padding

    mle_sum, opd_sum = (mle * mle_mask).sum(), (opd * opd_mask).sum()
    tokens, correct_tokens = mask.sum(), mle_mask.sum()
    rows = mask.any(1).sum()
    aggregation = args.loss_aggregation
    if aggregation == "sum":
        return mle_sum + opd_sum
    if aggregation == "authors":
        return mle_sum / correct_tokens + opd_sum / tokens
    if aggregation == "path-token-mean":
        return mle_sum / correct_tokens + opd_sum / (tokens - correct_tokens)
    if aggregation == "token-mean":
        return (mle_sum + opd_sum) / tokens
    if aggregation == "seq-mean-token-sum":
        return (mle_sum + opd_sum) / rows
    per_row_tokens = mask.sum(1).clamp(min=1)  # seq-mean-token-mean
    return (((mle * mle_mask).sum(1) + (opd * opd_mask).sum(1)) / per_row_tokens).sum() / rows


def build(tmp_path, tiny_pair_dir, trainer_cls=GradientRecorder, **overrides):
    args = make_args(tmp_path, "scope", teacher_model=tiny_pair_dir["teacher"], temperature=ROLLOUT_TEMPERATURE,
                     teacher_top_k=TOP_K, **overrides)
    return trainer_cls(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                       train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))


@pytest.mark.parametrize("opd_loss", ["topk_reverse", "topk_forward"])
@pytest.mark.parametrize("aggregation", ["authors", "path-token-mean", "token-mean", "sum", "seq-mean-token-sum",
                                         "seq-mean-token-mean"])
def test_topk_step_loss_and_gradient_equal_the_formula_from_full_logits(tmp_path, tiny_pair_dir, opd_loss, aggregation):
    trainer = build(tmp_path, tiny_pair_dir, opd_loss=opd_loss, loss_aggregation=aggregation, learning_rate=0.0)
    trainer.train()
    assert isinstance(trainer._topk_teacher, ChunkedTeacherScorer)  # the memory-lean in-process top-k
    (record,) = trainer.records
    inputs = record["inputs"]
    correct = inputs["scope_correct"].bool()
    assert 0 < correct.sum() < len(correct), "the fixture should mix right and wrong rollouts"
    torch.testing.assert_close(record["loss"], record["expected"], rtol=1e-5, atol=1e-6)
    for got, want in zip(record["grads"], record["expected_grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The teacher's top-k in the inputs are the teacher model's own, from its full logits (temperature 1).
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"])
    prompt_len = inputs["prompt_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, prompt_len - 1 : -1], -1)
    wrong = inputs["scope_loss_mask"].bool() & ~correct[:, None]
    values, top_ids = teacher_logp.topk(TOP_K, dim=-1)
    torch.testing.assert_close(inputs["teacher_topk_logps"][wrong], values[wrong], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher_logp.gather(-1, inputs["teacher_topk_ids"])[wrong], values[wrong],
                               rtol=1e-5, atol=1e-5)
    sampled = teacher_logp.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    torch.testing.assert_close(inputs["teacher_per_token_logps"][wrong], sampled[wrong], rtol=1e-5, atol=1e-5)


def test_topk_loss_moves_the_student_differently_from_the_sampled_loss(tmp_path, tiny_pair_dir):
    """The option is wired: the same step's OPD loss differs between 'sampled' and a top-k loss."""
    losses = {}
    for opd_loss in ("sampled", "topk_reverse"):
        trainer = build(tmp_path / opd_loss, tiny_pair_dir, trainer_cls=SCOPETrainer, opd_loss=opd_loss)
        trainer.train()
        losses[opd_loss] = trainer.state.log_history[0]["scope/loss/opd"]
    assert losses["sampled"] != pytest.approx(losses["topk_reverse"], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(opd_loss="topk"), "opd_loss must be one of"),
    (dict(opd_loss="topk_reverse", teacher_top_k=0), "teacher_top_k must be an integer >= 1"),
    (dict(opd_loss="topk_forward", off_policy_clip="ppo"), "no importance ratio to clip"),
    (dict(opd_loss="topk_forward", off_policy_clip="authors"), "no importance ratio to clip"),
    (dict(opd_loss="topk_reverse", opd_advantage="old"), "opd_advantage='old'"),
    (dict(opd_loss="topk_reverse", teacher_overlap=True), "teacher_overlap=True"),
    (dict(opd_loss="topk_reverse", algorithm="grpo"), "algorithm='grpo'"),
    # renormalised on one token the reverse KL is identically 0: nothing would train on the wrong rows
    (dict(opd_loss="topk_reverse", teacher_top_k=1), "opd_loss='topk_reverse' with teacher_top_k=1"),
    # SCOPE's loss has no entropy mask: TRL's option would be silently ignored
    (dict(top_entropy_quantile=0.2), r"top_entropy_quantile=0.2 with algorithm='scope'"),
    (dict(algorithm="opd", top_entropy_quantile=0.5), r"top_entropy_quantile=0.5 with algorithm='opd'"),
])
def test_topk_options_refuse_what_they_cannot_mean(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **{"algorithm": "scope", **overrides})


def test_topk_needs_a_teacher_that_returns_top_k(tmp_path, tiny_pair_dir):
    class SampledOnly:
        def score(self, prompt_ids, completion_ids):
            return [torch.zeros(len(c)) for c in completion_ids]

    args = make_args(tmp_path, "scope", opd_loss="topk_forward")
    with pytest.raises(ValueError, match="needs a teacher with score_topk"):
        SCOPETrainer(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                     train_dataset=dataset(), teacher=SampledOnly(),
                     processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))


def test_topk_with_sampler_logprobs_for_the_student_weights(tmp_path, tiny_pair_dir):
    """student_logprob_source='sampler' only feeds the correct path's weights: a top-k loss works with it."""
    trainer = build(tmp_path, tiny_pair_dir, opd_loss="topk_forward", student_logprob_source="sampler",
                    learning_rate=0.0)
    trainer.train()
    (record,) = trainer.records
    assert trainer.state.log_history[0]["scope/student_logp_from_sampler"] == 1.0
    torch.testing.assert_close(record["loss"], record["expected"], rtol=1e-5, atol=1e-6)


def test_scope_loss_refuses_to_clip_a_top_k_divergence():
    from scope_opd import scope_loss

    logp = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="no importance ratio to clip"):
        scope_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), torch.ones(1), torch.ones(1),
                   opd_token_loss=torch.zeros(1, 2), clip_epsilon=0.2)


class TopKCorrupted:
    """An in-process teacher whose first scored row gets one non-finite top-k value (what a server can send:
    NaN, or vLLM's -9999 read as -inf); its sampled-token log-probs stay finite."""

    def __init__(self, model, value, repeat_id=False):
        from scope_opd.teachers import InProcessTeacher

        self.inner, self.value, self.repeat_id = InProcessTeacher(model, device="cpu"), value, repeat_id

    def score(self, prompt_ids, completion_ids):
        return self.inner.score(prompt_ids, completion_ids)

    def score_topk(self, prompt_ids, completion_ids, k):
        from scope_opd.teachers.in_process import TokenScores

        scores = self.inner.score_topk(prompt_ids, completion_ids, k)
        first = scores[0]
        top_logprobs, top_ids = first.top_logprobs.clone(), first.top_ids.clone()
        top_logprobs[0, -1] = self.value
        if self.repeat_id:  # the last entry repeats the first one's id
            top_ids[0, -1] = top_ids[0, 0]
        scores[0] = TokenScores(first.logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
        return scores


@pytest.mark.parametrize("opd_loss", ["topk_reverse", "topk_forward"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_non_finite_top_k_value_drops_its_row_and_counts_it(tmp_path, tiny_pair_dir, opd_loss, value):
    """Like a NaN sampled log-prob: the row leaves the loss (scope/teacher_nonfinite_rows), the step goes on,
    and the loss is the formula over the other rows."""
    args = make_args(tmp_path, "scope", temperature=ROLLOUT_TEMPERATURE, teacher_top_k=TOP_K, opd_loss=opd_loss,
                     learning_rate=0.0)
    teacher = TopKCorrupted(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]), value)
    trainer = GradientRecorder(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                               train_dataset=dataset(), teacher=teacher,
                               processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))
    trainer.train()
    assert trainer.state.log_history[0]["scope/teacher_nonfinite_rows"] == 1.0
    (record,) = trainer.records
    inputs = record["inputs"]
    dropped = inputs["completion_mask"].bool().any(1) & ~inputs["scope_loss_mask"].bool().any(1)
    assert dropped.sum() == 1  # the corrupted row, and only it
    kept_wrong = inputs["scope_loss_mask"].bool().any(1) & ~inputs["scope_correct"].bool()
    assert kept_wrong.any(), "the fixture should have wrong rows beside the dropped one"
    assert torch.isfinite(inputs["teacher_topk_logps"]).all()
    torch.testing.assert_close(record["loss"], record["expected"], rtol=1e-5, atol=1e-6)
    for got, want in zip(record["grads"], record["expected_grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_topk_forward_with_k_1_is_accepted(tmp_path):
    """K = 1 keeps a meaning for topk_forward (the top-1 token and the tail bucket): only topk_reverse refuses it."""
    assert make_args(tmp_path, "scope", opd_loss="topk_forward", teacher_top_k=1).teacher_top_k == 1


def test_teacher_top_k_above_the_vocabulary_is_refused_naming_both(tmp_path, tiny_pair_dir):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]).config.get_text_config().vocab_size

    def trainer(k):
        args = make_args(tmp_path, "scope", teacher_model=tiny_pair_dir["teacher"], opd_loss="topk_forward", teacher_top_k=k)
        return SCOPETrainer(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                            train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))

    with pytest.raises(ValueError, match=rf"teacher_top_k={vocab + 1} is more than the student's vocabulary of {vocab}"):
        trainer(vocab + 1)
    assert trainer(vocab).args.teacher_top_k == vocab  # K = V is allowed: the full-vocabulary KL


def test_a_repeated_top_k_id_from_the_teacher_fails_at_scoring_naming_the_row(tmp_path, tiny_pair_dir):
    """One token's mass counted twice is a broken teacher, not a tie: the step fails where the teacher answered."""
    args = make_args(tmp_path, "scope", teacher_top_k=TOP_K, opd_loss="topk_forward")
    teacher = TopKCorrupted(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]), -5.0, repeat_id=True)
    trainer = SCOPETrainer(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                           train_dataset=dataset(), teacher=teacher,
                           processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))
    with pytest.raises(RuntimeError, match=r"teacher's top-k ids for row \d+ repeat a token id at one position"):
        trainer.train()
