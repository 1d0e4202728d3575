"""Driver side: SCOPE's per-row weights from a verl step batch (shifted teacher layout, padding, edge groups)."""

import math

import pytest
import torch

from scope_opd.algorithms import dual_path_weights, loss_denominators, sequence_mean_logp
from scope_opd.integrations.verl.agent_loop import placeholder_teacher_outputs, skip_teacher
from scope_opd.integrations.verl.config import ScopeOptions
from scope_opd.integrations.verl.weights import response_teacher_logprobs, scope_batch

from verl_batch import make_rows, padded_reference, step_batch

MIXED = [("a", 3, 5, 1.0), ("a", 5, 4, 0.0), ("a", 2, 6, 0.0), ("a", 4, 3, 1.0)]
ALL_CORRECT = [("b", 3, 4, 1.0), ("b", 3, 6, 1.0), ("b", 3, 2, 1.0)]
ALL_WRONG = [("c", 2, 5, 0.0), ("c", 2, 3, 0.0), ("c", 2, 4, 0.0)]


def run(spec, options=ScopeOptions(), padding_rows=0, seed=0):
    rows = make_rows(spec, seed=seed)
    _, _, data = step_batch(rows, with_padding=padding_rows)
    padding = torch.tensor([False] * len(rows) + [True] * padding_rows)
    return rows, data, scope_batch(data, padding, options)


def test_teacher_logprobs_are_sliced_from_the_shifted_layout():
    rows = make_rows(MIXED + ALL_WRONG, seed=1)
    _, _, data = step_batch(rows)
    teacher, mask = padded_reference(rows, "teacher_logp")
    sliced = response_teacher_logprobs(data)
    assert sliced.shape == teacher.shape
    assert torch.equal(sliced[mask], teacher[mask])  # exact: no prompt value (50.0) and no off-by-one


def test_mixed_group_weights_are_dual_path_weights_of_the_rows():
    rows, data, result = run(MIXED + ALL_CORRECT + ALL_WRONG, seed=2)
    old, mask = padded_reference(rows, "old_logp")
    teacher, _ = padded_reference(rows, "teacher_logp")
    correct = torch.tensor([r.reward >= 1.0 for r in rows])
    groups = torch.tensor([ord(r.uid) for r in rows])
    want_stu, want_tea = dual_path_weights(groups, correct, sequence_mean_logp(old, mask),
                                           sequence_mean_logp(teacher, mask))
    w = result.rows
    assert torch.equal(w["scope_correct"], correct) and w["scope_valid"].all()
    assert torch.allclose(w["scope_student_weight"], want_stu) and torch.allclose(w["scope_teacher_weight"], want_tea)
    # authors aggregation: MLE over the correct rows' tokens, OPD over all tokens
    assert result.num_items == loss_denominators(mask, correct, "authors").tolist()


def test_all_correct_group_has_no_teacher_path_and_all_wrong_no_student_path():
    rows, _, result = run(ALL_CORRECT + ALL_WRONG, seed=3)
    w = result.rows
    stu, tea = w["scope_student_weight"], w["scope_teacher_weight"]
    assert torch.all(tea[:3] == 0) and torch.all(stu[3:] == 0)
    assert math.isclose(stu[:3].sum().item(), 3.0, rel_tol=1e-6)  # mean normalisation: sums to the path size
    assert math.isclose(tea[3:].sum().item(), 3.0, rel_tol=1e-6)
    assert result.metrics["scope/frac_all_correct_groups"] == 0.5 == result.metrics["scope/frac_all_wrong_groups"]


def test_padding_rows_and_empty_rows_get_weight_zero_and_no_tokens():
    spec = MIXED + [("a", 3, 0, 0.0)]  # an empty response in the mixed group
    rows, data, result = run(spec, padding_rows=2, seed=4)
    w = result.rows
    assert w.batch_size[0] == len(rows) + 2
    assert not w["scope_valid"][-3:].any() and w["scope_valid"][:-3].all()
    assert torch.all(w["scope_student_weight"][-3:] == 0) and torch.all(w["scope_teacher_weight"][-3:] == 0)
    # padding samples are not on either path and the empty row is left out of its group's normalisation
    assert not w["scope_correct"][-2:].any()
    assert math.isclose(w["scope_teacher_weight"][:4].sum().item(), 2.0, rel_tol=1e-6)
    _, mask = padded_reference(rows[:4], "old_logp")
    assert result.num_items == loss_denominators(mask, torch.tensor([r.reward >= 1 for r in rows[:4]]), "authors").tolist()


def _skip_teacher_like_the_agent_loop(rows, agent_loop_rewards, options=ScopeOptions()):
    """Rows whose agent-loop reward says correct get the agent loop's own placeholder teacher log-probs."""
    for r, reward in zip(rows, agent_loop_rewards):
        if skip_teacher(options, reward):
            _, placeholder = placeholder_teacher_outputs(r.teacher_logp.shape[0], pad_token_id=0)
            r.teacher_logp = placeholder.reshape(r.teacher_logp.shape)


def test_skipped_teacher_placeholders_on_correct_rows_are_never_read():
    rows = make_rows(MIXED, seed=5)
    _skip_teacher_like_the_agent_loop(rows, [r.reward for r in rows])
    _, _, data = step_batch(rows)
    result = scope_batch(data, torch.zeros(len(rows), dtype=torch.bool), ScopeOptions())
    assert result.rows["scope_valid"].all()
    assert torch.isfinite(result.rows["scope_teacher_weight"]).all()


def test_a_skipped_row_the_driver_calls_incorrect_raises_naming_the_row_and_both_verdicts():
    """The agent loop's reward said correct (teacher skipped), the driver's rm_scores say incorrect: no silent drop."""
    rows = make_rows(MIXED, seed=5)
    agent_loop_rewards = [r.reward for r in rows]
    agent_loop_rewards[1] = 1.0  # e.g. an overlong penalty applied later turned row 1's 1.0 into 0.0 on the driver
    _skip_teacher_like_the_agent_loop(rows, agent_loop_rewards)
    _, _, data = step_batch(rows)
    with pytest.raises(ValueError) as error:
        scope_batch(data, torch.zeros(len(rows), dtype=torch.bool), ScopeOptions())
    message = str(error.value)
    assert "rows 1 (uid a, rm_scores sum 0)" in message and "rows 0" not in message
    assert "called these rollouts correct" in message and "calls them incorrect" in message
    assert "skip_teacher_on_correct=false" in message
    # A real teacher failure on an incorrect row (NaN / -inf) is still the documented drop, not this error.
    rows = make_rows(MIXED, seed=5)
    rows[1].teacher_logp[0] = float("nan")
    _, _, data = step_batch(rows)
    assert scope_batch(data, torch.zeros(len(rows), dtype=torch.bool), ScopeOptions()).rows["scope_valid"][1].item() is False


def test_nonfinite_teacher_on_an_incorrect_row_drops_that_row_only():
    rows = make_rows(MIXED, seed=6)
    rows[1].teacher_logp[2] = float("-inf")
    _, _, data = step_batch(rows)
    result = scope_batch(data, torch.zeros(len(rows), dtype=torch.bool), ScopeOptions())
    assert result.rows["scope_valid"].tolist() == [True, False, True, True]
    assert result.rows["scope_teacher_weight"][1] == 0 and result.rows["scope_teacher_weight"][2] == 1
    assert result.metrics["scope/teacher_nonfinite_rows"] == 1


def test_opd_baseline_puts_every_valid_row_on_the_teacher_path_with_weight_one():
    rows, _, result = run(MIXED, ScopeOptions(algorithm="opd"), padding_rows=1, seed=7)
    w = result.rows
    assert not w["scope_correct"].any()
    assert w["scope_teacher_weight"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_verdict_threshold_is_the_option():
    spec = [("a", 2, 3, 0.5), ("a", 2, 3, 0.4)]
    _, _, result = run(spec, ScopeOptions(correct_threshold=0.5))
    assert result.rows["scope_correct"].tolist() == [True, False]


def test_top_k_teacher_layout_is_refused():
    rows = make_rows(MIXED[:2])
    samples, _, _ = step_batch(rows)
    for s in samples:
        s["teacher_logprobs"] = s["teacher_logprobs"].repeat(1, 4)
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    with pytest.raises(ValueError, match="sampled token"):
        response_teacher_logprobs(list_of_dict_to_tensordict(samples))
