"""Sampling n completions per prompt: the one generation routine outside the trainer.

A shared service below its users: ``scope eval``, the KD baseline's teacher samples, the toy demo,
the error-recovery analysis and ``benchmarks/calibrate_toy.py`` all call
:func:`sample_completions` (texts) or :func:`generate_completions` (texts plus token
counts and whether each sample ended with EOS). The transformers path is the
reference; :func:`vllm_generate_completions` does the same with vLLM's offline
``LLM.generate`` when vLLM is installed.

Decisions kept in one place:

* a prompt is one of three things (:func:`encode_prompts`): a *text* prompt is an
  evaluation problem, sent as one user message through the tokenizer's chat
  template when it has one (``apply_chat_template=False`` feeds the raw text,
  with the tokenizer's usual special tokens); a *conversational* prompt (chat
  messages) and a *token-id* prompt are rendered by TRL's rule
  (:func:`scope_opd.prompts.prompt_token_ids`) or taken as they are, whatever
  ``apply_chat_template`` says. Optional token-id ``prefixes`` follow their
  prompt (the start of the answer, which the model continues and which is not
  part of the returned completion). Rows are left-padded so every row's
  generation starts at the same column;
* a sample is cut at its first EOS (the model's ``generation_config`` EOS ids and
  the tokenizer's), special tokens are stripped from the text, and a sample
  that hits ``max_new_tokens`` first is kept and flagged ``finished=False``
  (paper: a truncated solution is simply scored, usually as wrong);
* ``temperature == 0`` means greedy decoding (top-p / top-k ignored);
* randomness: the caller's global torch RNG is left untouched (``fork_rng``) and
  the output is a function of (seed, batch_size, device, dtype): the same call twice gives the
  same completions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PAPER_SAMPLING",
    "Completion",
    "SamplingSettings",
    "encode_prompts",
    "format_prompts",
    "generate_completions",
    "sample_completions",
    "vllm_generate_completions",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings; defaults are the paper's evaluation protocol (Sec. 6 of SCOPE_METHOD.md).

    ``repetition_penalty`` is 1.0 (off) by default; the paper used 1.08 for
    Qwen3-1.7B-Base only. ``max_new_tokens`` is the paper's 32768: lower it
    for quick runs.
    """

    n: int = 32
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768
    repetition_penalty: float = 1.0
    batch_size: int = 32
    seed: int = 0
    apply_chat_template: bool = True

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


PAPER_SAMPLING = SamplingSettings()


@dataclass(frozen=True)
class Completion:
    """One sampled completion: decoded text, generated tokens up to and including EOS, EOS reached.

    ``token_ids`` are the sampled ids themselves (``len(token_ids) == num_tokens``; the
    EOS id is the last one when ``finished``), so that a caller can score or train on
    exactly what was sampled instead of re-encoding ``text``.
    """

    text: str
    num_tokens: int
    finished: bool
    token_ids: tuple[int, ...] = ()


def format_prompts(tokenizer, prompts: Sequence[str], apply_chat_template: bool = True) -> list[str]:
    """Text prompts as the model sees them: one user turn through the chat template, if any."""
    if not apply_chat_template or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def encode_prompts(tokenizer, prompts: Sequence, apply_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt: text, chat messages or token ids (see the module docstring).

    A text prompt goes through the chat template as one user message when
    ``apply_chat_template`` and the tokenizer has one (tokenised by the template, which
    writes its own BOS), else it is tokenised raw with the usual special tokens.

    Raises:
        ValueError: a prompt of another type (the error gives its index).
    """
    from .prompts import prompt_token_ids

    templated = apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            message = [{"role": "user", "content": prompt}]
            encoded.append(prompt_token_ids(tokenizer, message) if templated else list(tokenizer(prompt)["input_ids"]))
        elif _is_token_ids(prompt) and len(prompt) > 0:
            encoded.append(list(prompt))
        else:
            try:
                encoded.append(prompt_token_ids(tokenizer, prompt))
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error} (token-id prompts must be non-empty lists of ints)") from None
    return encoded


def _model_inputs(tokenizer, prompts: Sequence, prefixes: Sequence | None, apply_chat_template: bool, vocab_size: int | None):
    """Prompt ids + prefix ids of each row, checked: same count, ids in the vocabulary."""
    encoded = encode_prompts(tokenizer, prompts, apply_chat_template)
    if prefixes is not None:
        if len(prefixes) != len(prompts):
            raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts; give one per prompt")
        for index, prefix in enumerate(prefixes):
            if not _is_token_ids(prefix):
                raise ValueError(f"prefix {index} must be a list of token ids (ints), got {type(prefix).__name__}")
        encoded = [ids + list(prefix) for ids, prefix in zip(encoded, prefixes)]
    for index, ids in enumerate(encoded):
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return encoded


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.extend(source if isinstance(source, (list, tuple)) else [source])
    return list(dict.fromkeys(int(i) for i in ids))


def _generation_config(settings: SamplingSettings, eos_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
        num_return_sequences=1,
        use_cache=True,  # a model prepared for training (gradient checkpointing) may have it off in its config
    )
    if settings.temperature > 0:
        # top_k <= 0 means "no top-k" (as in vLLM); transformers spells that None.
        top_k = settings.top_k if settings.top_k and settings.top_k > 0 else None
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    # Start from a blank config, not the checkpoint's: a model's generation_config.json
    # often sets its own temperature / top_p, which would silently change the protocol.
    return GenerationConfig(**kwargs)


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence,
    settings: SamplingSettings = PAPER_SAMPLING,
    *,
    prefixes: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> list[list[Completion]]:
    """``settings.n`` completions for each prompt with transformers ``generate``: ``[len(prompts)][n]``.

    ``model`` is a loaded causal LM (any device), ``tokenizer`` its tokenizer.
    ``prompts`` are texts, chat-message lists or token ids (:func:`encode_prompts`);
    ``prefixes``, one list of token ids per prompt, are appended to the prompt's ids
    and continued (the returned completion starts after the prefix).
    Sequences are batched ``settings.batch_size`` at a time (a prompt's n
    copies are consecutive), left-padded.

    Raises:
        ValueError: a prompt or prefix that is not one of those forms, a prefix count
            that differs from the prompt count, or token ids outside the vocabulary.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot batch prompts")
    eos_ids = _eos_ids(model, tokenizer)
    eos_set = set(eos_ids)
    gen_config = _generation_config(settings, eos_ids, pad_id)
    vocab_size = model.get_input_embeddings().num_embeddings
    encoded = _model_inputs(tokenizer, prompts, prefixes, settings.apply_chat_template, vocab_size)
    flat = [(p, encoded[p]) for p in range(len(prompts)) for _ in range(settings.n)]
    results: list[list[Completion]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(flat), desc=desc, unit="sample", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(settings.seed)
            for start in range(0, len(flat), settings.batch_size):
                batch = flat[start : start + settings.batch_size]
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (_, ids) in enumerate(batch):  # left padding
                    if ids:
                        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        attention[row, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config
                )
                new_tokens = output[:, width:].tolist()
                for (prompt_index, _), tokens in zip(batch, new_tokens):
                    cut = next((i for i, t in enumerate(tokens) if t in eos_set), None)
                    kept = tokens if cut is None else tokens[:cut]
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    num_tokens = len(tokens) if cut is None else cut + 1
                    results[prompt_index].append(
                        Completion(text, num_tokens, cut is not None, tuple(tokens[:num_tokens]))
                    )
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    n: int = PAPER_SAMPLING.n,
    temperature: float = PAPER_SAMPLING.temperature,
    top_p: float = PAPER_SAMPLING.top_p,
    top_k: int = PAPER_SAMPLING.top_k,
    max_new_tokens: int = PAPER_SAMPLING.max_new_tokens,
    repetition_penalty: float = PAPER_SAMPLING.repetition_penalty,
    batch_size: int = PAPER_SAMPLING.batch_size,
    seed: int = PAPER_SAMPLING.seed,
    apply_chat_template: bool = True,
    progress: bool = True,
) -> list[list[str]]:
    """``n`` completion texts for each prompt (``[len(prompts)][n]``), paper sampling defaults.

    Keyword form of :func:`generate_completions` for callers that only need the text.
    """
    settings = SamplingSettings(
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
        seed=seed,
        apply_chat_template=apply_chat_template,
    )
    return [
        [c.text for c in row] for row in generate_completions(model, tokenizer, prompts, settings, progress=progress)
    ]


def vllm_generate_completions(
    llm,
    prompts: Sequence,
    settings: SamplingSettings = PAPER_SAMPLING,
    *,
    prefixes: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
):
    """:func:`generate_completions` on a ``vllm.LLM``: same prompt encoding and prefixes, same settings.

    vLLM batches internally (``batch_size`` is unused). The prompts go in as token
    ids so a chat template's BOS is not doubled by vLLM's own tokenisation.
    """
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    encoded = _model_inputs(tokenizer, prompts, prefixes, settings.apply_chat_template, len(tokenizer))
    # vLLM refuses n > 1 with greedy decoding; n requests of one sample each give the n
    # (identical) greedy samples that the transformers path returns.
    copies = settings.n if settings.temperature == 0 else 1
    params = SamplingParams(
        n=settings.n // copies,
        temperature=settings.temperature,
        top_p=settings.top_p if settings.temperature > 0 else 1.0,
        top_k=settings.top_k if settings.top_k and settings.top_k > 0 and settings.temperature > 0 else -1,
        max_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        seed=settings.seed,
        skip_special_tokens=True,
    )
    requests = [{"prompt_token_ids": ids} for ids in encoded for _ in range(copies)]
    outputs = llm.generate(requests, params, use_tqdm=progress)
    samples = [
        Completion(o.text, len(o.token_ids), o.finish_reason == "stop", tuple(o.token_ids))
        for request in outputs
        for o in request.outputs
    ]
    return [samples[i * settings.n : (i + 1) * settings.n] for i in range(len(encoded))]
