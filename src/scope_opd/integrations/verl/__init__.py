"""SCOPE on verl 0.9 as a plugin (no fork).

``pip install "scope-opd[verl]"`` installs the ``verl.plugins`` entry point :mod:`.plugin`, which
``import verl`` loads in every process. It registers:

* the ``scope`` distillation loss (:mod:`.loss`; ``distillation.distillation_loss.loss_mode=scope``),
* the ``scope`` trainer (:mod:`.trainer`; ``trainer.v1.trainer_mode=scope``): verl's sync v1 trainer
  that computes SCOPE's group weights on the driver (:mod:`.weights`).

Optional: :mod:`.agent_loop` (teacher asked only about incorrect rollouts), :mod:`.reward` (the
project's maths verifier as a verl reward function), :mod:`.prepare_deepmath` (training data).
Options live in the YAML's ``scope:`` block (:mod:`.config`). The maths is
:mod:`scope_opd.algorithms` and :mod:`scope_opd.batch`; these modules only move tensors.

Importing this package imports nothing from verl; its submodules do.
"""
