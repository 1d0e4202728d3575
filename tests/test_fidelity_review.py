"""Outside fidelity review: every named option of the SCOPE maths against a reference written again here.

The references below re-derive SCOPE_METHOD.md sections 2 and 9 token by token with Python loops and
scalars (no call into ``scope_opd``), and the tests compare them with the shared pipeline
(:mod:`scope_opd.batch` -> :mod:`scope_opd.algorithms`) where the options differ: theta != theta_old
(per-token shifts, some tokens outside the trust region), groups of unequal sizes in shuffled order,
all-correct / all-wrong groups, a lone member on a path, masked tokens holding garbage, an empty row
and a row whose teacher scores are NaN.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from scope_opd.algorithms import AGGREGATIONS, scope_loss
from scope_opd.batch import path_weights, row_statistics, teacher_rows, verdicts

NAN = float("nan")

# ------------------------------------------------------------------------------------------ references


def ref_mean_logp(token_logp, mask):
    """eq. 3: mean log-prob over the response tokens of one row (None when it has none)."""
    values = [float(v) for v, m in zip(token_logp, mask) if m]
    return sum(values) / len(values) if values else None


def ref_weights(groups, correct, valid, student_mean, teacher_mean, *, tau, normalization, student_weighting,
                teacher_weighting):
    """eqs. 4-5 per group and path, as the paper writes them (``sum``) or the authors' code (``mean``).

    Paper: w_stu = PPL_S^(1/tau) / sum over the group's correct rows, w_tea = PPL_T^(-1/tau) / sum over its
    incorrect rows (ablations flip or drop the exponent). Authors: softmax(sign * mean_logp / tau) * n, a lone
    member 1.0. Invalid rows: weight 0, outside the sums.
    """
    n = len(groups)
    w_stu, w_tea = [0.0] * n, [0.0] * n
    exponent_stu = {"perplexity": 1.0 / tau, "inverse": -1.0 / tau, "uniform": 0.0}[student_weighting]
    exponent_tea = {"inverse_perplexity": -1.0 / tau, "perplexity": 1.0 / tau, "uniform": 0.0}[teacher_weighting]
    for g in set(groups):
        for on_path, mean, exponent, out in ((True, student_mean, exponent_stu, w_stu),
                                              (False, teacher_mean, exponent_tea, w_tea)):
            members = [i for i in range(n) if groups[i] == g and bool(correct[i]) == on_path and valid[i]]
            if not members:
                continue
            # PPL^e = exp(-mean_logp * e)
            powers = {i: math.exp(-mean[i] * exponent) for i in members}
            total = sum(powers.values())
            scale = len(members) if normalization == "mean" else 1.0
            for i in members:
                out[i] = scale * powers[i] / total
    return w_stu, w_tea


def ref_loss(logp, old, teacher, mask, correct, w_stu, w_tea, *, aggregation, clip, opd_advantage, mle_surrogate,
             token_weights=None, eps=0.2, eps_high=None, dual_clip=3.0):
    """eqs. 6-7 (and section 9's PPO form), token by token, with autograd through ``logp`` only.

    MLE token: -w_stu * rho (paper) or -w_stu * logp (authors, no ratio). OPD token: rho * A with
    A = -w_tea * (s - logp_T), s = sg(logp) (paper) or old_logp (authors); clip: PPO's
    max(-rho A, -clip(rho) A) (and the dual clip min(., -3A) for A < 0) on every token that has a ratio.
    """
    high = eps if eps_high is None else eps_high
    b, t = logp.shape
    token = {}
    for i in range(b):
        for j in range(t):
            if not mask[i][j]:
                continue
            rho = torch.exp(logp[i, j] - float(old[i][j]))
            if correct[i] and mle_surrogate == "logp":
                value = -float(w_stu[i]) * logp[i, j]
            else:
                if correct[i]:
                    advantage = float(w_stu[i])
                else:
                    student = float(logp[i, j].detach()) if opd_advantage == "current" else float(old[i][j])
                    advantage = -float(w_tea[i]) * (student - float(teacher[i][j]))
                value = -rho * advantage
                if clip in ("ppo", "authors"):
                    value = torch.maximum(value, -torch.clamp(rho, 1 - eps, 1 + high) * advantage)
                if clip == "authors" and advantage < 0:
                    value = torch.minimum(value, torch.tensor(-dual_clip * advantage))
            if token_weights is not None:
                value = value * float(token_weights[i][j])
            token[i, j] = value
    rows = [i for i in range(b) if any(mask[i][j] for j in range(t))]
    n_all = len(token)
    n_correct = sum(1 for (i, _) in token if correct[i])
    zero = torch.tensor(0.0)

    def path_total(on_path, per_row_mean=False):
        total = zero
        for i in rows:
            if bool(correct[i]) != on_path:
                continue
            row = [v for (r, _), v in token.items() if r == i]
            row_sum = sum(row, zero)
            total = total + (row_sum / len(row) if per_row_mean else row_sum)
        return total

    def divide(x, d):
        return x / d if d > 0 else zero

    if aggregation == "sum":
        return path_total(True) + path_total(False)
    if aggregation == "token-mean":
        return divide(path_total(True) + path_total(False), n_all)
    if aggregation == "authors":
        return divide(path_total(True), n_correct) + divide(path_total(False), n_all)
    if aggregation == "path-token-mean":
        return divide(path_total(True), n_correct) + divide(path_total(False), n_all - n_correct)
    if aggregation == "seq-mean-token-sum":
        return divide(path_total(True) + path_total(False), len(rows))
    if aggregation == "seq-mean-token-mean":
        return divide(path_total(True, True) + path_total(False, True), len(rows))
    raise AssertionError(aggregation)


# ------------------------------------------------------------------------------------------ the batch


def review_batch(seed=0):
    """Three prompt groups of unequal sizes, rows shuffled: group 5 mixed (3 correct, 2 wrong, one of them with a
    NaN teacher score -> dropped), group 9 all correct (2 rows), group 2 all wrong (3 rows, one empty -> dropped),
    group 7 mixed with a lone correct row. Unequal lengths; masked positions hold NaN / -inf / junk."""
    gen = torch.Generator().manual_seed(seed)
    spec = [  # (group, reward, length)
        (5, 1.0, 6), (9, 1.0, 4), (2, 0.0, 7), (5, 0.0, 3), (7, 1.0, 5), (5, 1.0, 2), (2, 0.0, 0),
        (9, 1.0, 7), (7, 0.0, 6), (5, 0.0, 5), (2, 0.0, 4), (5, 1.0, 7), (7, 0.0, 2),
    ]
    b, t = len(spec), 8
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (_, _, length) in enumerate(spec):
        mask[i, :length] = True
    old = -torch.rand(b, t, generator=gen) * 2.5 - 0.05
    teacher = -torch.rand(b, t, generator=gen) * 2.5 - 0.05
    # Per-token moves of theta away from theta_old: rho spans e^-0.6 .. e^0.6, many outside [0.8, 1.2].
    logp = old + (torch.rand(b, t, generator=gen) - 0.5) * 1.2
    junk = torch.tensor([NAN, float("-inf"), 123.0])
    for x in (old, teacher, logp):
        x[~mask] = junk[torch.randint(0, 3, (int((~mask).sum()),), generator=gen)]
    teacher[9, 2] = NAN  # an incorrect row the teacher failed on: dropped, never clamped
    teacher[1, :] = NAN  # a correct row: the teacher is never asked, never read
    groups = torch.tensor([g for g, _, _ in spec])
    scores = torch.tensor([r for _, r, _ in spec])
    token_weights = torch.rand(b, t, generator=gen) + 0.5
    return groups, scores, mask, old, teacher, logp, token_weights


def pipeline(algorithm="scope", **weight_options):
    """The shared pipeline (both engines): verdicts, teacher rows, row statistics, path weights."""
    groups, scores, mask, old, teacher, logp, token_weights = review_batch()
    correct = verdicts(scores, 1.0)
    on_teacher = teacher_rows(correct, algorithm)
    stats = row_statistics(mask, old, teacher, on_teacher)
    path_correct, w_stu, w_tea = path_weights(groups, correct, stats["student_mean_logp"], stats["teacher_mean_logp"],
                                              stats["valid"], algorithm=algorithm, **weight_options)
    return dict(groups=groups, correct=correct, path_correct=path_correct, valid=stats["valid"], w_stu=w_stu,
                w_tea=w_tea, loss_mask=stats["loss_mask"], mask=mask, old=old, teacher=teacher, logp=logp,
                token_weights=token_weights)


# ------------------------------------------------------------------------------------------ weights

WEIGHT_OPTIONS = list(itertools.product(
    ("perplexity", "inverse", "uniform"), ("inverse_perplexity", "perplexity", "uniform"), ("mean", "sum"),
    (0.5, 1.0, 2.0)))


@pytest.mark.parametrize("student_weighting,teacher_weighting,normalization,tau", WEIGHT_OPTIONS)
def test_weights_of_every_option_match_the_paper_and_authors_formulas(student_weighting, teacher_weighting,
                                                                      normalization, tau):
    options = dict(tau=tau, normalization=normalization, student_weighting=student_weighting,
                   teacher_weighting=teacher_weighting)
    out = pipeline(**options)
    groups, mask, old, teacher = out["groups"].tolist(), out["mask"].tolist(), out["old"], out["teacher"]
    correct = [s >= 1.0 for s in review_batch()[1].tolist()]
    student_mean = [ref_mean_logp(old[i].tolist(), mask[i]) for i in range(len(groups))]
    teacher_mean = [ref_mean_logp(teacher[i].tolist(), mask[i]) for i in range(len(groups))]
    # Valid: has a response token, and (incorrect rows) finite teacher scores on all of them.
    valid = [any(mask[i]) and (correct[i] or math.isfinite(teacher_mean[i])) for i in range(len(groups))]
    want_stu, want_tea = ref_weights(groups, correct, valid, student_mean, teacher_mean, **options)
    assert out["valid"].tolist() == valid == [True] * 6 + [False] + [True] * 2 + [False] + [True] * 3
    torch.testing.assert_close(out["w_stu"], torch.tensor(want_stu), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["w_tea"], torch.tensor(want_tea), rtol=1e-5, atol=1e-6)
    # The lone correct row of group 7 gets exactly 1 under both normalisations.
    assert out["w_stu"][4].item() == pytest.approx(1.0)


def test_the_released_script_direction_is_softmax_of_plus_mean_logp_times_n():
    """Section 9: the authors' weights are softmax(+mean_logp / tau) * n on BOTH paths with the released flags:
    student_weighting='inverse' + teacher_weighting='inverse_perplexity' + normalization='mean'."""
    out = pipeline(student_weighting="inverse", teacher_weighting="inverse_perplexity", normalization="mean", tau=1.0)
    mask, old, teacher = out["mask"], out["old"], out["teacher"]
    for g in out["groups"].unique().tolist():
        for on_path, values, weights in ((True, old, out["w_stu"]), (False, teacher, out["w_tea"])):
            rows = [i for i in range(len(mask)) if out["groups"][i] == g and bool(out["correct"][i]) == on_path
                    and out["valid"][i]]
            if not rows:
                continue
            means = torch.tensor([values[i][mask[i]].mean().item() for i in rows])
            expected = torch.softmax(means, 0) * len(rows) if len(rows) > 1 else torch.ones(1)
            torch.testing.assert_close(weights[rows], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ loss

CLIPS = {  # off_policy_clip of SCOPEConfig -> scope_loss keywords (what SCOPETrainer.scope_loss_from_inputs passes)
    "none": {},
    "ppo": {"clip_epsilon": 0.2, "clip_epsilon_high": 0.28},
    "authors": {"clip_epsilon": 0.2, "dual_clip": 3.0, "mle_surrogate": "logp"},
}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("opd_advantage", ["current", "old"])
@pytest.mark.parametrize("with_token_weights", [False, True])
def test_loss_of_every_option_matches_the_reference_away_from_theta_old(aggregation, clip, opd_advantage,
                                                                        with_token_weights):
    out = pipeline()
    kwargs = dict(CLIPS[clip])
    mle_surrogate = kwargs.get("mle_surrogate", "ratio")
    token_weights = out["token_weights"] if with_token_weights else None
    logp = out["logp"].clone().requires_grad_(True)
    loss, metrics = scope_loss(logp, out["old"], out["teacher"], out["loss_mask"], out["path_correct"], out["w_stu"],
                               out["w_tea"], aggregation=aggregation, opd_advantage=opd_advantage,
                               token_weights=token_weights, **kwargs)
    loss.backward()
    ref_logp = out["logp"].clone().requires_grad_(True)
    reference = ref_loss(ref_logp, out["old"].tolist(), out["teacher"].tolist(), out["loss_mask"].tolist(),
                         out["path_correct"].tolist(), out["w_stu"].tolist(), out["w_tea"].tolist(),
                         aggregation=aggregation, clip=clip, opd_advantage=opd_advantage, mle_surrogate=mle_surrogate,
                         token_weights=None if token_weights is None else token_weights.tolist(),
                         eps_high=kwargs.get("clip_epsilon_high"))
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    grad = torch.where(out["loss_mask"], logp.grad, 0.0)
    torch.testing.assert_close(grad, torch.where(out["loss_mask"], ref_logp.grad, 0.0), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(logp.grad).all()
    assert metrics["loss/mle"] + metrics["loss/opd"] == pytest.approx(loss.item(), abs=1e-5)


def test_the_review_batch_exercises_the_clip_and_the_advantage_sign():
    """Guard on the batch: away from theta_old, some tokens are outside [0.8, 1.2] and on some OPD tokens the
    current and the old advantage have opposite signs (else the options above could not differ)."""
    out = pipeline()
    incorrect = out["loss_mask"] & ~out["path_correct"][:, None]
    rho = torch.exp(torch.where(out["loss_mask"], out["logp"] - out["old"], 0.0))
    assert ((rho < 0.8) | (rho > 1.2))[out["loss_mask"]].float().mean() > 0.2
    current = torch.where(incorrect, out["logp"] - out["teacher"], 0.0)
    old = torch.where(incorrect, out["old"] - out["teacher"], 0.0)
    assert ((current * old) < 0).sum() >= 1


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_opd_baseline_is_the_sampled_token_reverse_kl_on_every_valid_row(aggregation):
    """OPD (section 4): every rollout, correct or not, on the teacher path with weight 1; at theta != theta_old its
    surrogate is sum_t rho * sg(logp - logp_T). The reference treats the verifier as absent."""
    out = pipeline(algorithm="opd")
    assert not out["path_correct"].any()
    assert out["w_tea"].tolist() == out["valid"].float().tolist() and not out["w_stu"].any()
    # OPD asks the teacher about every row: make the correct rows' teacher scores real.
    teacher = torch.where(out["mask"], torch.nan_to_num(out["teacher"], nan=-1.3), out["teacher"])
    stats = row_statistics(out["mask"], None, teacher, torch.ones(len(teacher), dtype=torch.bool))
    logp = out["logp"].clone().requires_grad_(True)
    loss, _ = scope_loss(logp, out["old"], teacher, stats["loss_mask"], out["path_correct"], out["w_stu"],
                         torch.ones(len(teacher)) * stats["valid"], aggregation=aggregation)
    loss.backward()
    b, t = logp.shape
    ref_logp = out["logp"].clone().requires_grad_(True)
    valid = [any(out["mask"][i].tolist()) for i in range(b)]
    rows = [[torch.exp(ref_logp[i, j] - float(out["old"][i, j])) * float(ref_logp[i, j].detach() - teacher[i, j])
             for j in range(t) if out["mask"][i, j]] for i in range(b) if valid[i]]
    n_tokens = sum(len(r) for r in rows)
    per_row = {"sum": [sum(r) for r in rows], "seq-mean-token-mean": [sum(r) / len(r) for r in rows]}
    if aggregation in ("sum",):
        reference = sum(per_row["sum"])
    elif aggregation == "seq-mean-token-sum":
        reference = sum(per_row["sum"]) / len(rows)
    elif aggregation == "seq-mean-token-mean":
        reference = sum(per_row["seq-mean-token-mean"]) / len(rows)
    else:  # token-mean, authors, path-token-mean: all rows are on the one (OPD) path
        reference = sum(per_row["sum"]) / n_tokens
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    mask = stats["loss_mask"]
    torch.testing.assert_close(torch.where(mask, logp.grad, 0.0), torch.where(mask, ref_logp.grad, 0.0))


# ------------------------------------------------------------------------------------------ TRL trainer


@pytest.mark.parametrize("clip", ["ppo", "authors"])
def test_trainer_second_pass_with_non_default_options_matches_the_reference(tmp_path, tiny_pair_dir, clip):
    """The real SCOPETrainer, num_iterations = 2 (the second pass is off-policy), every weight option away from its
    default and seq-mean-token-mean: the weights it computed and the loss it optimised equal the references, fed
    with the verdicts, the sampling policy's and the teacher's log-probs it recorded."""
    from transformers import AutoTokenizer

    from test_trainer import has_digit_reward
    from test_trainer_fidelity import MicroBatchRecorder, build

    class Recorder(MicroBatchRecorder):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.generation = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in output.items()}
            return output

    options = dict(student_weighting="inverse", teacher_weighting="perplexity", weight_normalization="sum", tau=2.0,
                   loss_aggregation="seq-mean-token-mean")
    trainer = build(Recorder, tmp_path, tiny_pair_dir, num_iterations=2, max_steps=2, learning_rate=0.3,
                    off_policy_clip=clip, **options)
    trainer.train()
    gen = trainer.generation
    mask = gen["completion_mask"].bool()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    texts = tokenizer.batch_decode([ids[m] for ids, m in zip(gen["completion_ids"], mask)], skip_special_tokens=True)
    correct = [r == 1.0 for r in has_digit_reward(None, texts)]
    assert 0 < sum(correct) < len(correct), "fixture should mix right and wrong rollouts"
    b = len(correct)
    groups = [i // trainer.args.num_generations for i in range(b)]
    student_mean = [ref_mean_logp(gen["old_per_token_logps"][i].tolist(), mask[i].tolist()) for i in range(b)]
    teacher_mean = [None if correct[i] else ref_mean_logp(gen["teacher_per_token_logps"][i].tolist(), mask[i].tolist())
                    for i in range(b)]
    valid = [bool(mask[i].any()) for i in range(b)]
    want_stu, want_tea = ref_weights(groups, correct, valid, student_mean, teacher_mean, **{
        k: options[k] for k in ("student_weighting", "teacher_weighting", "tau")}, normalization="sum")
    torch.testing.assert_close(gen["scope_student_weights"], torch.tensor(want_stu), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gen["scope_teacher_weights"], torch.tensor(want_tea), rtol=1e-5, atol=1e-6)

    first, second = trainer.micro_batches
    inputs = second["inputs"]  # the same rows, shuffled by TRL
    rho = torch.exp(second["logps"] - inputs["old_per_token_logps"])[inputs["scope_loss_mask"].bool()]
    assert (rho - 1).abs().max() > 0.2, "the second pass should be off-policy"
    reference = ref_loss(second["logps"], inputs["old_per_token_logps"].tolist(),
                         inputs["teacher_per_token_logps"].tolist(), inputs["scope_loss_mask"].bool().tolist(),
                         inputs["scope_correct"].tolist(), inputs["scope_student_weights"].tolist(),
                         inputs["scope_teacher_weights"].tolist(), aggregation="seq-mean-token-mean", clip=clip,
                         opd_advantage="old" if clip == "authors" else "current",
                         mle_surrogate="logp" if clip == "authors" else "ratio")
    assert second["loss"].item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-6)
