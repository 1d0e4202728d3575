"""How a dataset prompt becomes the token ids a model is given: TRL's rule, in one place.

TRL's ``GRPOTrainer`` (``_tokenize_prompts`` in TRL 1.16) and ``SFTTrainer``
(``_tokenize`` for prompt-completion rows) render a prompt the same way: a
*conversational* prompt (a list of ``{"role", "content"}`` messages, as told by
``trl.data_utils.is_conversational``) goes through the tokenizer's chat template
with the generation prompt added, tokenised by ``apply_chat_template`` itself (so
the template's own BOS is not doubled); a *text* prompt is tokenised as it is,
with the tokenizer's usual special tokens. The KD baseline samples from, and
fine-tunes on, exactly these ids, so the teacher, the SFT student and the
on-policy student all see one rendering of each prompt.
"""

from __future__ import annotations

__all__ = ["prompt_token_ids"]


def prompt_token_ids(tokenizer, prompt, *, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of one dataset ``prompt`` as TRL's GRPO and SFT trainers build them.

    Args:
        tokenizer: the (student's) tokenizer.
        prompt: a string, or a list of chat messages ending with a user turn.
        chat_template_kwargs: extra template variables (``GRPOConfig.chat_template_kwargs``,
            e.g. ``{"enable_thinking": False}``), passed to the template as TRL does.

    Raises:
        ValueError: a conversational prompt and a tokenizer without a chat template,
            or a prompt that is neither text nor messages (the error names its type).
    """
    from trl.data_utils import is_conversational

    if is_conversational({"prompt": prompt}):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the prompt is a list of chat messages but the tokenizer has no chat_template; "
                "give text prompts (chat_prompt: false) or a tokenizer with a template"
            )
        rendered = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )
        return list(rendered["input_ids"])
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    raise ValueError(
        f"a prompt is a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}: {prompt!r:.80}"
    )
