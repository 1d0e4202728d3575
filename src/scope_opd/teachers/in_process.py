"""Teacher scoring with a `transformers` model held in this process.

One forward pass per chunk of rows, teacher-forced on ``prompt + completion``
(right-padded), and for each completion token ``log p_T(token)`` at the
teacher's temperature. Memory is what shapes the code. Two paths:

* **Fused** (the default for :meth:`InProcessTeacher.score`): TRL's
  ``add_fused_lm_head`` (the kernel GRPOTrainer uses for the student and the
  reference model). The backbone's hidden states go through the LM head in
  tiles of ``4,096 tokens x 32,768 vocabulary entries`` with an online
  logsumexp, so no ``[tokens, V]`` logits tensor ever exists. On CUDA/XPU
  (Triton) only the completion positions are projected; elsewhere (CPU) TRL
  projects every position of the chunk and masks the prompt ones, which costs
  compute but not memory. TRL's head also handles the model families' logit
  scales and soft-caps, FSDP2 DTensors and ZeRO-3 partitioned heads.
* **Logits** (``fused=False``, models TRL cannot patch, and
  :meth:`InProcessTeacher.score_tokens` with ranks or top-k, which TRL's
  kernel does not compute and ``scope serve-teacher`` needs for vLLM's
  ``prompt_logprobs`` format): logits are only projected for the positions
  that predict a completion token (a boolean ``logits_to_keep`` mask where the
  model supports it: models whose module uses transformers'
  ``slice_logits_to_keep``, Qwen2/3, Llama, Mistral, Gemma2... in transformers
  5.24; else the trailing positions from the shortest prompt on; else all of
  them), then the logsumexp runs in float32 over slices of
  ``logsumexp_chunk_size`` positions. Beyond the activations this holds
  ``completion tokens in the chunk x V`` logits in the model's dtype (at most
  ``max_tokens_per_batch x V``): 8 rows x 12,288 tokens x 152k in bf16 is
  ~30 GB, which is why the trainer uses the fused path.

``benchmarks/bench_teacher_memory.py`` measures both paths' peak memory side by side.

Gradients are disabled with ``torch.no_grad()``, not ``torch.inference_mode()``:
tensors created under inference mode can never be used by autograd or updated
in place outside it, and ZeRO-3/FSDP wrappers create and rewrite parameter
buffers during the forward. DeepSpeed ZeRO-3 is known to fail that way
("Inference tensors cannot be saved for backward", snowflakedb/ArcticTraining
PR #265 moved to ``no_grad``); ``no_grad`` has no such failure and the speed
difference for a forward-only pass is small.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass

import torch

__all__ = ["InProcessTeacher", "TokenScores", "load_teacher_model", "teacher_device_map"]

logger = logging.getLogger(__name__)

# float32 elements per logsumexp slice when the caller does not choose: 2**25 x 4 bytes = 128 MiB,
# i.e. ~220 positions of a 152k vocabulary.
_LOGSUMEXP_SLICE_ELEMENTS = 2**25


@dataclass
class TokenScores:
    """Teacher scores of one row's completion tokens (``C`` tokens, all on CPU).

    Attributes:
        logprobs: ``[C]`` float32 ``log p_T`` of each completion token.
        ranks: ``[C]`` int64 rank of the token in the teacher's distribution
            (1 = most likely; ties count against the token, as vLLM does), or
            ``None`` when not requested.
        top_ids: ``[C, k]`` int64 ids of the ``k`` most likely tokens, or ``None``.
        top_logprobs: ``[C, k]`` float32 log-probs of ``top_ids``, or ``None``.
    """

    logprobs: torch.Tensor
    ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model inside a DeepSpeed / DDP wrapper (both keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _logits_selection(model: torch.nn.Module) -> str:
    """How to ask ``model`` for only the logits we need: ``"mask"``, ``"trailing"`` or ``"all"``."""
    inner = _unwrap(model)
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return "all"
    # A 2-D boolean logits_to_keep is understood by transformers' shared `slice_logits_to_keep`;
    # models that do their own slicing (older or remote code) only take an int.
    module = sys.modules.get(type(inner).__module__)
    return "mask" if hasattr(module, "slice_logits_to_keep") else "trailing"


# Set on a model once TRL's fused head is installed, so a second InProcessTeacher on the same model reuses it.
_FUSED_TEMPERATURE_ATTR = "_scope_fused_lm_head_temperature"


def _install_fused_head(model: torch.nn.Module, temperature: float) -> bool:
    """Give ``model`` TRL's fused LM head at ``temperature``; ``False`` (and why, logged) where it cannot serve."""
    inner = _unwrap(model)
    if not (hasattr(inner, "get_output_embeddings") and hasattr(inner, "base_model") and hasattr(inner, "config")):
        logger.info("%s is not a transformers causal LM; teacher scoring uses the logits path", type(inner).__name__)
        return False
    head = inner.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or inner.base_model is inner:
        logger.info("%s has no separate LM head; teacher scoring uses the logits path", type(inner).__name__)
        return False
    installed = getattr(inner, _FUSED_TEMPERATURE_ATTR, None)
    if installed is not None:
        if installed == temperature:
            return True
        # The temperature is baked into the patched forward; patching again would change the scores
        # of the teacher that installed it, so this one takes the (exact, heavier) logits path.
        logger.warning(
            "%s already has a fused LM head at temperature %g; this teacher (temperature %g) uses the logits path",
            type(inner).__name__, installed, temperature,
        )
        return False
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(inner, temperature=temperature)
    setattr(inner, _FUSED_TEMPERATURE_ATTR, temperature)
    return True


class InProcessTeacher:
    """:class:`~scope_opd.teachers.TeacherScorer` over an already-loaded ``PreTrainedModel``.

    Args:
        model: a causal LM (possibly wrapped by DeepSpeed/DDP). It is put in eval
            mode at every :meth:`score` call; its parameters are not touched.
        batch_size: rows per forward pass.
        max_tokens_per_batch: cap on padded tokens (``rows x longest row``) per
            forward pass; a single row longer than the cap gets a pass of its own.
            ``None``: only ``batch_size`` limits a chunk.
        device: where input tensors are placed. Default: the device of the
            model's input embeddings (right for single-device and
            ``device_map="auto"`` models). The model itself is never moved.
        logsumexp_chunk_size: positions per float32 logsumexp slice. Default:
            as many as fit in 2**25 float32 elements (128 MiB).
        temperature: the teacher's logits are divided by it before
            normalising. 1.0 (default) is the teacher's own distribution, the
            one a vLLM server's ``prompt_logprobs`` return.
        synced_ranks: set when the teacher is sharded across ranks (ZeRO-3,
            FSDP): its forwards are collectives, so every rank runs the largest
            forward count of any rank in each :meth:`score` call, padding with
            one-token forwards, as ``generate(synced_gpus=True)`` does. Every
            rank must then call :meth:`score` the same number of times.
        fused: score with TRL's fused LM head (no ``[tokens, V]`` logits; see
            the module docstring). It patches the model's ``forward`` once
            (calls without ``fused_lm_head=True``, e.g. ``generate``, are
            unchanged). Ignored where TRL's head cannot serve (logged).

    Rows are sorted by length before chunking, so a chunk holds rows of similar
    length and little padding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        device: torch.device | str | None = None,
        logsumexp_chunk_size: int | None = None,
        temperature: float = 1.0,
        synced_ranks: bool = False,
        fused: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1 or None, got {max_tokens_per_batch}")
        if logsumexp_chunk_size is not None and logsumexp_chunk_size < 1:
            raise ValueError(f"logsumexp_chunk_size must be >= 1 or None, got {logsumexp_chunk_size}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.model = model
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.logsumexp_chunk_size = logsumexp_chunk_size
        self.temperature = float(temperature)
        self.synced_ranks = synced_ranks
        inner = _unwrap(model)
        embeddings = inner.get_input_embeddings()
        self.device = torch.device(device) if device is not None else embeddings.weight.device
        # The embedding table's row count, not len(tokenizer): Qwen pads it past the tokenizer.
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or inner.config.get_text_config().vocab_size)
        pad = getattr(inner.config, "pad_token_id", None)
        # Padding sits after every real token and is masked out, so any in-range id will do.
        self.pad_token_id = pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0
        self._logits_selection = _logits_selection(model)
        self.fused = fused and _install_fused_head(model, self.temperature)
        model.eval()

    def __repr__(self) -> str:
        return (
            f"InProcessTeacher(model={type(_unwrap(self.model)).__name__}, batch_size={self.batch_size}, "
            f"max_tokens_per_batch={self.max_tokens_per_batch}, device={str(self.device)!r}, temperature={self.temperature}, "
            f"fused={self.fused})"
        )

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per row, ``[len(completion_ids[i])]`` float32 CPU log-probs of the completion tokens.

        See :class:`~scope_opd.teachers.TeacherScorer`. Non-finite values are returned as they are.

        Raises:
            ValueError: row counts differ, a non-empty completion has an empty
                prompt (its first token has no context), or a token id is
                outside the teacher's embedding table (named by row).
        """
        return [row.logprobs for row in self.score_tokens(prompt_ids, completion_ids)]

    def score_tokens(
        self,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        *,
        top_k: int = 0,
        with_ranks: bool = False,
    ) -> list[TokenScores]:
        """Like :meth:`score`, optionally with each token's rank and the top-``k`` alternatives.

        Ranks and top-k come out of the same float32 slices as the logsumexp,
        so they cost no extra forward (the server uses them for vLLM's
        ``prompt_logprobs`` format). They need the logits path; plain
        log-probs take the fused one when it is installed.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        results: list[TokenScores | None] = [None] * len(prompt_ids)
        scored_rows = []
        for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
            if len(completion) == 0:
                results[row] = _empty_scores(top_k, with_ranks)
            elif len(prompt) == 0:
                raise ValueError(f"row {row} has a completion but an empty prompt; its first token has no context to score")
            else:
                scored_rows.append(row)

        self.model.eval()
        fused = self.fused and top_k == 0 and not with_ranks
        chunks = self._chunks(scored_rows, prompt_ids, completion_ids)
        with torch.no_grad():
            for chunk in chunks:
                rows = [(_as_ids(prompt_ids[i]), _as_ids(completion_ids[i])) for i in chunk]
                for row, scores in zip(chunk, self._score_chunk(chunk, rows, top_k, with_ranks, fused)):
                    results[row] = scores
            if self.synced_ranks:
                for _ in range(self._forwards_behind(len(chunks))):
                    pad = torch.tensor([[self.pad_token_id]], device=self.device)
                    if fused:  # the same collectives (ZeRO-3 head gather included) as the real forwards
                        self.model(input_ids=pad, shift_labels=torch.full_like(pad, -100), fused_lm_head=True)
                    else:
                        self.model(input_ids=pad, use_cache=False)
        return results  # type: ignore[return-value]

    def score_topk(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int) -> list[TokenScores]:
        """Per row, the completion tokens' log-probs and the teacher's top-``k`` ids and log-probs (``opd_loss='topk_*'``).

        :meth:`score_tokens` with ``top_k=k`` (``k`` capped by the vocabulary; every row the same width).
        Here through the logits path; :class:`~scope_opd.teachers.chunked_scorer.ChunkedTeacherScorer`
        inherits it with its tiles, and :func:`~scope_opd.teachers.chunked_scorer.memory_lean` picks that
        one for a model it can serve (what the trainer does).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        return self.score_tokens(prompt_ids, completion_ids, top_k=k)

    def _forwards_behind(self, own_forwards: int) -> int:
        """How many more forwards the busiest rank runs in this call than this one."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0
        most = torch.tensor([own_forwards], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item()) - own_forwards

    def _chunks(self, rows: list[int], prompt_ids, completion_ids) -> list[list[int]]:
        """Split ``rows`` into forward passes, longest first, within ``batch_size`` and ``max_tokens_per_batch``."""
        # The last completion token is only a target, never an input.
        input_len = {i: len(prompt_ids[i]) + len(completion_ids[i]) - 1 for i in rows}
        chunks: list[list[int]] = []
        for i in sorted(rows, key=lambda i: -input_len[i]):
            current = chunks[-1] if chunks else None
            # Sorted longest first, so a chunk's padded width is the length of its first row.
            fits = (
                current is not None
                and len(current) < self.batch_size
                and (self.max_tokens_per_batch is None or (len(current) + 1) * input_len[current[0]] <= self.max_tokens_per_batch)
            )
            if fits:
                current.append(i)
            else:
                chunks.append([i])
        return chunks

    def _score_chunk(
        self, row_numbers: list[int], rows: list[tuple[list[int], list[int]]], top_k: int, with_ranks: bool, fused: bool
    ) -> list[TokenScores]:
        """One forward over ``rows`` (right-padded), then scores of every completion token."""
        inputs = [prompt + completion[:-1] for prompt, completion in rows]
        width = max(len(x) for x in inputs)
        input_ids = torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in inputs], dtype=torch.long)
        attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], dtype=torch.long)
        # Position p predicts token p + 1: the completion's targets sit at positions len(prompt)-1 ...
        targets_at = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, (prompt, completion) in enumerate(rows):
            targets_at[b, len(prompt) - 1 : len(prompt) - 1 + len(completion)] = True
        targets = torch.tensor([t for _, completion in rows for t in completion], dtype=torch.long)
        self._check_vocab_range(row_numbers, rows, input_ids, targets)

        if fused:
            logprobs, ranks, top_ids, top_logprobs = self._fused_logprobs(input_ids, attention_mask, targets_at, targets), None, None, None
        else:
            flat_logits, flat_index = self._completion_logits(input_ids, attention_mask, targets_at, rows)
            logprobs, ranks, top_ids, top_logprobs = self._token_scores(flat_logits, flat_index, targets, top_k, with_ranks)

        return _split_rows(rows, logprobs, ranks, top_ids, top_logprobs)

    def _check_vocab_range(self, row_numbers, rows, input_ids, targets) -> None:
        # An out-of-range id is a device-side assert on CUDA (the process is lost); fail here with the row instead.
        if (
            input_ids.min() >= 0
            and input_ids.max() < self.vocab_size
            and (targets.numel() == 0 or (targets.min() >= 0 and targets.max() < self.vocab_size))
        ):
            return
        for row, (prompt, completion) in zip(row_numbers, rows):
            bad = [t for t in prompt + completion if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"row {row} has token ids outside the teacher's vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def _fused_logprobs(self, input_ids, attention_mask, targets_at, targets) -> torch.Tensor:
        """``[N]`` float32 CPU log-probs of the targets through TRL's fused head (no logits tensor)."""
        # `shift_labels` are already aligned with the inputs (position p scores token p + 1), so TRL
        # keeps every position's hidden state; -100 marks prompt and padding positions.
        shift_labels = torch.full_like(input_ids, -100)
        shift_labels[targets_at] = targets
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            shift_labels=shift_labels.to(self.device),
            fused_lm_head=True,
        )
        # Row-major boolean indexing: the same order as `targets`.
        return out.log_probs[targets_at.to(out.log_probs.device)].float().cpu()

    def _completion_logits(self, input_ids, attention_mask, targets_at, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model; return ``(flat_logits [M, V], index [N] or None)`` with row ``index[n]`` predicting target ``n``."""
        inputs = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False)
        if self._logits_selection == "mask":
            # Only the target positions are projected, in row-major order = the order of `targets`.
            logits = self.model(**inputs, logits_to_keep=targets_at.to(self.device)).logits
            if logits.dim() == 2 and logits.shape[0] == int(targets_at.sum()):
                return logits, None
            # The model's module imports slice_logits_to_keep but its forward slices some other way.
            logger.warning(
                "%s ignored a boolean logits_to_keep; using trailing positions from now on", type(_unwrap(self.model)).__name__
            )
            self._logits_selection = "trailing"
        if self._logits_selection == "trailing":
            keep = input_ids.shape[1] - (min(len(prompt) for prompt, _ in rows) - 1)
            logits = self.model(**inputs, logits_to_keep=keep).logits  # [B, keep, V]
        else:
            logits = self.model(**inputs).logits  # [B, T, V]
        batch, kept, vocab = logits.shape
        # Measured from the returned width, so a model that ignores logits_to_keep is still indexed right.
        first = input_ids.shape[1] - kept
        row, position = targets_at.nonzero(as_tuple=True)
        index = (row * kept + (position - first)).to(logits.device)
        return logits.reshape(batch * kept, vocab), index

    def _token_scores(self, flat_logits, flat_index, targets, top_k, with_ranks):
        """``logit[target] - logsumexp(logits)`` per target, float32, in slices of positions."""
        device = flat_logits.device
        targets = targets.to(device)
        n_targets, vocab = targets.shape[0], flat_logits.shape[-1]
        rows_of = (lambda s, e: flat_logits[s:e]) if flat_index is None else (lambda s, e: flat_logits[flat_index[s:e]])
        target_logit = (
            flat_logits[torch.arange(n_targets, device=device), targets]
            if flat_index is None
            else flat_logits[flat_index, targets]
        ).float() / self.temperature

        step = self.logsumexp_chunk_size or max(1, _LOGSUMEXP_SLICE_ELEMENTS // vocab)
        k = min(top_k, vocab)
        logsumexp = torch.empty(n_targets, dtype=torch.float32, device=device)
        ranks = torch.empty(n_targets, dtype=torch.long, device=device) if with_ranks else None
        top_ids = torch.empty(n_targets, k, dtype=torch.long, device=device) if k else None
        top_logprobs = torch.empty(n_targets, k, dtype=torch.float32, device=device) if k else None
        for start in range(0, n_targets, step):
            end = min(start + step, n_targets)
            slice32 = rows_of(start, end).float()  # the only float32 [positions, V] tensor alive
            if self.temperature != 1.0:
                slice32 = slice32 / self.temperature
            logsumexp[start:end] = torch.logsumexp(slice32, dim=-1)
            if ranks is not None:
                ranks[start:end] = (slice32 >= target_logit[start:end, None]).sum(dim=-1)
            if k:
                values, ids = slice32.topk(k, dim=-1)
                top_ids[start:end] = ids
                top_logprobs[start:end] = values - logsumexp[start:end, None]
            del slice32
        logprobs = target_logit - logsumexp
        return tuple(None if x is None else x.cpu() for x in (logprobs, ranks, top_ids, top_logprobs))


def _as_ids(ids) -> list[int]:
    # Callers may hand over 1-D tensors; a list of 0-d tensors would be slow to re-tensorise.
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _split_rows(
    rows: list[tuple[list[int], list[int]]],
    logprobs: torch.Tensor,
    ranks: torch.Tensor | None,
    top_ids: torch.Tensor | None,
    top_logprobs: torch.Tensor | None,
) -> list[TokenScores]:
    """Per-row :class:`TokenScores` from scores flattened row-major over every row's completion tokens."""
    out = []
    start = 0
    for _, completion in rows:
        end = start + len(completion)
        out.append(
            TokenScores(
                logprobs=logprobs[start:end],
                ranks=None if ranks is None else ranks[start:end],
                top_ids=None if top_ids is None else top_ids[start:end],
                top_logprobs=None if top_logprobs is None else top_logprobs[start:end],
            )
        )
        start = end
    return out


def _empty_scores(top_k: int, with_ranks: bool) -> TokenScores:
    return TokenScores(
        logprobs=torch.empty(0, dtype=torch.float32),
        ranks=torch.empty(0, dtype=torch.long) if with_ranks else None,
        top_ids=torch.empty(0, top_k, dtype=torch.long) if top_k else None,
        top_logprobs=torch.empty(0, top_k, dtype=torch.float32) if top_k else None,
    )


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or a torch dtype name such as 'bfloat16', 'float16', 'float32'")
    return resolved


def teacher_device_map(distributed_type) -> str | None:
    """The ``device_map`` TRL 1.16 loads its reference model with, for a run of accelerate's ``distributed_type``.

    TRL's rule (``GRPOTrainer.__init__`` and ``trl.trainer.utils.create_model_from_path``): ``None`` under
    ``MULTI_GPU`` (DDP) and ``DEEPSPEED`` (the weights load on CPU, or sharded by ``zero.Init`` under
    ZeRO-3, and the trainer's wrapper places them); otherwise ``None`` on a CPU/MPS process and ``"auto"``
    elsewhere (single GPU; FSDP, whose wrapper shards what ``"auto"`` placed, as TRL does).
    """
    from accelerate import PartialState

    if str(getattr(distributed_type, "value", distributed_type)) in ("MULTI_GPU", "DEEPSPEED"):
        return None
    return None if PartialState().device.type in ("cpu", "mps") else "auto"


def load_teacher_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    distributed_type=None,
) -> torch.nn.Module:
    """Load a frozen teacher with ``from_pretrained``, in eval mode.

    Args:
        name_or_path: a local checkpoint directory, or a hub id (needs network
            or a populated cache).
        dtype: ``"auto"`` (the checkpoint's dtype) or a torch dtype / its name
            (``"bfloat16"``, ``"float16"``, ``"float32"``).
        device: load a whole copy of the weights onto this device. Under a
            registered ZeRO-3 config (``TrainingArguments(deepspeed=...)``)
            the load runs outside ``zero.Init``, so the copy is not sharded
            (KD's sampling teacher: each process generates on its own).
        trust_remote_code: passed through; keep ``False`` unless you trust the repository.
        distributed_type: accelerate's ``DistributedType`` of a training run
            (``args.distributed_state.distributed_type``), with ``device``
            left ``None``: the teacher loads exactly as TRL 1.16 loads its
            reference model (:func:`teacher_device_map`, TRL's
            ``create_model_from_path``), so that under ZeRO-3 ``zero.Init``
            shards it while it loads, and the trainer wraps it as TRL wraps
            its reference model (``prepare_deepspeed`` / ``prepare_fsdp`` /
            ``prepare_model``).

        With neither: ``"cuda"`` when available, else ``"cpu"`` (``scope serve-teacher``, evaluation).

    Returns:
        The model in eval mode with ``requires_grad=False`` on every parameter,
        so it can never end up in an optimizer by accident.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    dtype = _resolve_dtype(dtype)
    if device is None and distributed_type is not None:
        from trl.trainer.utils import create_model_from_path

        # transformers refuses any device_map under ZeRO-3 ("DeepSpeed Zero-3 is not compatible with passing a
        # `device_map`"); TRL's rule gives None there, and zero.Init shards the weights as they load.
        model = create_model_from_path(name_or_path, dtype=dtype, device_map=teacher_device_map(distributed_type),
                                       trust_remote_code=trust_remote_code)
    else:
        from transformers import AutoModelForCausalLM

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        with _zero3_init_suspended() if is_deepspeed_zero3_enabled() else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, device_map=str(device), trust_remote_code=trust_remote_code
            )
    model.requires_grad_(False)
    return model.eval()


class _zero3_init_suspended:
    """Unregister the ZeRO-3 config for one load (a whole copy on one device), then register it again.

    transformers reads it through a module-level weak reference (set by ``HfDeepSpeedConfig``, which
    ``TrainingArguments(deepspeed=...)`` builds); while it is registered every ``from_pretrained`` runs
    under ``zero.Init`` and refuses a ``device_map``.
    """

    def __enter__(self):
        from transformers.integrations import deepspeed as hf_deepspeed

        ref = hf_deepspeed._hf_deepspeed_config_weak_ref
        self._config = ref() if ref is not None else None
        hf_deepspeed.unset_hf_deepspeed_config()
        return self

    def __exit__(self, *exc):
        from transformers.integrations import deepspeed as hf_deepspeed

        if self._config is not None:
            hf_deepspeed.set_hf_deepspeed_config(self._config)
        return False
