"""Training prompts from a local file or a hub dataset, validated row by row.

Rows need a prompt (a non-empty string, or a list of chat messages with ``role`` and
``content``) and a gold answer (string, number, or a test-case object for the code
verifier). A bad row is an error naming the file and the row, never a silently
skipped or mis-scored example.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping

from datasets import Dataset

from .evaluation.benchmarks import read_rows, reject_non_finite


def _check_prompt(value, where: str, prompt_field: str):
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {prompt_field!r} is an empty string")
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(
        f"{where}: field {prompt_field!r} must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__}"
    )


def _check_answer(value, where: str, answer_field: str) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: field {answer_field!r} must be a string, number or test-case object, got {value!r}")
    reject_non_finite(value, where, answer_field)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value)  # test cases for the code verifier, which accepts JSON text
        except TypeError as err:  # a parquet struct can hold a datetime, bytes, ...: not JSON, so not a gold
            raise ValueError(f"{where}: field {answer_field!r} holds a value that is not JSON ({err})") from None
    raise ValueError(f"{where}: field {answer_field!r} has unsupported type {type(value).__name__}")


def load_prompt_dataset(
    source: str,
    *,
    split: str = "train",
    config: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> Dataset:
    """A ``Dataset`` with columns ``prompt`` and ``answer_field`` (TRL passes the latter to the verifier)."""
    description, rows = read_rows(source, split=split, hf_config=config)
    prompts, answers = [], []
    for where, row in rows:
        location = f"{description}: {where}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{location}: expected an object with fields, got {type(row).__name__}")
        missing = [f for f in (prompt_field, answer_field) if f not in row]
        if missing:
            raise ValueError(
                f"{location}: missing field {', '.join(map(repr, missing))} "
                f"(fields present: {', '.join(map(repr, row)) or 'none'}); set prompt_field / answer_field"
            )
        null = [f for f in (prompt_field, answer_field) if row[f] is None]
        if null:
            raise ValueError(f"{location}: field {', '.join(map(repr, null))} is null")
        try:
            prompts.append(_check_prompt(row[prompt_field], location, prompt_field))
            answers.append(_check_answer(row[answer_field], location, answer_field))
        except RecursionError:
            raise ValueError(f"{location}: a field is nested too deeply to use (deeper than Python's recursion "
                             "limit)") from None
    if not prompts:
        raise ValueError(f"{description}: no training rows (empty dataset)")
    return Dataset.from_dict({"prompt": prompts, answer_field: answers})


# --- prompt length ----------------------------------------------------------------------------

MAX_NAMED_ROWS = 20  # rows a warning lists by index; the count covers them all


def _context_length(model, args) -> int | None:
    """Positions the student can attend over: its config's ``max_position_embeddings`` (or the
    older names), capped by ``vllm_max_model_length`` when vLLM generates."""
    config = getattr(model, "config", None)
    if config is None and isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model), trust_remote_code=getattr(args, "trust_remote_code", False))
    config = getattr(config, "get_text_config", lambda: config)()
    lengths = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "max_seq_len")]
    lengths = [n for n in lengths if isinstance(n, int) and n > 0][:1]
    vllm_cap = getattr(args, "vllm_max_model_length", None)
    if getattr(args, "use_vllm", False) and vllm_cap:
        lengths.append(int(vllm_cap))
    return min(lengths) if lengths else None


def _prompt_token_counts(prompts: list, tokenizer, chat_template_kwargs: dict) -> list[int]:
    # Tokenised exactly as TRL 1.16's GRPOTrainer._tokenize_prompts does for generation: plain text
    # with the tokenizer's own special tokens, chat messages through the chat template with the
    # generation prompt. TRL itself never truncates a prompt, so this count is what generation sees.
    if prompts and isinstance(prompts[0], list):
        ids = tokenizer.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
        )["input_ids"]
    else:
        ids = tokenizer(text=prompts)["input_ids"]
    return [len(row) for row in ids]


def _prompt_characters(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(m.get("content") or "") if isinstance(m, Mapping) else 0 for m in prompt)
    return 0


def _longest_token_characters(tokenizer) -> int | None:
    """Characters of the longest vocabulary entry (added tokens included); None when it cannot be read.

    No token covers more characters of text than its vocabulary string has (byte-level BPE writes each
    byte as one character, SentencePiece writes a space as one), so a prompt of more than
    ``limit * this`` characters has more than ``limit`` tokens: it is dropped without tokenizing it
    (a tokenizer takes ~400 bytes a character: a 100 MB prompt took 6 GB, then aborted).
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a readable vocabulary: every prompt is tokenized
        return None
    return max((len(token) for token in vocab), default=None) or None


def drop_overlong_prompts(dataset, *, model, processing_class, args, max_prompt_tokens: int | None = None):
    """The training rows whose prompt fits, by one rule for ``scope train`` and ``SCOPETrainer``.

    A prompt with more characters than ``limit`` times the longest vocabulary entry cannot fit
    and is dropped without being tokenized (:func:`_longest_token_characters`), so one huge row
    costs its characters, not a tokenizer's memory for them.
    A prompt fits when its token count (as TRL tokenises it for generation, chat template
    included) is at most ``limit = min(max_prompt_tokens, context - args.max_completion_length)``,
    ``context`` being the student's maximum positions (:func:`_context_length`): then a
    completion of the full allowed length still fits the model. Longer prompts are dropped
    (generation would run past the model's positions, or try to allocate attention for a
    million tokens) with one warning that counts them and names their rows (0-based rows of
    ``dataset``). Nothing fitting, or no room left for any prompt, is a ``ValueError``.

    ``model`` is a loaded model or a hub id / path (its config is read); ``processing_class``
    the student's tokenizer (None: loaded from ``model``, as TRL does). ``dataset`` None is
    returned as is; an ``IterableDataset`` is filtered lazily, warning per dropped row.
    """
    if dataset is None or "prompt" not in (getattr(dataset, "column_names", None) or ["prompt"]):
        return dataset  # no prompts to measure: TRL reports the missing column itself
    limits = {}
    if max_prompt_tokens is not None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
        limits["max_prompt_tokens"] = max_prompt_tokens
    context = _context_length(model, args)
    completion = getattr(args, "max_completion_length", None) or 0
    if context is not None:
        if context - completion < 1:
            raise ValueError(
                f"max_completion_length={completion} leaves no room for a prompt in the student's "
                f"{context} positions; lower max_completion_length"
            )
        limits[f"{context} positions - max_completion_length {completion}"] = context - completion
    if not limits:
        return dataset
    rule, limit = min(limits.items(), key=lambda item: item[1])
    tokenizer = processing_class
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = model if isinstance(model, (str, os.PathLike)) else model.config._name_or_path
        tokenizer = AutoTokenizer.from_pretrained(str(name), trust_remote_code=getattr(args, "trust_remote_code", False))
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    template_kwargs = getattr(args, "chat_template_kwargs", None) or {}
    token_characters = _longest_token_characters(tokenizer)
    max_characters = None if token_characters is None else limit * token_characters

    if not hasattr(dataset, "__len__"):  # IterableDataset: its size is unknown until iterated
        def fits(row, index):
            characters = _prompt_characters(row["prompt"])
            if max_characters is not None and characters > max_characters:
                warnings.warn(f"training row {index}: prompt of {characters} characters, so more than {limit} tokens "
                              f"({rule}); dropped without tokenizing it", stacklevel=2)
                return False
            length = _prompt_token_counts([row["prompt"]], tokenizer, template_kwargs)[0]
            if length > limit:
                warnings.warn(f"training row {index}: prompt of {length} tokens > {limit} ({rule}); dropped",
                              stacklevel=2)
            return length <= limit

        return dataset.filter(fits, with_indices=True)

    def count(batch):
        counts = [None] * len(batch["prompt"])  # None: too many characters to fit, not tokenized
        characters = [_prompt_characters(p) for p in batch["prompt"]]
        measured = [i for i, c in enumerate(characters) if max_characters is None or c <= max_characters]
        if measured:
            for i, n in zip(measured, _prompt_token_counts([batch["prompt"][i] for i in measured], tokenizer,
                                                           template_kwargs)):
                counts[i] = n
        return {"n": counts, "chars": characters}

    measured = dataset.map(count, batched=True, batch_size=256, remove_columns=dataset.column_names,
                           desc="counting prompt tokens")
    lengths, characters = measured["n"], measured["chars"]
    over = [i for i, n in enumerate(lengths) if n is None or n > limit]
    if not over:
        return dataset

    def size(i: int) -> str:
        return f"{lengths[i]} tokens" if lengths[i] is not None else f"{characters[i]} characters, not tokenized"

    if len(over) == len(lengths):
        shortest = min(range(len(lengths)), key=lambda i: (lengths[i] is None, lengths[i] or characters[i]))
        raise ValueError(
            f"every one of the {len(lengths)} training prompts is longer than {limit} tokens ({rule}); "
            f"the shortest has {size(shortest).split(',')[0]}"
        )
    named = ", ".join(f"{i} ({size(i)})" for i in over[:MAX_NAMED_ROWS])
    more = f" and {len(over) - MAX_NAMED_ROWS} more" if len(over) > MAX_NAMED_ROWS else ""
    warnings.warn(
        f"dropped {len(over)} of {len(lengths)} training prompts longer than {limit} tokens ({rule}): "
        f"rows {named}{more}",
        stacklevel=2,
    )
    drop = set(over)
    return dataset.select([i for i in range(len(lengths)) if i not in drop])


# --- TACO (the paper's code training data) ----------------------------------------------------


def load_taco_dataset(source: str, *, split: str = "train", config: str | None = None, answer_field: str = "answer"):
    """TACO rows as ``prompt`` (question + the stated instruction, see
    :mod:`scope_opd.evaluation.code_benchmarks`) and ``answer_field`` (the tests as JSON text,
    in the ``code`` verifier's format: stdin/stdout or ``fn_name`` function calls).

    A row whose tests the verifier could not use (unparsable ``input_output``, no tests,
    misaligned inputs/outputs, NaN) is dropped, never fed to the verifier: one warning counts
    them and names each by file and row (the first :data:`MAX_NAMED_ROWS`) with the reason.
    No usable row at all is a ``ValueError``.
    """
    from .evaluation.code_benchmarks import MalformedTests, taco_problem

    if config is None and not os.path.exists(os.path.expanduser(source)) and source.rstrip("/").endswith("TACO"):
        config = "ALL"  # BAAI/TACO's only configuration
    description, rows = read_rows(source, split=split, hf_config=config)
    prompts, answers, dropped = [], [], []
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{description}: {where}: expected an object with fields, got {type(row).__name__}")
        try:
            prompt, gold = taco_problem(row)
        except MalformedTests as err:
            dropped.append(f"{where} ({err})")
            continue
        prompts.append(prompt)
        answers.append(json.dumps(gold))
    total = len(prompts) + len(dropped)
    if dropped:
        more = f"; and {len(dropped) - MAX_NAMED_ROWS} more" if len(dropped) > MAX_NAMED_ROWS else ""
        warnings.warn(
            f"{description}: dropped {len(dropped)} of {total} TACO rows whose tests cannot be verified: "
            f"{'; '.join(dropped[:MAX_NAMED_ROWS])}{more}",
            stacklevel=2,
        )
    if not prompts:
        raise ValueError(f"{description}: no TACO row with usable tests (of {total} rows)")
    return Dataset.from_dict({"prompt": prompts, answer_field: answers})
