"""Actor side: the ``scope`` distillation loss, registered in verl's distillation-loss registry.

verl's wrapper (``verl.trainer.distillation.losses.distillation_loss``) calls a registered loss on
each micro-batch with the model output (current log-probs, with grad) and the micro-batch, teacher
log-probs included, and aggregates the ``[b, T]`` matrix it returns with the actor's
``loss_agg_mode``. SCOPE's loss needs its own aggregation (two paths, global per-path
denominators), so this function computes the micro-batch's share of the step's loss with
:func:`scope_opd.algorithms.scope_loss` and returns it spread evenly over the micro-batch's response
tokens: under ``loss_agg_mode=token-sum`` the wrapper's aggregate is exactly
``dp_size * share`` (verl's convention: data-parallel gradient averaging then yields the gradient of
the whole step's loss), in value and in gradient, at any parameters.
"""

from __future__ import annotations

import json

import torch
from tensordict import TensorDict
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from ...algorithms import scope_loss
from .config import LOSS_NAME, LOSS_OPTIONS_KEY
from .weights import ROW_FIELDS, padded, response_teacher_logprobs

__all__ = ["compute_scope_distillation_loss", "SETTINGS"]

# use_estimator: the teacher serves the sampled token's log-prob only ([P + R, 1] per sample).
SETTINGS = DistillationLossSettings(names=[LOSS_NAME], use_estimator=True)


def _loss_options(data: TensorDict) -> dict:
    raw = tu.get_non_tensor_data(data=data, key=LOSS_OPTIONS_KEY, default=None)
    missing = [name for name in ROW_FIELDS if name not in data.keys()]
    if raw is None or missing:
        raise ValueError(
            f"the '{LOSS_NAME}' distillation loss got a micro-batch without SCOPE's driver-side fields "
            f"(missing: {missing or [LOSS_OPTIONS_KEY]}); set trainer.v1.trainer_mode=scope so the scope "
            "trainer computes the per-row weights"
        )
    return json.loads(raw)


def compute_scope_distillation_loss(config, distillation_config, model_output, data: TensorDict):
    """``(per_token [b, T], metrics)``: the SCOPE loss share of this micro-batch, spread over its tokens.

    ``config`` is the actor config (its ``loss_agg_mode`` must be ``token-sum``, checked here too),
    ``model_output["log_probs"]`` the current log-probs (nested over prompt + response, shifted).
    """
    if config.loss_agg_mode != "token-sum":
        raise ValueError(
            f"the '{LOSS_NAME}' loss needs actor_rollout_ref.actor.loss_agg_mode=token-sum, got {config.loss_agg_mode!r}"
        )
    options = _loss_options(data)
    logp = no_padding_2_padding(model_output["log_probs"], data)
    response_mask = padded(data["response_mask"]).bool()
    old_logp = padded(data["old_log_probs"])
    teacher_logp = response_teacher_logprobs(data)
    valid = data["scope_valid"].bool().reshape(-1)
    token_weights = data.get("rollout_is_weights", None)
    if token_weights is not None:
        token_weights = padded(token_weights, 1.0)
    loss, metrics = scope_loss(
        logp,
        old_logp,
        teacher_logp,
        response_mask & valid[:, None],
        data["scope_correct"].bool().reshape(-1),
        data["scope_student_weight"].float().reshape(-1),
        data["scope_teacher_weight"].float().reshape(-1),
        num_items=torch.tensor(options["num_items"], dtype=torch.float32, device=logp.device),
        token_weights=token_weights,
        **options["loss_kwargs"],
    )
    # token-sum aggregation in the wrapper: masked_sum(per_token) * dp_size == loss * dp_size.
    per_token = response_mask * (loss / response_mask.sum().clamp(min=1))
    shares = {"scope/loss_mle": metrics.pop("loss/mle"), "scope/loss_opd": metrics.pop("loss/opd")}
    out = {name: Metric(AggregationType.SUM, value) for name, value in shares.items()}
    out.update({f"scope/{name.replace('/', '_')}": Metric(AggregationType.MEAN, value) for name, value in metrics.items()})
    return per_token, out


def register() -> None:
    """Put the loss in verl's registry under ``scope`` (idempotent: a second plugin load is a no-op)."""
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

    if DISTILLATION_LOSS_REGISTRY.get(LOSS_NAME) is compute_scope_distillation_loss:
        return
    register_distillation_loss(SETTINGS)(compute_scope_distillation_loss)
