"""The toy teacher and student: small ``Qwen2ForCausalLM`` trained by SFT on the toy task.

Both are real ``transformers`` models sharing the char tokenizer
(:func:`scope_opd.toy.tokenizer.build_char_tokenizer`), saved as ordinary
Hugging Face checkpoints (``config.json``, ``model.safetensors``, tokenizer
files, ``generation_config.json``), so every part of the project loads them with
``AutoModelForCausalLM.from_pretrained(path)`` exactly as it loads hub models.

They are trained by supervised fine-tuning on ``prompt + toy_solution + EOS``
(loss on the completion tokens only) with a plain, seeded torch loop. The
teacher is trained until it is strong; the student is smaller and stopped
early, so that groups of 8 samples per prompt mix right and wrong answers,
which is what SCOPE's two paths need (see :data:`RECIPES` for the measured
accuracies).

:func:`ensure_toy_models` builds them once per recipe and seed into a cache
directory (``$SCOPE_OPD_CACHE`` or ``~/.cache/scope_opd``) and returns the paths.
A build is written to a temporary folder and renamed into place when complete,
so a killed build is never picked up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from .task import toy_max_completion_chars, toy_problems, toy_solution
from .tokenizer import build_char_tokenizer

__all__ = [
    "RECIPES",
    "ToyModelPaths",
    "ToyModelSpec",
    "ToyRecipe",
    "SUMS_RECIPES",
    "TASKS",
    "default_cache_dir",
    "max_completion_tokens",
    "recipe_for",
    "sft_texts",
    "build_toy_pair",
    "ensure_toy_models",
    "train_toy_model",
]

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = "recipe.json"  # written last, inside the build folder, before the rename


@dataclass(frozen=True)
class ToyModelSpec:
    """Architecture and SFT schedule of one toy model.

    The learning rate warms up linearly for ``warmup_steps``, then follows a cosine
    from ``lr`` down to ``lr * final_lr_ratio`` (1.0: constant).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01


@dataclass(frozen=True)
class ToyRecipe:
    """A teacher/student pair; ``name`` versions the cache folder, bump it when anything changes."""

    name: str
    teacher: ToyModelSpec
    student: ToyModelSpec
    digits: int = 2
    # "addition" (:mod:`.task`) or "sums" (:mod:`.sums`). For "sums": the share of each
    # strategy in a model's SFT data, and the share of the train split the student sees
    # (the teacher sees all of it: "more data and more strategies").
    task: str = "addition"
    teacher_mix: tuple[tuple[str, float], ...] = ()
    student_mix: tuple[tuple[str, float], ...] = ()
    student_data_fraction: float = 1.0
    # "sums": how many numbers a problem has (the demo's problems use sums.DEFAULT_TERMS).
    terms: int = 5


RECIPES = {
    "default": ToyRecipe(
        name="toy-v3",
        # 0.41M parameters. Measured (100 test problems, 8 samples at temperature 0.6,
        # top-p 0.95, top-k 20): 100% Avg@8 for seeds 0 and 1; ~35 s on 2 idle CPU cores.
        teacher=ToyModelSpec(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384,
            steps=400, batch_size=32, lr=3e-3, warmup_steps=20,
        ),
        # 0.08M parameters, stopped mid-way through its climb from ~1% (150 steps) to
        # ~100% (450 steps). Measured as above: seed 0 30% Avg@8 / 66% Pass@8 (63% of
        # groups mixed), seed 1 41% / 89% (86% mixed); ~9 s.
        student=ToyModelSpec(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            steps=250, batch_size=32, lr=3e-3, warmup_steps=20, final_lr_ratio=1.0,
        ),
    ),
    # For tests: loadable and deterministic, not accurate.
    "quick": ToyRecipe(
        name="toy-v3-quick",
        teacher=ToyModelSpec(
            hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
            steps=30, batch_size=16, lr=3e-3, warmup_steps=5,
        ),
        student=ToyModelSpec(
            hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
            steps=20, batch_size=16, lr=3e-3, warmup_steps=5,
        ),
    ),
}


SUMS_RECIPES = {
    "default": ToyRecipe(
        name="sums-v4",
        task="sums",
        terms=4,
        # Measured by benchmarks/calibrate_toy.py (160 test problems x 8 samples at temperature
        # 0.6, top-p 0.95, top-k 20). Teacher: 0.41M parameters, cosine to 0.1 x lr, seeds 0 / 1
        # 73% / 77% Avg@8, 98% / 99% Pass@8; 73 s to build on one thread at load average ~1.5,
        # 191 s at ~4.5 (2 cores shared with other jobs). The decay at the end is what makes it accurate: in scratch runs of the same
        # loop (128 test problems) 1100 / 1500 steps gave 69% / 92%, a constant lr at 1500 only
        # 46%. 5 numbers instead of 4 reached 70% only at 1500 steps, 1.4x the time per step.
        teacher=ToyModelSpec(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384,
            steps=1300, batch_size=32, lr=3e-3, warmup_steps=20, final_lr_ratio=0.1,
        ),
        # Student: 0.08M parameters, a quarter of the train split, 50/30/20 left/right/pairs,
        # cosine. Measured as above, seeds 0 / 1: 35% / 30% Avg@8, 92% / 88% of groups of 8
        # mixed, 10% / 8% of its correct samples in a rare strategy (right or pairs, exactly);
        # 23 s to build at load ~2.8. Rejected from the same measurements: 60/25/15 gave 5.0% /
        # 2.1% (44% / 40% Avg@8), 85/10/5 0.2% (73% Avg@8): the rare orders are hardly sampled
        # at temperature 0.6, so mechanism (a) is absent.
        student=ToyModelSpec(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            steps=600, batch_size=32, lr=3e-3, warmup_steps=20, final_lr_ratio=0.1,
        ),
        teacher_mix=(("left", 1 / 3), ("right", 1 / 3), ("pairs", 1 / 3)),
        student_mix=(("left", 0.50), ("right", 0.30), ("pairs", 0.20)),
        student_data_fraction=0.25,
    ),
    "quick": ToyRecipe(
        name="sums-v4-quick",
        task="sums",
        terms=4,
        teacher=RECIPES["quick"].teacher,
        student=RECIPES["quick"].student,
        teacher_mix=(("left", 1 / 3), ("right", 1 / 3), ("pairs", 1 / 3)),
        student_mix=(("left", 0.50), ("right", 0.30), ("pairs", 0.20)),
        student_data_fraction=0.25,
    ),
}
TASKS = ("addition", "sums")


def recipe_for(task: str = "addition", quick: bool = False) -> ToyRecipe:
    """The recipe ``ensure_toy_models`` builds for ``task``; raises ``ValueError`` naming an unknown task."""
    if task not in TASKS:
        raise ValueError(f"toy task must be one of {TASKS}, got {task!r}")
    return (RECIPES if task == "addition" else SUMS_RECIPES)["quick" if quick else "default"]


@dataclass(frozen=True)
class ToyModelPaths:
    """Checkpoint folders of one built pair."""

    teacher: Path
    student: Path


def default_cache_dir() -> Path:
    """``$SCOPE_OPD_CACHE`` if set, else ``~/.cache/scope_opd``."""
    return Path(os.environ.get("SCOPE_OPD_CACHE") or Path.home() / ".cache" / "scope_opd")


def _build_model(spec: ToyModelSpec, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def _lr_at(step: int, spec: ToyModelSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return spec.lr * (spec.final_lr_ratio + (1 - spec.final_lr_ratio) * cosine)


def train_toy_model(
    spec: ToyModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    digits: int = 2,
    progress: bool = True,
    desc: str = "toy SFT",
    texts: list[tuple[str, str]] | None = None,
) -> Qwen2ForCausalLM:
    """SFT a fresh model on train-split ``prompt + toy_solution + EOS``, loss on the completion only.

    ``texts``: (prompt, completion) pairs to train on instead (e.g. :func:`sft_texts` of the
    sums task); ``digits`` is then ignored.

    Runs on one CPU thread (restored afterwards): these matrices are too small to
    gain much from a second thread (about 2x on an idle 2-core machine), and when
    other processes share the cores, two intra-op threads waiting on each other
    were measured 10x slower than one. It also makes the weights independent of the
    machine's core count: they are deterministic given ``seed`` (init and batch
    order) for a given torch build and CPU.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(spec, tokenizer, seed=seed, digits=digits, progress=progress, desc=desc, texts=texts)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    spec: ToyModelSpec, tokenizer: PreTrainedTokenizerBase, *, seed: int, digits: int, progress: bool, desc: str,
    texts: list[tuple[str, str]] | None = None,
) -> Qwen2ForCausalLM:
    if texts is None:
        texts = [(problem.prompt, toy_solution(problem)) for problem in toy_problems("train", None, seed=0, digits=digits)]
    if not texts:
        raise ValueError("no SFT examples to train on")
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
    examples = [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompt_ids, completion_ids)]
    max_len = max(len(p) + len(c) for p, c in examples)

    with torch.random.fork_rng(devices=[]):  # seed the init without resetting the caller's RNG
        torch.manual_seed(seed)
        model = _build_model(spec, tokenizer, max_positions=max(512, 4 * max_len))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    batch_order = torch.Generator().manual_seed(seed)
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        index = torch.randint(len(examples), (spec.batch_size,), generator=batch_order).tolist()
        input_ids, labels, attention_mask = _right_padded_batch([examples[i] for i in index], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return model


def sft_texts(recipe: ToyRecipe, role: str, seed: int = 0) -> list[tuple[str, str]] | None:
    """The (prompt, completion) SFT pairs of ``role`` ("teacher" or "student") under ``recipe``.

    ``None`` for the addition task (``train_toy_model``'s own data). For the sums task each
    problem gets one strategy drawn from the role's mix (seeded by ``seed`` and the role);
    the student sees the first ``student_data_fraction`` of a seeded order of the train split.
    """
    if recipe.task == "addition":
        return None
    if recipe.task != "sums":
        raise ValueError(f"unknown toy task {recipe.task!r} in recipe {recipe.name!r}")
    import random

    from .sums import sum_problems, sum_solution

    mix = recipe.teacher_mix if role == "teacher" else recipe.student_mix
    if not mix or any(weight < 0 for _, weight in mix) or sum(w for _, w in mix) <= 0:
        raise ValueError(f"recipe {recipe.name!r}: the {role} strategy mix {mix!r} needs positive weights")
    problems = sum_problems("train", None, seed=0, terms=recipe.terms)
    if role == "student":
        problems = problems[: max(1, round(recipe.student_data_fraction * len(problems)))]
    rng = random.Random(f"scope-opd-sums-sft/{role}/{seed}")
    strategies = rng.choices([s for s, _ in mix], weights=[w for _, w in mix], k=len(problems))
    return [(p.prompt, sum_solution(p, strategy)) for p, strategy in zip(problems, strategies)]


def _right_padded_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Right padding in training; left padding at generation is equivalent because
    # RoPE attention depends only on relative positions.
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt_ids, completion_ids) in enumerate(examples):
        ids = prompt_ids + completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt_ids) : len(ids)] = torch.tensor(completion_ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask


def max_completion_tokens(recipe: ToyRecipe) -> int:
    """Tokens of the longest correct solution of ``recipe``'s task, EOS included."""
    if recipe.task == "sums":
        from .sums import sum_max_completion_chars

        return sum_max_completion_chars(recipe.terms) + 1
    return toy_max_completion_chars(recipe.digits) + 1


def _save_checkpoint(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path, recipe: ToyRecipe) -> None:
    # Sampling defaults of the paper's evaluation protocol (temperature 0.6, top-p 0.95,
    # top-k 20), like the generation_config.json of hub reasoning models.
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # The longest solution plus EOS (60 tokens for 2-digit addition), rounded up to a multiple of 8.
        max_new_tokens=-(-max_completion_tokens(recipe) // 8) * 8,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_toy_pair(recipe: ToyRecipe, root: Path, name: str, *, seed: int = 0, progress: bool = True) -> ToyModelPaths:
    """Train ``recipe``'s teacher and student into ``root / name`` (atomically) and return their paths.

    A complete folder already there is kept (another process built it first). ``recipe.json``
    in it records the recipe, the seed and each model's build time in seconds.
    """
    final = root / name
    building = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
    os.chmod(building, 0o755)  # mkdtemp's 0700 would otherwise stick to the cache folder
    if progress:
        tqdm.write(f"building the toy teacher and student ({recipe.name}, seed {seed}) into {final}", file=sys.stderr)
    try:
        tokenizer = build_char_tokenizer()
        seconds = {}
        for role in ("teacher", "student"):
            spec = getattr(recipe, role)
            start = time.perf_counter()
            model = train_toy_model(
                spec, tokenizer, seed=seed, digits=recipe.digits, progress=progress, desc=f"{recipe.name} {role} SFT",
                texts=sft_texts(recipe, role, seed),
            )
            seconds[role] = round(time.perf_counter() - start, 1)
            _save_checkpoint(model, tokenizer, building / role, recipe)
            if not progress:
                logger.info("built toy %s in %.1f s", role, seconds[role])
        info = {"recipe": asdict(recipe), "seed": seed, "torch": torch.__version__, "build_seconds": seconds}
        (building / _COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(building, final)
        except OSError:
            # Another process finished the same build first (or a stale incomplete
            # folder is in the way): keep a complete one, refuse to clobber anything else.
            if not _is_complete(final):
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return ToyModelPaths(teacher=final / "teacher", student=final / "student")


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def ensure_toy_models(
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    task: str = "addition",
) -> ToyModelPaths:
    """Return the toy teacher/student checkpoints, building them first if they are not cached.

    They live in ``<cache_dir>/<recipe name>-seed<seed>/{teacher,student}``. A build
    goes to a temporary sibling folder and is renamed into place only once complete,
    so an interrupted build is never picked up (an exception removes its folder; a
    killed process leaves a hidden ``.<name>.building-*`` folder that is ignored). ``quick``
    selects the tiny recipe for tests (seconds, not accurate); ``task`` is ``"addition"``
    or ``"sums"`` (:func:`recipe_for`).
    """
    recipe = recipe_for(task, quick)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{recipe.name}-seed{seed}"
    paths = ToyModelPaths(teacher=final / "teacher", student=final / "student")
    if _is_complete(final):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    build_toy_pair(recipe, root, final.name, seed=seed, progress=progress)
    return paths
