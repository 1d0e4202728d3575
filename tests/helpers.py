"""Shared test helpers that are plain functions (fixtures live in conftest.py).

Chat templates modelled on two real ones, small enough to read:

* ``CHATML_TEMPLATE``: Qwen2.5's ChatML (default system turn, ``<|im_start|>role\\n...<|im_end|>\\n``);
* ``R1_TEMPLATE``: DeepSeek-R1-Distill's (``bos_token`` first, ``<｜User｜>`` / ``<｜Assistant｜>``
  turns, the generation prompt opens ``<think>\\n``, and an assistant turn keeps only the text
  after its last ``</think>``, as the real template does).

:func:`chat_tokenizer` sets one on a copy of the character tokenizer, with the template's
markers as single special tokens; the R1 one also adds its BOS itself on every encode, as
DeepSeek-R1-Distill's Llama-style tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")

R1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_SPECIALS = (R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")


def chat_tokenizer(style: str):
    """A fresh character tokenizer with the ``"chatml"`` or ``"r1"`` template and its special tokens."""
    from tokenizers import processors

    from scope_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    if style == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_SPECIALS)})
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.chat_template = CHATML_TEMPLATE
    elif style == "r1":
        tokenizer.add_special_tokens({"additional_special_tokens": list(R1_SPECIALS)})
        tokenizer.bos_token, tokenizer.eos_token = R1_BOS, R1_EOS
        tokenizer.chat_template = R1_TEMPLATE
        bos_id = tokenizer.convert_tokens_to_ids(R1_BOS)
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B", special_tokens=[(R1_BOS, bos_id)]
        )
    else:
        raise ValueError(f"unknown chat style {style!r}: use 'chatml' or 'r1'")
    return tokenizer


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sandbox_runners(default_limits):
    """``(run, stdout_of)`` for the sandbox tests: run a dedented program in the real sandbox under ``default_limits``.

    ``run(source, inputs=("\\n",), limits=default_limits, **kwargs)`` is the :class:`ProgramRun`;
    ``stdout_of(source, **kwargs)`` is its one test's stdout, asserted ``ok``.
    """
    import textwrap

    from scope_opd.verifiers import sandbox

    def run(source: str, inputs=("\n",), limits=default_limits, **kwargs) -> sandbox.ProgramRun:
        return sandbox.run_program(textwrap.dedent(source), list(inputs), limits=limits, **kwargs)

    def stdout_of(source: str, **kwargs) -> str:
        result = run(source, **kwargs)
        assert result.tests[0].status == "ok", result
        return result.tests[0].stdout

    return run, stdout_of


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick), for a process that must be told its port (torchrun's
    --master_port): unlike a number derived from the pid, it cannot collide with another test process's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
