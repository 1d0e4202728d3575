"""``ScopeTrainer._compute_advantage`` on a real verl step batch in a real TransferQueue (Ray, on CPU).

The batch goes where verl puts it: samples from the agent loop's output into TransferQueue, verl's own
padding (``upsample_batch_to_divisible_size``), old log-probs written back as the old-log-prob step does;
then the trainer's advantage step (verl's GRPO estimator, then SCOPE's weights) and the actor's view of
the batch (``_meta_to_realdata`` + ``prepare_micro_batches``) into the registered loss through verl's wrapper.

Why TransferQueue "hung" on a 2-CPU ``ray.init``: its controller and each of its 2 default storage units
are ``num_cpus=1`` actors, 3 logical CPUs in all; the last unit never schedules and ``tq.init`` waits
forever. Declaring 4 logical CPUs (or one storage unit) brings it up.
"""

import os

import pytest
import torch

ray = pytest.importorskip("ray")
tq = pytest.importorskip("transfer_queue")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.utils.transferqueue_utils import _meta_to_realdata  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402

from scope_opd.algorithms import scope_loss  # noqa: E402
from scope_opd.integrations.verl.config import LOSS_OPTIONS_KEY  # noqa: E402
from scope_opd.integrations.verl.trainer import ScopeTrainer  # noqa: E402
from scope_opd.integrations.verl.weights import ROW_FIELDS  # noqa: E402

from verl_batch import EOS_ID, make_rows, padded_reference, sample_dict, tag_dict  # noqa: E402

SPEC = [("p0", 3, 5, 1.0), ("p0", 4, 4, 0.0), ("p0", 3, 6, 0.0),
        ("p1", 2, 3, 1.0), ("p1", 2, 5, 1.0), ("p1", 5, 2, 1.0),
        ("p2", 4, 4, 0.0), ("p2", 3, 3, 0.0), ("p2", 2, 6, 0.0)]


@pytest.fixture(scope="module")
def transfer_queue():
    # A loaded 2-core CI box starts Ray's processes slower than its default waits (30 s for the raylet,
    # and the raylet's wait for the metrics agent it spawns).
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def put_step_batch(rows, batch_multiple):
    samples = [sample_dict(r, i, with_old_logp=False) for i, r in enumerate(rows)]
    keys = [f"{r.uid}_{i}_0" for i, r in enumerate(rows)]
    batch = tq.kv_batch_put(keys=keys, partition_id="train",
                            fields=tu.list_of_dict_to_tensordict(samples), tags=[tag_dict(r) for r in rows])
    batch = upsample_batch_to_divisible_size(batch, batch_multiple, EOS_ID)
    # the old-log-prob step's write-back (padding samples: zeros over their one response token)
    old = [r.old_logp for r in rows] + [torch.zeros(1)] * (len(batch) - len(rows))
    tq.kv_batch_put(keys=batch.keys, partition_id="train",
                    fields=tu.get_tensordict({"old_log_probs": torch.nested.as_nested_tensor(old, layout=torch.jagged)}))
    return batch


@pytest.fixture(scope="module")
def advantage_step(transfer_queue, paper_config):
    rows = make_rows(SPEC, seed=9)
    batch = put_step_batch(rows, batch_multiple=4)  # 9 samples -> 12: three of verl's padding samples
    trainer = ScopeTrainer(paper_config)
    metrics = {}
    before = [bool(t.get("is_padding", False)) for t in batch.tags]
    batch = trainer._compute_advantage(batch, metrics)
    return rows, before, batch, trainer, metrics


def test_compute_advantage_writes_scope_fields_for_the_whole_step(advantage_step):
    rows, padding, batch, trainer, metrics = advantage_step
    assert padding == [False] * 9 + [True] * 3
    assert LOSS_OPTIONS_KEY in batch.extra_info and len(batch.tags) == 12
    assert [bool(t.get("is_padding", False)) for t in batch.tags] == padding
    assert metrics["scope/frac_correct"] == pytest.approx(4 / 9)
    assert metrics["scope/frac_all_correct_groups"] == pytest.approx(1 / 3)
    fields = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=list(ROW_FIELDS) + ["advantages"])
    assert fields["advantages"].is_nested  # verl's own GRPO step ran first and wrote its (unused) advantages
    assert fields["scope_valid"].bool().tolist() == [True] * 9 + [False] * 3
    correct = fields["scope_correct"].bool()
    assert correct.tolist() == [r.reward >= 1 for r in rows] + [False] * 3
    stu, tea = fields["scope_student_weight"], fields["scope_teacher_weight"]
    assert torch.all(stu[9:] == 0) and torch.all(tea[9:] == 0)
    assert stu[3:6].sum().item() == pytest.approx(3.0) and torch.all(tea[3:6] == 0)  # all-correct group
    assert tea[6:9].sum().item() == pytest.approx(3.0) and torch.all(stu[6:9] == 0)  # all-wrong group
    assert stu[0].item() == 1.0 and tea[1:3].sum().item() == pytest.approx(2.0)  # mixed group, lone correct row


def test_actor_view_of_the_step_gives_scope_loss_through_verl_wrapper(advantage_step, paper_config):
    rows, _, batch, trainer, _ = advantage_step
    actor = omega_conf_to_dataclass(paper_config.actor_rollout_ref.actor)
    distillation = omega_conf_to_dataclass(paper_config.distillation)
    data = _meta_to_realdata(batch)  # what a worker receives: TransferQueue fields + extra_info
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(sum(r.response_len for r in rows)),
                         global_batch_size=12, use_dynamic_bsz=False, micro_batch_size_per_gpu=4)
    micro_batches, _ = prepare_micro_batches(data=data, dp_group=None, same_micro_num_in_dp=True)
    assert len(micro_batches) == 3

    fields = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=list(ROW_FIELDS))
    old, mask = padded_reference(rows, "old_logp")
    teacher, _ = padded_reference(rows, "teacher_logp")
    logp = (old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    ref, _ = scope_loss(logp, old, teacher, mask, fields["scope_correct"][:9].bool(),
                        fields["scope_student_weight"][:9], fields["scope_teacher_weight"][:9],
                        **trainer.scope_options.loss_kwargs())
    ref.backward()

    total, start = 0.0, 0
    grads = torch.zeros_like(old)
    for mb in micro_batches:
        n = mb.batch_size[0]
        pieces, leaves = [], []
        for j in range(n):
            i = start + j  # fixed-size micro-batches keep the batch order
            p, r = mb["prompts"][j].shape[0], mb["responses"][j].shape[0]
            leaf = (logp[i, :r].detach().clone() if i < len(rows) else torch.zeros(r)).requires_grad_(True)
            if i < len(rows):
                assert mb["uid"][j] == rows[i].uid and r == rows[i].response_len
            leaves.append(leaf)
            pieces.append(torch.cat([torch.full((p - 1,), -7.0), leaf, torch.zeros(1)]))
        flat = torch.cat(pieces)
        offsets = torch.tensor([0] + [x.shape[0] for x in pieces]).cumsum(0)
        nested = torch.nested.nested_tensor_from_jagged(flat, offsets=offsets)
        loss, _ = distillation_ppo_loss(actor, distillation, model_output={"log_probs": nested}, data=mb)
        loss.backward()
        total = total + loss.detach()
        for j, leaf in enumerate(leaves):
            if start + j < len(rows):
                grads[start + j, : leaf.shape[0]] = leaf.grad
        start += n
    assert torch.allclose(total, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads, logp.grad, rtol=1e-4, atol=1e-7)
