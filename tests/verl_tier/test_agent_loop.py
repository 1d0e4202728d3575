"""The agent loop asks the teacher only about incorrect rollouts, through verl's supported manager hook."""

import asyncio
import inspect

import pytest
import torch
from verl.experimental.teacher_loop.teacher_manager import _pad_teacher_outputs
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
from verl.utils.import_utils import load_class_from_fqn

from scope_opd.integrations.verl.agent_loop import (
    ScopeAgentLoopManager, ScopeAgentLoopWorker, _ScopeAgentLoopWorker, placeholder_teacher_outputs, skip_teacher)
from scope_opd.integrations.verl.config import AGENT_LOOP_MANAGER, ScopeOptions


class Output:
    """The two attributes of verl's AgentLoopOutput that _compute_teacher_logprobs touches."""

    def __init__(self, reward_score):
        self.reward_score = reward_score
        self.extra_fields = {}


def bare_worker(config):
    worker = object.__new__(_ScopeAgentLoopWorker)  # the real class, without its Ray/LLM-server setup
    worker.config, worker.distillation_enabled = config, True
    worker.tokenizer = type("Tok", (), {"pad_token_id": 0})()
    return worker


def test_config_names_the_manager_that_verl_loads():
    assert load_class_from_fqn(AGENT_LOOP_MANAGER, "AgentLoopManager") is ScopeAgentLoopManager


def test_manager_builds_scope_workers(paper_config):
    manager = ScopeAgentLoopManager(config=paper_config, llm_client=None)
    assert manager.agent_loop_workers_class is ScopeAgentLoopWorker


def test_verl_scores_a_sample_before_asking_the_teacher():
    # The skip relies on this order in verl's postprocessing; if verl changes it, the skip never fires.
    source = inspect.getsource(AgentLoopWorkerTQ.__ray_actor_class__._agent_loop_postprocess)
    assert source.index("self._compute_score(") < source.index("self._compute_teacher_logprobs(")


@pytest.mark.parametrize("reward, options, skipped", [
    (1.0, ScopeOptions(), True), (0.0, ScopeOptions(), False), (None, ScopeOptions(), False),
    (0.7, ScopeOptions(correct_threshold=0.5), True), (1.0, ScopeOptions(algorithm="opd"), False),
    (1.0, ScopeOptions(skip_teacher_on_correct=False), False)])
def test_skip_rule_is_the_trainers_verdict(reward, options, skipped):
    assert skip_teacher(options, reward) is skipped


def test_correct_rollout_gets_placeholders_in_verl_layout(paper_config):
    worker, output = bare_worker(paper_config), Output(1.0)
    asyncio.run(worker._compute_teacher_logprobs(output, [5, 6, 7], [8, 9], validate=False))
    ids, logprobs = output.extra_fields["teacher_ids"], output.extra_fields["teacher_logprobs"]
    # +inf: no teacher returns it (failures are NaN / -inf), so the driver can tell a skipped row from a failure
    assert ids.shape == logprobs.shape == (5, 1) and (logprobs == float("inf")).all()
    # verl pads them like real teacher outputs
    padded_ids, padded_logprobs = _pad_teacher_outputs(ids, logprobs, prompt_width=4, response_width=3,
                                                       prompt_length=3, response_length=2, pad_token_id=0)
    assert padded_logprobs.shape == (1, 7, 1)


def test_incorrect_rollout_and_validation_go_to_verls_teacher_request(paper_config):
    # verl's own method then asks its teacher_server_manager, which this bare worker has not got.
    for reward, validate in ((0.0, False), (1.0, True)):
        worker, output = bare_worker(paper_config), Output(reward)
        if validate:
            asyncio.run(worker._compute_teacher_logprobs(output, [5], [6], validate=True))
            assert output.extra_fields == {}  # verl never scores validation rollouts
            continue
        with pytest.raises(AttributeError, match="teacher_server_manager"):
            asyncio.run(worker._compute_teacher_logprobs(output, [5], [6], validate=False))


def test_placeholder_dtypes_match_verls_teacher_outputs():
    ids, logprobs = placeholder_teacher_outputs(4, 7)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32 and ids.eq(7).all()
