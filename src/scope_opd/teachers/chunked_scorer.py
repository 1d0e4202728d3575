"""Memory-lean in-process teacher scoring: the LM head in ``[tokens, vocab]`` tiles (issue 20).

:class:`ChunkedTeacherScorer` runs the teacher's backbone once per chunk of rows, keeps the final
hidden states of the positions that predict a completion token only (prompt and padding positions
are never projected), and sends them through the LM head one tile of ``token_chunk_size`` positions
x ``vocab_chunk_size`` vocabulary entries at a time. Per position it keeps, across the vocabulary
tiles of its token chunk:

* an online logsumexp (``logaddexp`` of each tile's logsumexp, float32);
* the sampled token's logit (read from the tile that holds it);
* the running top-k (merged with each tile's top-k), when asked;
* the token's rank (a second pass over the tiles, counting logits ``>=`` the token's), when asked.

So beyond the backbone's activations it never holds more than one tile (and the few same-sized
temporaries of one tile's logsumexp/top-k), whatever the completion length and vocabulary: with the
defaults, 512 x 32,768 float32 = 64 MiB, against ``completion tokens x V`` for materialised logits
(2 rows x 4,096 tokens x 151,936 = 4.6 GiB in float32). ``benchmarks/bench_topk_scorer.py``
measures it beside the logits path and TRL's fused head.

Unlike TRL's fused head it gives the teacher's top-k (what the ``opd_loss="topk_*"`` trainer options and vLLM's
``prompt_logprobs`` format need) and, on CPU, projects only the completion positions.

The scorer computes ``lm_head(final hidden state)`` itself, so a model whose forward does more
than that (a logit scale, a soft-cap it does not declare in ``config.final_logit_softcapping``) would
be scored wrong: at construction it computes a short sequence's logits both ways and refuses the
model if they disagree beyond the head's rounding.
"""

from __future__ import annotations

import logging

import torch

from .in_process import InProcessTeacher, TokenScores, _split_rows, _unwrap

logger = logging.getLogger(__name__)

__all__ = ["CPU_TILED_MIN_VOCAB", "ChunkedTeacherScorer", "memory_lean", "sampled_path_scorer"]

# The self-check at construction: a few token ids through the model's own forward and through the tiles;
# beyond the head's rounding, logits may differ by this fraction of the largest |logit| (at least 1).
_SELF_CHECK_TOKENS = 6
_SELF_CHECK_TOLERANCE = 1e-4


class ChunkedTeacherScorer(InProcessTeacher):
    """:class:`~scope_opd.teachers.TeacherScorer` with the LM head applied in tiles (see the module docstring).

    Same interface and row chunking as :class:`~scope_opd.teachers.InProcessTeacher` (``score`` and
    ``score_tokens`` with ``top_k`` / ``with_ranks``); only the head differs.

    Args:
        model: a `transformers` causal LM with a separate LM head (``get_output_embeddings()``) on top
            of ``base_model`` (Qwen2/3, Llama, Mistral, ...), possibly wrapped by DDP/DeepSpeed.
        token_chunk_size: completion positions per tile.
        vocab_chunk_size: vocabulary entries per tile (``None``: the whole vocabulary).
        padding_side: ``"right"`` (default) or ``"left"``: where a chunk's shorter rows are padded.
            Either way positions are counted from each row's first real token (``position_ids``
            from the attention mask), so the scores do not depend on it.
        batch_size, max_tokens_per_batch, device, temperature, synced_ranks: as
            :class:`~scope_opd.teachers.InProcessTeacher`.

    Raises:
        ValueError: bad sizes, a model without a separate LM head, or a model whose own logits the
            tiles do not reproduce (the self-check).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        token_chunk_size: int = 512,
        vocab_chunk_size: int | None = 32_768,
        padding_side: str = "right",
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        device: torch.device | str | None = None,
        temperature: float = 1.0,
        synced_ranks: bool = False,
    ) -> None:
        if token_chunk_size < 1:
            raise ValueError(f"token_chunk_size must be >= 1, got {token_chunk_size}")
        if vocab_chunk_size is not None and vocab_chunk_size < 1:
            raise ValueError(f"vocab_chunk_size must be >= 1 or None, got {vocab_chunk_size}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        super().__init__(
            model, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, device=device,
            temperature=temperature, synced_ranks=synced_ranks, fused=False,
        )
        inner = _unwrap(model)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None or getattr(inner, "base_model", inner) is inner:
            raise ValueError(
                f"ChunkedTeacherScorer needs a causal LM with a separate LM head on top of base_model; "
                f"{type(inner).__name__} has none (use InProcessTeacher)"
            )
        self.token_chunk_size = token_chunk_size
        self.vocab_chunk_size = vocab_chunk_size
        self.padding_side = padding_side
        self._backbone = inner.base_model
        self._head_weight = head.weight  # [V, H]
        self._head_bias = getattr(head, "bias", None)
        self._softcap = getattr(inner.config, "final_logit_softcapping", None)
        self._self_check()

    def __repr__(self) -> str:
        return super().__repr__().replace("InProcessTeacher(", "ChunkedTeacherScorer(", 1).replace(
            ", fused=False)", f", token_chunk_size={self.token_chunk_size}, vocab_chunk_size={self.vocab_chunk_size})"
        )

    def _self_check(self) -> None:
        """Compare the tiles' logits with the model's own on a short sequence; refuse a mismatch.

        Logits, not log-probs, are compared, with a tolerance of the head's precision: two bf16
        matmuls that block differently may round a logit one bf16 step apart (~0.8% of it), which
        is not a different model; a logit scale or an undeclared soft-cap is.
        """
        length = min(_SELF_CHECK_TOKENS, self.vocab_size)
        input_ids = torch.tensor([[(7 * i + 1) % self.vocab_size for i in range(length)]], device=self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            own = self.model(input_ids=input_ids, use_cache=False).logits[0].float()
            hidden = self._backbone(input_ids=input_ids, use_cache=False).last_hidden_state[0]
            tiled = self._head_logits(hidden, 0, self._head_weight.shape[0])
        self.model.train(was_training)
        precision = torch.finfo(self._head_weight.dtype).eps if self._head_weight.is_floating_point() else 0.0
        allowed = 2 * precision * own.abs() + _SELF_CHECK_TOLERANCE * own.abs().max().clamp(min=1.0)
        gap = (tiled - own).abs()
        if own.shape != tiled.shape or not (gap <= allowed).all():
            worst = gap.max().item() if own.shape == tiled.shape else float("nan")
            raise ValueError(
                f"ChunkedTeacherScorer cannot reproduce {type(_unwrap(self.model)).__name__}'s own logits "
                f"(max difference {worst:.3g} on a {length}-token check): its forward does more than "
                "lm_head(final hidden state); use InProcessTeacher"
            )

    def _score_chunk(self, row_numbers, rows, top_k, with_ranks, fused) -> list[TokenScores]:
        """One backbone forward over ``rows`` (padded), then the tiled head over the completion positions."""
        inputs = [prompt + completion[:-1] for prompt, completion in rows]
        width = max(len(x) for x in inputs)
        left = self.padding_side == "left"
        pads = [width - len(x) for x in inputs]
        input_ids = torch.tensor(
            [[self.pad_token_id] * p + x if left else x + [self.pad_token_id] * p for x, p in zip(inputs, pads)], dtype=torch.long
        )
        attention_mask = torch.tensor([[0] * p + [1] * (width - p) if left else [1] * (width - p) + [0] * p for p in pads])
        # Position p predicts token p + 1: the completion's targets sit at positions len(prompt)-1 ... (after the padding).
        targets_at = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, ((prompt, completion), p) in enumerate(zip(rows, pads)):
            first = (p if left else 0) + len(prompt) - 1
            targets_at[b, first : first + len(completion)] = True
        # Without explicit positions a left-padded row would start at position p, not 0.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        targets = torch.tensor([t for _, completion in rows for t in completion], dtype=torch.long)
        self._check_vocab_range(row_numbers, rows, input_ids, targets)

        hidden = self._backbone(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
        ).last_hidden_state
        # Row-major boolean indexing: the same order as `targets`. Only these [N, H] states are kept.
        completion_hidden = hidden[targets_at.to(hidden.device)]
        del hidden
        logprobs, ranks, top_ids, top_logprobs = self.tiled_scores(completion_hidden, targets, top_k, with_ranks)

        return _split_rows(rows, logprobs, ranks, top_ids, top_logprobs)

    def _head_logits(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[tokens, end - start]`` float32 logits of vocabulary entries ``start:end`` (the model's own, temperature 1)."""
        bias = None if self._head_bias is None else self._head_bias[start:end]
        logits = torch.nn.functional.linear(hidden, self._head_weight[start:end], bias).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _tile(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[tokens, end - start]`` float32 logits of vocabulary entries ``start:end``, at the temperature."""
        logits = self._head_logits(hidden, start, end)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def tiled_scores(
        self, completion_hidden: torch.Tensor, targets: torch.Tensor, top_k: int = 0, with_ranks: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Scores of ``N`` positions from their final hidden states, one tile at a time.

        Args:
            completion_hidden: ``[N, H]`` final hidden states of the positions that predict ``targets``.
            targets: ``[N]`` int64 token ids.
            top_k: how many of the most likely tokens to return per position (0: none).
            with_ranks: also return each target's rank (1 = most likely, ties count against it).

        Returns:
            CPU tensors ``(logprobs [N] float32, ranks [N] int64 or None, top_ids [N, k] int64 or None,
            top_logprobs [N, k] float32 or None)``, ``k = min(top_k, V)``.
        """
        device = completion_hidden.device
        targets = targets.to(device)
        n_targets = targets.shape[0]
        vocab = self._head_weight.shape[0]
        vocab_step = self.vocab_chunk_size or vocab
        k = min(top_k, vocab)
        logprobs = torch.empty(n_targets, dtype=torch.float32, device=device)
        ranks = torch.empty(n_targets, dtype=torch.long, device=device) if with_ranks else None
        top_ids = torch.empty(n_targets, k, dtype=torch.long, device=device) if k else None
        top_logprobs = torch.empty(n_targets, k, dtype=torch.float32, device=device) if k else None
        for first in range(0, n_targets, self.token_chunk_size):
            last = min(first + self.token_chunk_size, n_targets)
            hidden = completion_hidden[first:last]
            chunk_targets = targets[first:last]
            logsumexp = torch.full((last - first,), float("-inf"), device=device)
            target_logit = torch.empty(last - first, dtype=torch.float32, device=device)
            best_values = torch.full((last - first, k), float("-inf"), device=device) if k else None
            best_ids = torch.zeros((last - first, k), dtype=torch.long, device=device) if k else None
            for start in range(0, vocab, vocab_step):
                end = min(start + vocab_step, vocab)
                tile = self._tile(hidden, start, end)  # the only [tokens, vocab] tensor alive
                logsumexp = torch.logaddexp(logsumexp, torch.logsumexp(tile, dim=-1))
                inside = (chunk_targets >= start) & (chunk_targets < end)
                if inside.any():
                    rows = inside.nonzero()[:, 0]
                    target_logit[rows] = tile[rows, chunk_targets[rows] - start]
                if k:
                    values, ids = tile.topk(min(k, end - start), dim=-1)
                    merged_values = torch.cat([best_values, values], dim=-1)
                    merged_ids = torch.cat([best_ids, ids + start], dim=-1)
                    best_values, order = merged_values.topk(k, dim=-1)
                    best_ids = merged_ids.gather(-1, order)
                del tile
            logprobs[first:last] = target_logit - logsumexp
            if k:
                top_ids[first:last] = best_ids
                top_logprobs[first:last] = best_values - logsumexp[:, None]
            if ranks is not None:
                # A second pass: the target's logit is only known once its tile has been seen.
                count = torch.zeros(last - first, dtype=torch.long, device=device)
                for start in range(0, vocab, vocab_step):
                    end = min(start + vocab_step, vocab)
                    count += (self._tile(hidden, start, end) >= target_logit[:, None]).sum(dim=-1)
                ranks[first:last] = count
        return tuple(None if x is None else x.cpu() for x in (logprobs, ranks, top_ids, top_logprobs))


def memory_lean(teacher):
    """The teacher to ask for top-k scores: a :class:`ChunkedTeacherScorer` over ``teacher``'s model where it can serve.

    For a plain :class:`~scope_opd.teachers.InProcessTeacher` whose model has a separate LM head that
    reproduces its logits and is whole on this rank: the tiled scorer with the same batching, device and
    temperature (only completion positions projected, one ``[tokens, vocab]`` tile at a time). Otherwise
    ``teacher`` itself: a server, a chunked scorer already, a teacher sharded by ZeRO-3 / FSDP (its
    forwards are collectives and its head is split), or a model the self-check refuses (logged).
    """
    if type(teacher) is not InProcessTeacher or teacher.synced_ranks:
        return teacher
    try:
        return ChunkedTeacherScorer(
            teacher.model, batch_size=teacher.batch_size, max_tokens_per_batch=teacher.max_tokens_per_batch,
            device=teacher.device, temperature=teacher.temperature,
        )
    except ValueError as err:
        logger.warning("top-k teacher scores use the logits path: %s", err)
        return teacher


# On CPU, TRL's fused head projects every position (prompt ones too) in [positions, V] blocks, while the tiles
# project only completion positions: measured by benchmarks/bench_teacher_memory.py at V = 151,936, 2 x (64 +
# 4,096) tokens, 2,093 MiB fused against 144 MiB tiled, at about the same time (40.8 s and 41.3 s, one thread).
# Below this vocabulary the difference is a few MiB, and the fused head stays (so the toy demo's published
# numbers, V = 99, are unchanged). On CUDA, TRL's Triton kernel stays: it is what the paper-scale runs use.
CPU_TILED_MIN_VOCAB = 32_768


def sampled_path_scorer(teacher):
    """The in-process teacher for the sampled-token path (``opd_loss="sampled"``): the tiled scorer on CPU for a
    vocabulary of at least :data:`CPU_TILED_MIN_VOCAB` (where it beats TRL's fused head, see above), ``teacher``
    itself otherwise (CUDA, small vocabularies, servers, sharded teachers, a model the self-check refuses)."""
    if type(teacher) is not InProcessTeacher or teacher.device.type != "cpu":
        return teacher
    vocab = getattr(getattr(_unwrap(teacher.model), "config", None), "vocab_size", None) or 0
    if vocab < CPU_TILED_MIN_VOCAB:
        return teacher
    return memory_lean(teacher)
