"""The in-process teacher's fused path (TRL's add_fused_lm_head) gives the logits path's log-probs, without logits."""

from __future__ import annotations

import logging

import pytest
import torch

from scope_opd.teachers import InProcessTeacher

# Wider than TRL's 32,768-entry vocabulary tile, so the online logsumexp crosses a tile boundary.
VOCAB = 40_000
PROMPT_LENGTHS = [3, 1, 5, 2, 4]
COMPLETION_LENGTHS = [6, 9, 0, 1, 12]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wide_vocab_qwen2(seed=1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    # Random init gives near-uniform logits; scale the head so log-probs spread over several nats.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture
def rows():
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    return [draw(n) for n in PROMPT_LENGTHS], [draw(n) for n in COMPLETION_LENGTHS]


def assert_rows_equal(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for row, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == torch.float32 and a.shape == e.shape, row
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=f"row {row}")


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("batch_size", [8, 2])
def test_fused_log_probs_equal_the_logits_path_in_fp32(rows, temperature, batch_size):
    prompts, completions = rows
    logits_path = InProcessTeacher(wide_vocab_qwen2(), batch_size=batch_size, temperature=temperature, fused=False)
    fused = InProcessTeacher(wide_vocab_qwen2(), batch_size=batch_size, temperature=temperature)
    assert fused.fused and not logits_path.fused
    expected = logits_path.score(prompts, completions)
    assert_rows_equal(fused.score(prompts, completions), expected)
    # Spread enough that a wrong temperature or an off-by-one position could not pass.
    spread = torch.cat(expected)
    assert spread.max() - spread.min() > 2


def test_fused_path_never_calls_the_lm_head_and_leaves_the_plain_forward_alone(rows):
    prompts, completions = rows
    model = wide_vocab_qwen2()
    plain_before = model(torch.tensor([prompts[0]])).logits
    teacher = InProcessTeacher(model)
    head_calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: head_calls.append(tuple(output.shape)))
    try:
        teacher.score(prompts, completions)
        assert head_calls == []  # the head's weight is read tile by tile; no [tokens, V] output exists
        # Generation and any other caller that does not ask for fused_lm_head get the model's own forward.
        torch.testing.assert_close(model(torch.tensor([prompts[0]])).logits, plain_before, atol=0, rtol=0)
        assert head_calls == [(1, len(prompts[0]), VOCAB)]
    finally:
        hook.remove()


def test_a_second_teacher_at_another_temperature_takes_the_logits_path_and_both_stay_exact(rows, caplog):
    prompts, completions = rows
    model = wide_vocab_qwen2()
    at_one = InProcessTeacher(model, temperature=1.0)
    with caplog.at_level(logging.WARNING):
        at_half = InProcessTeacher(model, temperature=0.5)
    assert at_one.fused and not at_half.fused
    assert "already has a fused LM head at temperature 1" in caplog.text
    assert InProcessTeacher(model, temperature=1.0).fused  # same temperature: the installed head is reused
    reference = wide_vocab_qwen2()
    for teacher, temperature in ((at_one, 1.0), (at_half, 0.5)):
        expected = InProcessTeacher(reference, temperature=temperature, fused=False).score(prompts, completions)
        assert_rows_equal(teacher.score(prompts, completions), expected)


def test_ranks_and_top_k_use_the_logits_path_with_the_same_log_probs(rows):
    prompts, completions = rows
    teacher = InProcessTeacher(wide_vocab_qwen2(), temperature=0.8)
    with_ranks = teacher.score_tokens(prompts, completions, top_k=3, with_ranks=True)
    assert all(r.ranks is not None and r.top_ids.shape == (len(c), 3) for r, c in zip(with_ranks, completions))
    assert_rows_equal([r.logprobs for r in with_ranks], teacher.score(prompts, completions))


def test_a_module_trl_cannot_patch_is_scored_on_the_logits_path(rows):
    class Wrapped(torch.nn.Module):
        """A causal LM behind a custom module with no transformers LM-head API (remote code, adapters)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=logits_to_keep)

    prompts, completions = rows
    teacher = InProcessTeacher(Wrapped(wide_vocab_qwen2()))
    assert not teacher.fused
    expected = InProcessTeacher(wide_vocab_qwen2(), fused=False).score(prompts, completions)
    assert_rows_equal(teacher.score(prompts, completions), expected)


def test_non_finite_teacher_values_pass_through_the_fused_path_as_on_the_logits_path(rows):
    """A NaN in the head poisons every logsumexp; the trainer must see NaN (and drop the rows), never a number."""
    prompts, completions = rows
    model = wide_vocab_qwen2()
    with torch.no_grad():
        model.lm_head.weight[completions[0][2]] = float("nan")
    fused = InProcessTeacher(model).score(prompts, completions)
    logits_path = InProcessTeacher(model, fused=False).score(prompts, completions)
    for row, (a, e) in enumerate(zip(fused, logits_path)):
        assert a.numel() == 0 or torch.isnan(a).all(), row
        torch.testing.assert_close(a, e, equal_nan=True, msg=f"row {row}")
