"""Pulling the final answer or the program out of a completion's text."""

from __future__ import annotations

import re

__all__ = ["final_answer_text", "last_boxed_content", "last_python_block"]

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
# Markers after which a final answer is conventionally written: "Answer: 42" and GSM8K's "#### 42".
_ANSWER_MARKER = re.compile(r"####|\banswer\s*:", re.IGNORECASE)
_PYTHON_BLOCK = re.compile(r"```(?:python3?|py)[^\S\n]*\n(.*?)```", re.IGNORECASE | re.DOTALL)


def _braced_group(text: str, open_index: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[open_index]``, or None if it never closes."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            # Skip the escaped character: \{ and \} do not nest, and \\ is a LaTeX line break.
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def last_boxed_content(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    A ``\\boxed`` cut off before its closing brace (a truncated completion) is not an
    answer; the last *complete* one before it is used instead. ``\\boxed 5`` (no
    braces) yields the token after the space. None when there is no box.
    """
    starts = sorted(
        (match.start(), command)
        for command in _BOXED_COMMANDS
        for match in re.finditer(re.escape(command) + r"(?![A-Za-z])", text)
    )
    for start, command in reversed(starts):
        rest_index = start + len(command)
        rest = text[rest_index:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced_group(text, rest_index + len(rest) - len(stripped))
            if content is not None:
                return content
        elif rest[:1] == " " and stripped:
            return re.split(r"[\s$]", stripped, maxsplit=1)[0]
    return None


def final_answer_text(text: str) -> str:
    """The final answer as written: last ``\\boxed{}`` content, else the line after the
    last ``answer:`` / ``####`` marker, else the whole stripped text."""
    boxed = last_boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        after = text[markers[-1].end() :].strip()
        return after.splitlines()[0].strip() if after else ""
    return text.strip()


def last_python_block(text: str) -> str:
    """Source of the last closed ```python (or ```py / ```python3) fenced block, else the whole text."""
    blocks = _PYTHON_BLOCK.findall(text)
    return blocks[-1] if blocks else text
