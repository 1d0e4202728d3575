"""Training prompts from a local file or a hub dataset, validated row by row.

Rows need a prompt (a non-empty string, or a list of chat messages with ``role`` and
``content``) and a gold answer (string, number, or a test-case object for the code
verifier). A bad row is an error naming the file and the row, never a silently
skipped or mis-scored example.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from datasets import Dataset

from .evaluation.benchmarks import _read_rows


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
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)  # test cases for the code verifier, which accepts JSON text
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
    description, rows = _read_rows(source, split=split, hf_config=config)
    prompts, answers = [], []
    for where, row in rows:
        location = f"{description}: {where}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{location}: expected an object with fields, got {type(row).__name__}")
        missing = [f for f in (prompt_field, answer_field) if f not in row or row[f] is None]
        if missing:
            raise ValueError(
                f"{location}: missing field {', '.join(map(repr, missing))} "
                f"(fields present: {', '.join(map(repr, row)) or 'none'}); set prompt_field / answer_field"
            )
        prompts.append(_check_prompt(row[prompt_field], location, prompt_field))
        answers.append(_check_answer(row[answer_field], location, answer_field))
    if not prompts:
        raise ValueError(f"{description}: no training rows (empty dataset)")
    return Dataset.from_dict({"prompt": prompts, answer_field: answers})
