"""The ``scope:`` block of a verl YAML, and the verl settings SCOPE relies on.

Pure Python (no verl import): the driver-side trainer, the Ray-side loss and agent loop, and the
tests all read the options through :func:`scope_options`, and :func:`check_verl_config` names every
verl key whose value would make the SCOPE loss silently wrong.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ...algorithms import (
    AGGREGATIONS,
    MLE_SURROGATES,
    NORMALIZATIONS,
    OPD_ADVANTAGES,
    STUDENT_WEIGHTINGS,
    TEACHER_WEIGHTINGS,
)
from ...batch import SCOPE_ALGORITHMS, needs_student_logp

logger = logging.getLogger(__name__)

__all__ = ["ScopeOptions", "scope_options", "check_verl_config", "LOSS_OPTIONS_KEY", "TRAINER_NAME", "LOSS_NAME",
           "SKIPPED_TEACHER_LOGPROB"]

TRAINER_NAME = "scope"  # trainer.v1.trainer_mode
LOSS_NAME = "scope"  # distillation.distillation_loss.loss_mode
# The driver sends the loss options and the step's global denominators to the actor workers under this
# key of the batch's extra_info (verl turns extra_info into non-tensor entries of every micro-batch).
LOSS_OPTIONS_KEY = "scope_loss_options"
# The teacher log-prob the agent loop stores when it skips the teacher on a rollout its reward calls correct:
# +inf, a value no log-prob takes (a real teacher's failures are NaN or -inf), so the driver can tell a skipped
# row from a teacher failure and raise when it calls such a row incorrect.
SKIPPED_TEACHER_LOGPROB = float("inf")
TEACHER_ROUTINGS = ("key", "min_perplexity")  # scope.teacher_routing (names as SCOPEConfig's; verl: key only)


@dataclass(frozen=True)
class ScopeOptions:
    """SCOPE's options in a verl run: the ``scope:`` block at the top of the YAML.

    Same names and defaults as :class:`scope_opd.trainer.SCOPEConfig` where both exist.
    """

    algorithm: str = "scope"  # "scope" | "opd" (uniform weight 1 on every rollout, OPD path only)
    tau: float = 1.0
    weight_normalization: str = "mean"
    student_weighting: str = "perplexity"
    teacher_weighting: str = "inverse_perplexity"
    loss_aggregation: str = "authors"
    correct_threshold: float = 1.0
    mle_surrogate: str = "ratio"
    clip_epsilon: float | None = None
    clip_epsilon_high: float | None = None
    dual_clip: float | None = None
    # The OPD advantage's student log-prob: "current" (paper surrogate) or "old" (authors' code, fixed from
    # the sampling policy). Spelled out (no preset here): the authors' loss is logp / 0.2 / 3.0 / old.
    opd_advantage: str = "current"
    # Ask the teacher only about rollouts the verifier marked wrong (SCOPE reads no teacher value on
    # correct ones). Needs the agent loop manager of this plugin and streaming rewards.
    skip_teacher_on_correct: bool = True
    # Several teachers: verl's own distillation.teacher_models + distillation.teacher_key route each sample to
    # one teacher inside the agent loop ("key", the only routing supported here); the weights and the loss then
    # read each rollout's teacher_logprobs, i.e. its routed teacher's. "min_perplexity" is refused (see
    # check_verl_config).
    teacher_routing: str = "key"

    def __post_init__(self):
        for name, value, allowed in (
            ("algorithm", self.algorithm, SCOPE_ALGORITHMS),
            ("weight_normalization", self.weight_normalization, NORMALIZATIONS),
            ("student_weighting", self.student_weighting, STUDENT_WEIGHTINGS),
            ("teacher_weighting", self.teacher_weighting, TEACHER_WEIGHTINGS),
            ("loss_aggregation", self.loss_aggregation, AGGREGATIONS),
            ("mle_surrogate", self.mle_surrogate, MLE_SURROGATES),
            ("opd_advantage", self.opd_advantage, OPD_ADVANTAGES),
            ("teacher_routing", self.teacher_routing, TEACHER_ROUTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"scope.{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.tau, (int, float)) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"scope.tau must be a positive finite number, got {self.tau!r}")
        if not (isinstance(self.correct_threshold, (int, float)) and math.isfinite(self.correct_threshold)):
            raise ValueError(f"scope.correct_threshold must be a finite number, got {self.correct_threshold!r}")
        if self.clip_epsilon is not None and not (isinstance(self.clip_epsilon, (int, float)) and 0 < self.clip_epsilon < 1):
            raise ValueError(f"scope.clip_epsilon must be null or in (0, 1), got {self.clip_epsilon!r}")
        high = self.clip_epsilon_high
        if high is not None and not (isinstance(high, (int, float)) and 0 < high < math.inf):
            raise ValueError(f"scope.clip_epsilon_high must be null or a positive number, got {high!r}")
        if self.clip_epsilon_high is not None and self.clip_epsilon is None:
            raise ValueError("scope.clip_epsilon_high needs scope.clip_epsilon (the low side of the clip)")
        if self.dual_clip is not None and not (isinstance(self.dual_clip, (int, float)) and self.dual_clip > 1):
            raise ValueError(f"scope.dual_clip must be null or a number > 1, got {self.dual_clip!r}")

    @property
    def needs_student_logp(self) -> bool:
        return needs_student_logp(self.algorithm, self.student_weighting)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`scope_opd.algorithms.scope_loss` these options set."""
        return {
            "aggregation": self.loss_aggregation,
            "mle_surrogate": self.mle_surrogate,
            "clip_epsilon": self.clip_epsilon,
            "clip_epsilon_high": self.clip_epsilon_high,
            "dual_clip": self.dual_clip,
            "opd_advantage": self.opd_advantage,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def scope_options(config: Mapping | None) -> ScopeOptions:
    """Parse the ``scope:`` block of a (Hydra / OmegaConf or plain) config; unknown keys are an error."""
    block = {} if config is None else config.get("scope", None)
    if block is None:
        block = {}
    block = dict(block.items())
    _refuse_topk_opd_loss(block)
    known = {f.name for f in fields(ScopeOptions)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"unknown key(s) scope.{', scope.'.join(unknown)}; known: {sorted(known)}")
    return ScopeOptions(**block)


def _refuse_topk_opd_loss(block: dict) -> None:
    """``scope.opd_loss`` (the TRL trainer's option, issue 20): only the paper's ``sampled`` runs on verl.

    The plugin's loss reads one teacher log-prob per token (the sampled token's); verl's own teacher top-k
    (``forward_kl_topk``) is not wired to SCOPE's weights. ``opd_loss: sampled`` is accepted and dropped (it
    is what verl runs); a top-k option, or ``teacher_top_k`` which only they read, is refused by name.
    """
    opd_loss = block.pop("opd_loss", "sampled")
    if opd_loss != "sampled":
        raise ValueError(f"scope.opd_loss={opd_loss!r} is not supported on verl: the plugin's scope loss uses the "
                         "sampled token's teacher log-prob only (the paper's OPD path); set scope.opd_loss=sampled "
                         "or train with the TRL trainer (SCOPEConfig.opd_loss), which has the top-k losses")
    if "teacher_top_k" in block:
        raise ValueError("scope.teacher_top_k is not supported on verl: it is read only by the top-k opd_loss "
                         "options, which verl does not run; remove it")


def _get(config: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part, None)
    return default if node is None else node


def check_verl_config(config: Mapping) -> ScopeOptions:
    """Refuse a verl config under which the ``scope`` trainer + loss would not compute SCOPE's loss.

    Returns the parsed :class:`ScopeOptions`. Every check names the key to change.
    """
    options = scope_options(config)
    problems = []

    def expect(key, wanted, why):
        value = _get(config, key)
        if value != wanted:
            problems.append(f"{key} must be {wanted!r} ({why}), got {value!r}")

    expect("trainer.v1.trainer_mode", "scope", "the SCOPE weights are computed on the driver by the 'scope' trainer")
    expect("distillation.enabled", True, "SCOPE needs the teacher log-probs of verl's distillation path")
    expect("distillation.distillation_loss.loss_mode", "scope", "the registered SCOPE loss")
    expect("distillation.distillation_loss.use_task_rewards", False, "SCOPE replaces the policy-gradient loss")
    expect(
        "distillation.distillation_loss.use_policy_gradient", False,
        "the SCOPE loss is differentiated as returned; verl's policy-gradient path would detach it",
    )
    if _get(config, "distillation.distillation_loss.loss_max_clamp") is not None:
        problems.append("distillation.distillation_loss.loss_max_clamp must be null (clamping would alter the SCOPE loss)")
    # distillation.distillation_loss.log_prob_min_clamp (verl's dataclass default -10) is left alone: verl 0.9.1
    # reads it only in its top-k losses, never on the sampled-token path that calls the 'scope' loss
    # (tests/verl_tier/test_loss.py::test_verls_log_prob_min_clamp_never_reaches_the_scope_loss guards this).
    expect(
        "actor_rollout_ref.actor.loss_agg_mode", "token-sum",
        "the SCOPE loss does its own aggregation (scope.loss_aggregation) with global denominators",
    )
    for key in ("actor_rollout_ref.actor.use_kl_loss", "algorithm.use_kl_in_reward"):
        if _get(config, key, False):
            problems.append(f"{key} must be false (SCOPE has no reference-model KL; it would be ignored or mix in)")
    if float(_get(config, "actor_rollout_ref.actor.entropy_coeff", 0.0) or 0.0) != 0.0:
        problems.append("actor_rollout_ref.actor.entropy_coeff must be 0 (the SCOPE loss has no entropy bonus)")

    # Global denominators are counted on the driver over one _step_once batch; they are exact when that
    # batch is one optimiser mini-batch (the paper: 256 prompts per batch and per mini-batch).
    train_batch_size = _get(config, "data.train_batch_size")
    mini_batch_size = _get(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    sync_steps = _get(config, "trainer.v1.sync.parameter_sync_step", 1) or 1
    if options.loss_aggregation != "sum" and train_batch_size is not None and mini_batch_size is not None:
        if int(mini_batch_size) * int(sync_steps) != int(train_batch_size):
            problems.append(
                f"actor_rollout_ref.actor.ppo_mini_batch_size ({mini_batch_size}) must equal data.train_batch_size "
                f"({train_batch_size}) / parameter_sync_step ({sync_steps}) for scope.loss_aggregation="
                f"{options.loss_aggregation!r}: verl forms mini-batches inside the workers and reports no per-path "
                "token counts, so the denominators are counted over the whole step batch (use 'sum' otherwise)"
            )
    if options.skip_teacher_on_correct and options.algorithm == "scope":
        manager = _get(config, "actor_rollout_ref.rollout.agent.agent_loop_manager_class")
        if manager in (None, ""):
            logger.warning(
                "scope.skip_teacher_on_correct is true but actor_rollout_ref.rollout.agent.agent_loop_manager_class is "
                "unset: verl's agent loop asks the teacher about every rollout; set it to %s to skip correct ones",
                AGENT_LOOP_MANAGER,
            )
        elif manager != AGENT_LOOP_MANAGER:
            problems.append(
                f"actor_rollout_ref.rollout.agent.agent_loop_manager_class is {manager!r}; scope.skip_teacher_on_correct "
                f"needs {AGENT_LOOP_MANAGER!r} (or set scope.skip_teacher_on_correct=false)"
            )
    if options.teacher_routing == "min_perplexity":
        problems.append(
            "scope.teacher_routing='min_perplexity' is not supported on verl (use 'key', verl's own routing by "
            f"distillation.teacher_key={_get(config, 'distillation.teacher_key')!r}): it needs every teacher to score "
            "each wrong rollout inside the agent loop, and verl 0.9.1's TeacherManager asks one teacher per sample; the "
            "hook that would fan a sample out to all teachers (the agent loop's _compute_teacher_logprobs) is not "
            "tested against verl's real teacher servers, so it is refused rather than shipped untested"
        )
    if problems:
        raise ValueError("verl config is not set up for SCOPE:\n  - " + "\n  - ".join(problems))
    return options


AGENT_LOOP_MANAGER = "scope_opd.integrations.verl.agent_loop.ScopeAgentLoopManager"
