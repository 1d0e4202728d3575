"""Step batches built the way verl 0.9 builds them, with known per-token values to check against.

Each sample is the dict ``AgentLoopWorkerTQ._agent_loop_postprocess`` puts into TransferQueue
(``AgentLoopOutput.as_dict()`` fields: unpadded ``prompts``/``responses``/``response_mask``,
``rm_scores`` with the reward on the last response position, ``teacher_logprobs`` of shape
``[P + R, 1]`` in the teacher manager's shifted layout), then the fields the old-log-prob step adds
(``old_log_probs`` over the response). ``list_of_dict_to_tensordict`` is verl's own batching; padding
samples come from verl's ``construct_minimal_padding_template``.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
from verl.trainer.ppo.padding_utils import construct_minimal_padding_template
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

PAD_ID, EOS_ID = 0, 2
REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "verl"
PAPER_CONFIG = "scope_r1_distill_qwen_1.5b"


def compose_config(overrides=(), name=PAPER_CONFIG):
    """The verl config our YAML composes to, through Hydra and verl's own config tree."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


@dataclass
class Row:
    uid: str
    prompt_len: int
    response_len: int
    reward: float
    old_logp: torch.Tensor  # [R]
    teacher_logp: torch.Tensor  # [R]


def make_rows(spec, seed=0):
    """``spec``: list of (uid, prompt_len, response_len, reward). Log-probs drawn in [-3, -0.05]."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for uid, p, r, reward in spec:
        old = -(torch.rand(r, generator=gen) * 2.95 + 0.05)
        teacher = -(torch.rand(r, generator=gen) * 2.95 + 0.05)
        rows.append(Row(uid, p, r, reward, old, teacher))
    return rows


def sample_dict(row: Row, session_id: int, teacher_prompt_value: float = 50.0, with_old_logp: bool = True) -> dict:
    """One sample as ``AgentLoopWorkerTQ._agent_loop_postprocess`` stores it: verl's ``AgentLoopOutput.as_dict()``
    plus the fields that method adds. The teacher's prompt positions hold ``teacher_prompt_value`` (never
    read): a wrong slice of the shifted layout shows up as a wildly wrong value."""
    gen = torch.Generator().manual_seed(hash((row.uid, session_id)) % (2**31))
    prompts = torch.randint(3, 100, (row.prompt_len,), generator=gen)
    responses = torch.randint(3, 100, (row.response_len,), generator=gen)
    seq = row.prompt_len + row.response_len
    # teacher_logprobs[j] = log p_T(token j + 1 | tokens <= j); the last entry is verl's dummy 0.
    teacher = torch.full((seq, 1), teacher_prompt_value)
    teacher[row.prompt_len - 1 : row.prompt_len - 1 + row.response_len, 0] = row.teacher_logp
    teacher[-1, 0] = 0.0
    input_ids = torch.cat([prompts, responses])
    output = AgentLoopOutput(
        prompt_ids=prompts.tolist(), response_ids=responses.tolist(), response_mask=[1] * row.response_len,
        # verl 0.9.1's as_dict cannot put a reward on an empty response (IndexError on rm_scores[-1]),
        # so the agent loop never stores one; an empty row here gets its (empty) rm_scores below.
        reward_score=row.reward if row.response_len else None, num_turns=2, metrics=AgentLoopMetrics(),
        extra_fields={"teacher_ids": torch.cat([input_ids[1:], torch.tensor([0])])[:, None].to(torch.int32),
                      "teacher_logprobs": teacher, "reward_extra_info": {}},
    )
    field = output.as_dict()
    field.setdefault("rm_scores", torch.zeros(0))
    field.update(uid=row.uid, session_id=session_id)
    field["loss_mask"] = field["response_mask"]
    field["input_ids"] = input_ids
    field["position_ids"] = torch.arange(seq)
    field.pop("metrics")  # timing only
    if with_old_logp:  # written by the old-log-prob step in a real run
        field["old_log_probs"] = row.old_logp.clone()
    return field


def tag_dict(row: Row) -> dict:
    return {"status": "success", "prompt_len": row.prompt_len, "response_len": row.response_len,
            "seq_len": row.prompt_len + row.response_len, "global_steps": 1}


def padding_sample(source: dict, source_tag: dict) -> tuple[dict, dict]:
    """A padding sample exactly as ``upsample_batch_to_divisible_size`` makes one (old_log_probs added later)."""
    sample, tag = construct_minimal_padding_template(dict(source), dict(source_tag), EOS_ID)
    sample["uid"] = "pad-uid"
    sample["old_log_probs"] = torch.zeros(sample["responses"].shape[0])
    return sample, tag


def step_batch(rows, with_padding=0):
    """``(samples, tags, TensorDict)`` for a whole step (verl's batching of the per-sample dicts)."""
    samples = [sample_dict(r, i) for i, r in enumerate(rows)]
    tags = [tag_dict(r) for r in rows]
    for _ in range(with_padding):
        s, t = padding_sample(samples[0], tags[0])
        samples.append(s)
        tags.append(t)
    keys = samples[0].keys()
    samples = [{k: s[k] for k in keys} for s in samples]
    return samples, tags, list_of_dict_to_tensordict(samples)


def padded_reference(rows, values: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, Rmax] values, [B, Rmax] mask)`` straight from the rows (independent of verl's slicing)."""
    width = max(r.response_len for r in rows)
    out = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.response_len] = getattr(r, values)
        mask[i, : r.response_len] = True
    return out, mask
