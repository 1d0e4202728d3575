"""A character-level Hugging Face tokenizer for the toy task and the tests.

Built with ``tokenizers`` and wrapped as a normal ``PreTrainedTokenizerFast`` so it
saves/loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any hub
tokenizer. One token per character keeps the toy models tiny and makes token positions
easy to reason about in tests.

Why byte-level symbols: transformers 5's ``AutoTokenizer`` loads every checkpoint whose
``config.json`` says ``model_type: qwen2`` as ``Qwen2Tokenizer``, which rebuilds a
byte-level BPE from the saved vocab and silently drops plain " " and "\\n" entries of a
char vocab. Spelling the vocab in byte-level symbols (" " -> "Ġ", "\\n" -> "Ċ") with a
byte-level pre-tokenizer and no merges makes both loaders give one token per character
with the same ids (tests/test_toy.py checks the round trip).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Printable ASCII without the other whitespace; "\n" separates reasoning steps.
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer with one id per character (specials first: pad 0, eos 1, unk 2)."""
    byte_symbol = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in characters:
        vocab.setdefault("".join(byte_symbol[b] for b in ch.encode()), len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=4096,
    )
