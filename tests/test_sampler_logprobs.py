"""Sampled tokens' log-probs read during transformers' generate (scope_opd.sampler_logprobs).

Reference: one full-sequence forward of prompt + completion, ``log_softmax(logits / T)`` at each
completion position (what TRL's old-log-prob pass computes). The capture must match it token for
token on real Qwen2 generation: left-padded prompts of different lengths, rows stopping at EOS at
different steps, sampling with top-k/top-p (which must not enter the log-probs).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from scope_opd.sampler_logprobs import SampledLogprobCapture

from conftest import build_tiny_qwen2

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(char_tokenizer):
    return build_tiny_qwen2(char_tokenizer, hidden_size=32, seed=3).eval()


def left_padded(tokenizer, prompts):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
    return ids, input_ids, mask


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 24, seed: int = 0):
    prompt_ids, input_ids, mask = left_padded(tokenizer, prompts)
    config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=20, top_p=0.95, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad(), SampledLogprobCapture(model, TEMPERATURE) as capture:
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    completions = []
    for row in out[:, input_ids.shape[1]:].tolist():  # cut after the first EOS, as TRL does
        completions.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return prompt_ids, completions, capture


def forward_logprobs(model, prompt_ids, completion):
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


PROMPTS = ["12+34=", "7+5+9=", "1+2+3+4+5+6=", "99+1="]


def test_captured_logprobs_equal_a_full_forward_token_by_token(model, char_tokenizer):
    prompt_ids, completions, capture = generate(model, char_tokenizer, PROMPTS * 2)
    captured = capture.per_row(completions)
    assert captured is not None, capture.failure
    assert [len(c) for c in captured] == [len(c) for c in completions]
    worst = 0.0
    for p, c, lp in zip(prompt_ids * 2, completions, captured):
        reference = forward_logprobs(model, p, c)
        worst = max(worst, (torch.tensor(lp) - reference).abs().max().item())
    assert worst < 1e-5, worst


def test_rows_that_stop_at_different_steps_keep_their_own_length(model, char_tokenizer):
    # A strong EOS bias during sampling only: rows stop early and at different steps. The reference
    # forward sees the same bias, since the capture reads the model's output logits after the bias.
    hook = model.lm_head.register_forward_hook(lambda m, a, out: out.index_add(
        -1, torch.tensor([char_tokenizer.eos_token_id]), torch.full((*out.shape[:-1], 1), 0.5)))
    try:
        prompt_ids, completions, capture = generate(model, char_tokenizer, PROMPTS * 4, seed=1)
        lengths = {len(c) for c in completions}
        assert len(lengths) > 2 and min(lengths) < 24, lengths  # the case under test happened
        captured = capture.per_row(completions)
        assert captured is not None, capture.failure
        for p, c, lp in zip(prompt_ids * 4, completions, captured):
            assert len(lp) == len(c)
            assert torch.allclose(torch.tensor(lp), forward_logprobs(model, p, c), atol=1e-5)
    finally:
        hook.remove()


def test_a_returned_completion_that_was_not_decoded_is_refused(model, char_tokenizer):
    prompt_ids, completions, capture = generate(model, char_tokenizer, PROMPTS)
    tampered = [list(c) for c in completions]
    tampered[2][0] = (tampered[2][0] + 1) % len(char_tokenizer)
    assert capture.per_row(tampered) is None
    assert "row 2" in capture.failure


def test_a_step_feeding_several_tokens_per_row_switches_the_capture_off(model, char_tokenizer):
    _, input_ids, mask = left_padded(char_tokenizer, PROMPTS)
    with torch.no_grad(), SampledLogprobCapture(model, TEMPERATURE) as capture:
        model(input_ids=input_ids, attention_mask=mask)
        model(input_ids=input_ids[:, :3], attention_mask=mask[:, :3])  # not one token per row
    assert capture.per_row([[1, 2]] * len(PROMPTS)) is None
    assert "one new token" in capture.failure


def test_hooks_are_removed_after_the_call(model, char_tokenizer):
    before = (len(model._forward_hooks), len(model._forward_pre_hooks))
    generate(model, char_tokenizer, PROMPTS[:1])
    assert (len(model._forward_hooks), len(model._forward_pre_hooks)) == before


def test_temperature_must_be_positive(model):
    with pytest.raises(ValueError, match="temperature"):
        SampledLogprobCapture(model, 0.0)
