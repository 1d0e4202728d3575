"""The paper YAML composes with verl's Hydra tree, passes validate_config, and every SCOPE option is reachable."""

import copy
import dataclasses

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.utils.config import omega_conf_to_dataclass, validate_config
from verl.workers.config import DistillationConfig

from scope_opd.algorithms import AGGREGATIONS, OPD_ADVANTAGES, STUDENT_WEIGHTINGS, TEACHER_WEIGHTINGS
from scope_opd.integrations.verl.config import ScopeOptions, check_verl_config, scope_options
from scope_opd.integrations.verl.trainer import ScopeTrainer

from verl_batch import compose_config


def test_paper_yaml_passes_verl_validate_config_and_scope_checks(paper_config):
    cfg = paper_config
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert not need_reference_policy(cfg) and not need_critic(cfg)
    options = check_verl_config(cfg)
    assert options == ScopeOptions()  # the YAML spells out the defaults
    # Table 3
    assert cfg.data.train_batch_size == 256 == cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (4096, 12288)
    assert cfg.actor_rollout_ref.actor.optim.lr == 5e-5 and cfg.actor_rollout_ref.actor.optim.weight_decay == 0.01
    assert cfg.actor_rollout_ref.rollout.temperature == 0.6 and cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.actor_rollout_ref.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.distillation.teacher_models.teacher_model.model_path == "Skywork/Skywork-OR1-7B"


def test_distillation_config_resolves_the_registered_scope_loss(paper_config):
    distillation = omega_conf_to_dataclass(paper_config.distillation)
    assert isinstance(distillation, DistillationConfig)
    settings = distillation.distillation_loss.loss_settings
    assert settings.names == ["scope"] and settings.use_estimator and not settings.use_topk
    teacher = distillation.teacher_models["default"]
    # verl turns the teacher's context into prompt + response and asks for one token.
    assert teacher.inference.prompt_length == 4096 + 12288 and teacher.inference.response_length == 1


def test_scope_trainer_builds_as_verl_sync_trainer(paper_config):
    trainer = ScopeTrainer(paper_config)
    assert trainer.trainer_mode == "sync" and trainer.parameter_sync_step == 1
    assert type(trainer.replay_buffer) is ReplayBuffer
    assert trainer.scope_options == ScopeOptions()


def test_every_option_is_reachable_from_hydra_overrides():
    overrides = {"tau": 0.5, "weight_normalization": "sum", "student_weighting": "inverse",
                 "teacher_weighting": "uniform", "loss_aggregation": "seq-mean-token-mean", "correct_threshold": 0.5,
                 "algorithm": "opd", "mle_surrogate": "logp", "clip_epsilon": 0.2, "clip_epsilon_high": 0.28,
                 "dual_clip": 3.0, "opd_advantage": "old", "skip_teacher_on_correct": False,
                 "teacher_routing": "key"}
    assert set(overrides) == {f.name for f in dataclasses.fields(ScopeOptions)}
    options = scope_options(compose_config([f"scope.{k}={str(v).lower()}" for k, v in overrides.items()]))
    assert options == ScopeOptions(**overrides)


@pytest.mark.parametrize(
    "field, choices",
    [("loss_aggregation", AGGREGATIONS), ("student_weighting", STUDENT_WEIGHTINGS),
     ("teacher_weighting", TEACHER_WEIGHTINGS), ("algorithm", ("scope", "opd")), ("opd_advantage", OPD_ADVANTAGES)],
)
def test_every_choice_of_the_library_is_accepted(field, choices):
    for choice in choices:
        assert getattr(scope_options({"scope": {field: choice}}), field) == choice


def with_override(config, key, value):
    config = copy.deepcopy(config)
    OmegaConf.update(config, key, value, force_add=True)
    return config


@pytest.mark.parametrize(
    "key, value",
    [("trainer.v1.trainer_mode", "sync"), ("distillation.enabled", False),
     ("distillation.distillation_loss.use_policy_gradient", True),
     ("distillation.distillation_loss.use_task_rewards", True),
     ("distillation.distillation_loss.loss_max_clamp", 10.0), ("distillation.distillation_loss.loss_mode", "k3"),
     ("actor_rollout_ref.actor.loss_agg_mode", "token-mean"), ("actor_rollout_ref.actor.use_kl_loss", True),
     ("algorithm.use_kl_in_reward", True), ("actor_rollout_ref.actor.entropy_coeff", 0.001),
     ("actor_rollout_ref.actor.ppo_mini_batch_size", 64),
     ("actor_rollout_ref.rollout.agent.agent_loop_manager_class", "my.Manager"),
     ("scope.tau", 0), ("scope.loss_aggregation", "mean"), ("scope.clip_epsilon", 1.5), ("scope.temperature", 1.0)],
)
def test_settings_that_would_break_the_loss_are_refused_by_name(paper_config, key, value):
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        check_verl_config(with_override(paper_config, key, value))


def test_sum_aggregation_allows_several_mini_batches_per_step(paper_config):
    cfg = with_override(with_override(paper_config, "scope.loss_aggregation", "sum"),
                        "actor_rollout_ref.actor.ppo_mini_batch_size", 64)
    assert check_verl_config(cfg).loss_aggregation == "sum"
