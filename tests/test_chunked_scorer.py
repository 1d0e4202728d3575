"""The tiled teacher head (issue 20) against materialised logits, written again here row by row."""

from __future__ import annotations

import pytest
import torch

from scope_opd.teachers.chunked_scorer import ChunkedTeacherScorer

VOCAB = 3001  # not a multiple of the vocabulary tiles below


def _tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model
    elif family == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    else:  # Cohere multiplies its logits by config.logit_scale: a forward that is more than lm_head(hidden)
        from transformers import CohereConfig as Config, CohereForCausalLM as Model
    config = Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    if family == "cohere":
        config.logit_scale = 0.5
    return Model(config).float().eval()


def _rows(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lengths = [(3, 9), (7, 4), (1, 12), (5, 1), (2, 0)]  # (prompt, completion): ragged, one empty completion
    prompts = [torch.randint(0, VOCAB, (p,), generator=generator).tolist() for p, _ in lengths]
    completions = [torch.randint(0, VOCAB, (c,), generator=generator).tolist() for _, c in lengths]
    return prompts, completions


def _logits_reference(model, prompt, completion, temperature, k):
    """Each row alone (no padding): full logits, float32 log-softmax, gather, top-k, rank."""
    with torch.no_grad():
        ids = torch.tensor([prompt + completion[:-1]])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 :].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(completion)
    token_logp = logp[torch.arange(len(completion)), target]
    ranks = (logp >= token_logp[:, None]).sum(-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    return token_logp, ranks, top_ids, top_logp


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tiled_scores_equal_materialised_logits(family, padding_side, temperature):
    model = _tiny(family)
    prompts, completions = _rows()
    scorer = ChunkedTeacherScorer(
        model, token_chunk_size=5, vocab_chunk_size=700, padding_side=padding_side, batch_size=3, temperature=temperature
    )
    scores = scorer.score_tokens(prompts, completions, top_k=6, with_ranks=True)
    plain = scorer.score(prompts, completions)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not completion:
            assert scores[row].logprobs.shape == (0,) and scores[row].top_ids.shape == (0, 6)
            continue
        token_logp, ranks, top_ids, top_logp = _logits_reference(model, prompt, completion, temperature, 6)
        torch.testing.assert_close(scores[row].logprobs, token_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain[row], token_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores[row].top_logprobs, top_logp, atol=1e-5, rtol=0)
        assert torch.equal(scores[row].top_ids, top_ids), f"row {row}"  # random logits: no ties
        assert torch.equal(scores[row].ranks, ranks), f"row {row}"


def test_whole_vocabulary_tile_and_one_token_chunks_agree_with_defaults():
    model = _tiny("qwen2", seed=2)
    prompts, completions = _rows(seed=3)
    small = ChunkedTeacherScorer(model, token_chunk_size=1, vocab_chunk_size=None).score_tokens(prompts, completions, top_k=3)
    default = ChunkedTeacherScorer(model).score_tokens(prompts, completions, top_k=3)
    for a, b in zip(small, default):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs, atol=1e-5, rtol=0)


def test_a_model_whose_forward_scales_its_logits_is_refused():
    with pytest.raises(ValueError, match="cannot reproduce CohereForCausalLM's own logits"):
        ChunkedTeacherScorer(_tiny("cohere"))


def test_a_bfloat16_teacher_passes_the_self_check_and_matches_its_logits_to_bf16_rounding():
    """Two bf16 matmuls that block differently may round a logit one bf16 step apart: not a reason to refuse."""
    model = _tiny("qwen2", seed=4).to(torch.bfloat16)
    prompts, completions = _rows(seed=5)
    scores = ChunkedTeacherScorer(model, token_chunk_size=4, vocab_chunk_size=512, batch_size=2).score(prompts, completions)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        if completion:
            token_logp = _logits_reference(model, prompt, completion, 1.0, 1)[0]
            torch.testing.assert_close(scores[row], token_logp, atol=0.05, rtol=0)


def test_bad_sizes_are_named():
    model = _tiny("qwen2")
    with pytest.raises(ValueError, match="token_chunk_size"):
        ChunkedTeacherScorer(model, token_chunk_size=0)
    with pytest.raises(ValueError, match="padding_side"):
        ChunkedTeacherScorer(model, padding_side="middle")
    with pytest.raises(ValueError, match="row 1 has token ids outside"):
        ChunkedTeacherScorer(model).score([[1], [2]], [[3], [VOCAB]])


def test_bench_topk_scorer_prints_the_side_by_side_peaks_and_the_ratio_line():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_topk_scorer.py"
    args = ["--variants", "logits,chunked", "--vocab", "3000", "--completion-tokens", "64", "--prompt-tokens", "8",
            "--hidden", "16", "--layers", "1", "--token-chunk-size", "16", "--vocab-chunk-size", "1000"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and "load average" in lines[0]
    chunked = next(line for line in lines if line.strip().startswith("chunked:"))
    # The chunked scorer's log-probs are the logits path's, to float32 rounding.
    assert float(re.search(r"max \|log-prob - logits\| (\S+)", chunked).group(1)) < 1e-5, chunked
    assert re.fullmatch(r"teacher peak memory: chunked [\d,]+ MiB vs logits [\d,]+ MiB \(\d+\.\dx less\)", lines[-1]), lines[-1]


def test_scorer_top_k_feeds_the_top_k_losses_and_k_equal_to_vocabulary_gives_the_full_kl():
    """Teacher top-k from the tiles into topk_forward_kl / topk_reverse_kl, K = V: the KL between the two models' full distributions."""
    from scope_opd.algorithms import topk_forward_kl, topk_reverse_kl

    teacher, student = _tiny("qwen2", seed=6), _tiny("llama", seed=7)
    prompt, completion = [5, 17, 2999], [4, 8, 15, 16, 23, 42]
    scores = ChunkedTeacherScorer(teacher, token_chunk_size=4, vocab_chunk_size=1000).score_tokens([prompt], [completion], top_k=VOCAB)[0]
    ids = torch.tensor([prompt + completion[:-1]])
    student_logits = student(input_ids=ids).logits[0, len(prompt) - 1 :].float()  # [C, V], requires grad
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(input_ids=ids).logits[0, len(prompt) - 1 :].float(), dim=-1)
    top_ids, top_logp = scores.top_ids[None], scores.top_logprobs[None]  # [1, C, V]
    mask = torch.ones(1, len(completion), dtype=torch.bool)
    student_at_top = student_logits[None].gather(-1, top_ids)
    forward = topk_forward_kl(student_at_top, torch.logsumexp(student_logits, -1)[None], top_logp, mask, teacher_topk_ids=top_ids)
    reverse = topk_reverse_kl(student_at_top, top_logp, mask, teacher_topk_ids=top_ids)
    student_logp = torch.log_softmax(student_logits, -1)
    full_forward = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    full_reverse = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    torch.testing.assert_close(forward[0], full_forward, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reverse[0], full_reverse, atol=1e-5, rtol=1e-5)
