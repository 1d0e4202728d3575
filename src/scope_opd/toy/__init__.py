"""The toy world of ``scope demo``: a verifiable addition task, a char tokenizer, a teacher and a student.

* :mod:`.task`: problems, solutions with written carries, ``\\boxed{}`` answers, datasets, verifier.
* :mod:`.sums`: the second task, one-digit sums written step by step in several valid orders.
* :mod:`.stats`: paired comparisons over seeds for ``scope demo``.
* :mod:`.tokenizer`: one token per character.
* :mod:`.models`: small ``Qwen2ForCausalLM`` teacher/student built by SFT and cached as HF checkpoints.
"""

from .models import ToyModelPaths, ensure_toy_models
from .task import ToyProblem, toy_dataset, toy_max_completion_chars, toy_problems, toy_solution, verify_toy_answer
from .tokenizer import build_char_tokenizer

__all__ = [
    "ToyModelPaths",
    "ToyProblem",
    "build_char_tokenizer",
    "ensure_toy_models",
    "toy_dataset",
    "toy_max_completion_chars",
    "toy_problems",
    "toy_solution",
    "verify_toy_answer",
]
