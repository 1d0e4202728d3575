"""Checks that a teacher can score a student's token ids (SCOPE assumes a shared tokenizer).

The teacher scores the student's *token ids* as they are, so the only hard
requirement is that every id means the same token to both models and is
inside the teacher's embedding table. What is checked, and how strictly:

* vocabularies (``get_vocab()``, added tokens included) differ -> ``ValueError``;
* bos or eos id differ -> ``ValueError`` unless ``allow_special_token_mismatch=True``,
  then a warning. Same vocabulary with other bos/eos roles is a real pairing
  (Qwen3-1.7B-Base ends with ``<|endoftext|>``, Qwen3-8B with ``<|im_end|>``,
  paper Table 3), but a chat teacher reads the student's stop token as an
  ordinary token (measured: -12.4 nats for ``<|endoftext|>`` where its own
  ``<|im_end|>`` gets -0.15), so it must be a deliberate choice, and the trainer
  then scores the student's stop token as the teacher's (:func:`stop_token_map`);
* pad id differ -> warning: padding never reaches the teacher (scorers take
  unpadded rows and build their own attention masks);
* chat template present on one side only, or different -> warning, not an
  error: the trainer formats prompts with the *student* tokenizer and the
  teacher scores those exact ids, so scoring is well defined either way; it
  often signals a wrong pair, or a teacher reading prompts in a format it was
  not tuned on, which is worth seeing in the log;
* model level (:func:`check_models_compatible`): embedding tables may be
  padded past ``len(tokenizer)`` (Qwen: 151936 vs 152064), so only a student
  that can emit an id the teacher has no row for is an error.
"""

from __future__ import annotations

import warnings

__all__ = ["TokenizerMismatchWarning", "check_models_compatible", "check_tokenizers_match", "stop_token_map"]

_EXAMPLES = 5


class TokenizerMismatchWarning(UserWarning):
    """A student/teacher difference that does not break scoring but may signal a wrong pair."""


def _vocab_differences(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> list[str]:
    """One line per token whose id differs or that only one side has, sorted by id."""
    lines = []
    for token in student_vocab.keys() | teacher_vocab.keys():
        s, t = student_vocab.get(token), teacher_vocab.get(token)
        if s != t:
            lines.append((min(x for x in (s, t) if x is not None), f"{token!r}: student id {s}, teacher id {t}"))
    return [line for _, line in sorted(lines)]


def check_tokenizers_match(
    student_tokenizer,
    teacher_tokenizer,
    student_name: str = "student",
    teacher_name: str = "teacher",
    *,
    allow_special_token_mismatch: bool = False,
) -> None:
    """Raise ``ValueError`` (naming both models) if the teacher cannot score the student's ids.

    See the module docstring for what is an error and what is a
    :class:`TokenizerMismatchWarning`.
    """
    pair = f"student {student_name!r} and teacher {teacher_name!r}"
    differences = _vocab_differences(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    if differences:
        examples = "; ".join(differences[:_EXAMPLES])
        raise ValueError(
            f"{pair} have different vocabularies ({len(differences)} tokens differ, e.g. {examples}). "
            "SCOPE scores the student's token ids with the teacher, so both must share one tokenizer."
        )

    special = {
        name: (getattr(student_tokenizer, f"{name}_token_id", None), getattr(teacher_tokenizer, f"{name}_token_id", None))
        for name in ("bos", "eos", "pad")
    }
    role_mismatches = [f"{name}_token_id {s} vs {t}" for name, (s, t) in special.items() if name != "pad" and s != t]
    if role_mismatches:
        message = f"{pair} disagree on special tokens ({'; '.join(role_mismatches)})."
        if not allow_special_token_mismatch:
            raise ValueError(
                message + " The teacher would score the student's stop/start tokens as ordinary tokens; "
                "pass allow_special_token_mismatch=True if this pairing is intended."
            )
        warnings.warn(message, TokenizerMismatchWarning, stacklevel=2)
    student_pad, teacher_pad = special["pad"]
    if student_pad != teacher_pad:
        warnings.warn(
            f"{pair} have different pad_token_id ({student_pad} vs {teacher_pad}); harmless for scoring.",
            TokenizerMismatchWarning,
            stacklevel=2,
        )

    student_template = getattr(student_tokenizer, "chat_template", None)
    teacher_template = getattr(teacher_tokenizer, "chat_template", None)
    if (student_template is None) != (teacher_template is None):
        has, lacks = (student_name, teacher_name) if student_template is not None else (teacher_name, student_name)
        warnings.warn(
            f"{pair}: only {has!r} has a chat template, {lacks!r} has none. Prompts are formatted with the "
            "student's template and the teacher scores those ids; check that this is the intended pair.",
            TokenizerMismatchWarning,
            stacklevel=2,
        )
    elif student_template != teacher_template:
        warnings.warn(
            f"{pair} have different chat templates. Prompts are formatted with the student's template, "
            "which the teacher may not have been tuned on.",
            TokenizerMismatchWarning,
            stacklevel=2,
        )


def _embedding_rows(config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def check_models_compatible(
    student_model_config, teacher_model_config, student_name: str = "student", teacher_name: str = "teacher"
) -> None:
    """Raise ``ValueError`` if the student can emit a token id the teacher has no embedding row for.

    The student samples over its whole (possibly padded) embedding table,
    ``[0, student vocab_size)``; the teacher can score ids in
    ``[0, teacher vocab_size)``. A teacher table larger than the student's is
    fine (Qwen2.5-1.5B has 151936 rows, Qwen2.5-7B 152064).
    """
    student_rows, teacher_rows = _embedding_rows(student_model_config), _embedding_rows(teacher_model_config)
    if student_rows > teacher_rows:
        raise ValueError(
            f"student {student_name!r} can emit token ids up to {student_rows - 1} (vocab_size {student_rows}) but "
            f"teacher {teacher_name!r} has only {teacher_rows} embedding rows, so it cannot score ids >= {teacher_rows}."
        )


def stop_token_map(student_tokenizer, teacher_tokenizer) -> dict[int, int]:
    """``{student eos id: teacher eos id}`` when the two stop tokens differ, else ``{}``.

    A completion that ends with the student's stop token is scored by the teacher with its own stop
    token in that last position (:class:`~scope_opd.teachers.scorer.StopTokenMappedTeacher`): the
    question the OPD term asks there is "would the teacher stop here?", which the teacher answers
    only for its own stop token. Scored as it is, the student's stop token is an ordinary, unlikely
    token to a chat teacher, and the OPD advantage on the last token of every incorrect rollout
    would teach the student not to stop.
    """
    student_eos = getattr(student_tokenizer, "eos_token_id", None)
    teacher_eos = getattr(teacher_tokenizer, "eos_token_id", None)
    if student_eos is None or teacher_eos is None or student_eos == teacher_eos:
        return {}
    return {int(student_eos): int(teacher_eos)}
