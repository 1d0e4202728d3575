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


def sample_dict(row: Row, session_id: int, teacher_prompt_value: float = 50.0) -> dict:
    """One sample as the agent loop stores it. The teacher's prompt positions hold ``teacher_prompt_value``
    (never read): a wrong slice of the shifted layout shows up as a wildly wrong value."""
    gen = torch.Generator().manual_seed(hash((row.uid, session_id)) % (2**31))
    prompts = torch.randint(3, 100, (row.prompt_len,), generator=gen)
    responses = torch.randint(3, 100, (row.response_len,), generator=gen)
    response_mask = torch.ones(row.response_len, dtype=torch.int64)
    rm_scores = torch.zeros(row.response_len, dtype=torch.float32)
    if row.response_len:
        rm_scores[-1] = row.reward
    seq = row.prompt_len + row.response_len
    # teacher_logprobs[j] = log p_T(token j + 1 | tokens <= j); the last entry is verl's dummy 0.
    teacher = torch.full((seq, 1), teacher_prompt_value)
    teacher[row.prompt_len - 1 : row.prompt_len - 1 + row.response_len, 0] = row.teacher_logp
    teacher[-1, 0] = 0.0
    input_ids = torch.cat([prompts, responses])
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask,
        "loss_mask": response_mask,
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(seq),
        "rm_scores": rm_scores,
        "teacher_logprobs": teacher,
        "teacher_ids": torch.cat([input_ids[1:], torch.tensor([0])])[:, None].to(torch.int32),
        "old_log_probs": row.old_logp.clone(),
        "uid": row.uid,
        "session_id": session_id,
        "num_turns": 2,
    }


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
