"""verl internals the plugin relies on that the other tests do not exercise end to end.

Each test fails if verl changes the behaviour; the README section lists them all.
"""

import ast
import inspect
import pathlib
from types import SimpleNamespace
from typing import Optional

import torch
import verl
from verl.trainer.ppo.v1.trainer_base import PPOTrainer
from verl.utils.import_utils import load_extern_object


def test_advantage_step_runs_after_old_log_probs_and_before_the_actor_update():
    # ScopeTrainer computes the weights in _compute_advantage: old_log_probs must exist by then,
    # and the actor update must come after it.
    source = inspect.getsource(PPOTrainer._step_once)
    order = [source.index(f"self.{name}(") for name in
             ("_balance_batch", "_compute_old_log_prob", "_compute_advantage", "_update_actor")]
    assert order == sorted(order)


def test_vllm_teacher_prompt_logprobs_are_shifted_by_one_with_a_dummy_last_entry():
    # verl's vLLM server turns prompt_logprobs into the [P + R, 1] layout the driver slices. vLLM is not
    # installable here, so run verl's function from its source on a vLLM-shaped output.
    path = pathlib.Path(verl.__file__).parent / "workers/rollout/vllm_rollout/utils.py"
    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_prompt_logprobs"]
    namespace = {"Optional": Optional, "RequestOutput": object}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)

    tokens, logps = [11, 12, 13, 14], [None, -0.5, -1.5, -2.5]
    lp = lambda x: SimpleNamespace(logprob=x, rank=1)  # noqa: E731
    output = SimpleNamespace(prompt_logprobs=[None] + [{str(t): lp(v)} for t, v in zip(tokens[1:], logps[1:])])
    result = {}
    namespace["extract_prompt_logprobs"](output, 0, result)
    # entry j = log p(token j + 1 | tokens <= j); last entry is a dummy 0
    assert result["prompt_logprobs"] == [[-0.5], [-1.5], [-2.5], [0.0]]
    assert result["prompt_ids"] == [[12], [13], [14], [0]]


def test_reward_function_loads_through_verls_pkg_path_and_scores():
    compute_score = load_extern_object("pkg://scope_opd.integrations.verl.reward", "compute_score")
    assert compute_score("deepmath", "so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert compute_score("deepmath", "\\boxed{3}", "0.5") == 0.0


def test_deepmath_rows_have_verls_rl_dataset_fields():
    from scope_opd.integrations.verl.prepare_deepmath import to_verl_row

    row = to_verl_row({"question": "What is 1+1?", "final_answer": "2"}, 0, "train")
    assert row["prompt"][0]["role"] == "user" and "\\boxed{}" in row["prompt"][0]["content"]
    assert row["reward_model"]["ground_truth"] == "2" and row["data_source"] == "deepmath"


def test_tensordict_row_selection_keeps_nested_fields():
    from verl.utils import tensordict_utils as tu

    td = tu.list_of_dict_to_tensordict([{"a": torch.arange(2)}, {"a": torch.arange(3)}, {"a": torch.arange(1)}])
    sub = tu.index_select_tensor_dict(td, [2, 0])
    assert sub["a"].is_nested and [x.tolist() for x in sub["a"].unbind()] == [[0], [0, 1]]
