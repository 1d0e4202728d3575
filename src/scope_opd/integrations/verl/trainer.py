"""Driver side: the ``scope`` trainer (``trainer.v1.trainer_mode=scope``), verl's sync v1 trainer plus SCOPE's weights.

SCOPE's weights are a softmax inside each prompt's group, over the whole group: a loss sees one
micro-batch (groups split) and a custom advantage estimator sees no log-probs, so the weights are
computed here, on the driver, after verl's own advantage step (step 7 of ``_step_once``) and before
the actor update, and written back to TransferQueue as per-row fields the ``scope`` loss reads.
"""

from __future__ import annotations

import json

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from .config import LOSS_OPTIONS_KEY, TRAINER_NAME, ScopeOptions, check_verl_config
from .weights import DRIVER_FIELDS, scope_batch

__all__ = ["ScopeTrainer", "loss_options_json", "register"]


def loss_options_json(options: ScopeOptions, num_items: list[float]) -> str:
    """What the driver sends to the actor workers with each step batch (``extra_info``)."""
    return json.dumps({"num_items": num_items, "loss_kwargs": options.loss_kwargs()}, sort_keys=True)


class ScopeTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer with SCOPE's dual-path weights and loss (paper eqs. 4-7)."""

    def __init__(self, config):
        self.scope_options = check_verl_config(config)
        super().__init__(config)

    # verl's v1 code branches on ``trainer_mode == "sync"`` (replay buffer class, exact refills, resume,
    # its per-mode config block): this is the sync trainer registered under another name, so that code
    # must see "sync". verl assigns the configured name in PPOTrainer.__init__; anything else is refused.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        if value != TRAINER_NAME:
            raise ValueError(f"{type(self).__name__} runs as trainer.v1.trainer_mode={TRAINER_NAME!r}, got {value!r}")

    def _compute_advantage(self, batch, metrics: dict):
        # verl's own step first: its advantages are unused by the SCOPE loss (use_task_rewards=false) but
        # its metrics read them, and its rollout correction writes the IS weights the loss applies per token.
        batch = super()._compute_advantage(batch, metrics)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(DRIVER_FIELDS))
        padding = torch.tensor([bool(tag.get("is_padding", False)) for tag in batch.tags], dtype=torch.bool)
        result = scope_batch(data, padding, self.scope_options)
        extra_info = dict(batch.extra_info)
        batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=result.rows)
        batch.extra_info.update(extra_info)
        batch.extra_info[LOSS_OPTIONS_KEY] = loss_options_json(self.scope_options, result.num_items)
        metrics.update(result.metrics)
        return batch


def register() -> None:
    """Register :class:`ScopeTrainer` as ``trainer.v1.trainer_mode=scope`` (idempotent)."""
    if TRAINER_REGISTRY.get(TRAINER_NAME) is ScopeTrainer:
        return
    register_trainer(TRAINER_NAME)(ScopeTrainer)
