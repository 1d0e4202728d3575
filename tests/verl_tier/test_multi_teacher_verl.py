"""Several teachers on verl: verl's own distillation.teacher_models + teacher_key route each sample to one teacher
in the agent loop; SCOPE's weights then use each rollout's routed teacher. min_perplexity is refused by name."""

import copy

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from verl.experimental.teacher_loop.teacher_manager import AsyncTeacherLLMServerManager
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from scope_opd.integrations.verl.config import ScopeOptions, check_verl_config
from scope_opd.integrations.verl.weights import scope_batch

from verl_batch import make_rows, padded_reference, step_batch

TEACHERS = {"math_teacher": ("openai/gsm8k", "Skywork/Skywork-OR1-7B"), "code_teacher": ("taco", "some/coder-7b")}


def two_teacher_config(paper_config):
    """The paper YAML with two teachers, 4 GPUs each, routed by data_source (verl's default teacher_key)."""
    cfg = copy.deepcopy(paper_config)
    template = OmegaConf.to_container(cfg.distillation.teacher_models.teacher_model)
    with open_dict(cfg):
        for name, (key, path) in TEACHERS.items():
            cfg.distillation.teacher_models[name] = {**template, "key": key, "model_path": path, "num_replicas": 4}
    return cfg


def test_verls_multi_teacher_config_passes_verl_and_scope_checks(paper_config):
    cfg = two_teacher_config(paper_config)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert check_verl_config(cfg) == ScopeOptions()
    distillation = omega_conf_to_dataclass(cfg.distillation)
    assert sorted(distillation.teacher_models) == ["openai/gsm8k", "taco"]  # verl keys its teachers by routing key
    assert distillation.teacher_key == "data_source"


def bare_teacher_manager(cfg):
    """verl's real teacher-server manager routing (its _resolve_teacher_key), without its Ray / vLLM servers."""
    manager = object.__new__(AsyncTeacherLLMServerManager)
    distillation = omega_conf_to_dataclass(cfg.distillation)
    manager.teacher_key, manager.teacher_model_configs = distillation.teacher_key, distillation.teacher_models
    return manager


def test_weights_use_each_rollouts_routed_teacher(paper_config):
    """Two groups, one per data_source: verl's manager routes each sample to its teacher; the step batch holds that
    teacher's log-probs (the two teachers' values differ), and the weights are eq. 5 of those values, per group."""
    cfg = two_teacher_config(paper_config)
    manager = bare_teacher_manager(cfg)
    spec = [("a", 3, 4, 1.0), ("a", 3, 5, 0.0), ("a", 3, 2, 0.0), ("a", 3, 3, 0.0),
            ("b", 4, 3, 0.0), ("b", 4, 6, 0.0), ("b", 4, 2, 1.0), ("b", 4, 4, 0.0)]
    source = {"a": "openai/gsm8k", "b": "taco"}
    by_teacher = {key: make_rows(spec, seed=seed) for key, seed in (("openai/gsm8k", 1), ("taco", 2))}
    routed = [manager._resolve_teacher_key(source[uid]) for uid, *_ in spec]
    assert routed == ["openai/gsm8k"] * 4 + ["taco"] * 4
    rows = [by_teacher[key][i] for i, key in enumerate(routed)]  # each sample's teacher_logprobs: its own teacher's
    _, _, data = step_batch(rows)
    result = scope_batch(data, torch.zeros(len(rows), dtype=torch.bool), ScopeOptions(weight_normalization="sum"))
    teacher, mask = padded_reference(rows, "teacher_logp")
    mean = (teacher * mask).sum(1) / mask.sum(1)
    wrong = torch.tensor([r.reward < 1.0 for r in rows])
    expected = torch.zeros(len(rows))
    for group in ("a", "b"):  # eq. 5, 'sum' normalisation: softmax of the routed teacher's mean log-prob
        idx = [i for i, (uid, *_) in enumerate(spec) if uid == group and wrong[i]]
        expected[idx] = torch.softmax(mean[idx].double(), 0).float()
    torch.testing.assert_close(result.rows["scope_teacher_weight"], expected)
    # Routed to the other teacher, the weights would differ: the check above can fail.
    other = [by_teacher["taco" if key == "openai/gsm8k" else "openai/gsm8k"][i] for i, key in enumerate(routed)]
    swapped = scope_batch(step_batch(other)[2], torch.zeros(len(rows), dtype=torch.bool), ScopeOptions(weight_normalization="sum"))
    assert not torch.allclose(swapped.rows["scope_teacher_weight"], expected)


def test_verl_refuses_an_unknown_routing_key_naming_the_teachers(paper_config):
    manager = bare_teacher_manager(two_teacher_config(paper_config))
    with pytest.raises(ValueError, match=r"No teacher configured for routing key 'physics'.*openai/gsm8k"):
        manager._resolve_teacher_key("physics")


def test_min_perplexity_routing_is_refused_on_verl_by_name(paper_config):
    cfg = two_teacher_config(paper_config)
    with open_dict(cfg):
        cfg.scope.teacher_routing = "min_perplexity"
    with pytest.raises(ValueError, match=r"scope\.teacher_routing='min_perplexity' is not supported on verl"):
        check_verl_config(cfg)
    with pytest.raises(ValueError, match=r"scope\.teacher_routing must be one of"):
        ScopeOptions(teacher_routing="vote")
