"""What an evaluation problem is and where benchmark rows come from: the types and readers that the
maths registry (:mod:`.benchmarks`) and the code track (:mod:`.code_benchmarks`) share.

Below both, so that neither imports the other to get them (``benchmarks`` registers the code track's
benchmarks; ``code_benchmarks`` builds :class:`Problem` rows and reads files with :func:`read_rows`).
Training data (:mod:`scope_opd.data`) reads its files with the same :func:`read_rows`.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..verifiers.extract import last_boxed_content

__all__ = [
    "BENCHMARK_DIR_ENV",
    "MATH_INSTRUCTION",
    "BenchmarkSpec",
    "Problem",
    "ProblemSet",
    "UnavailableError",
    "normalize_math_answer",
    "read_rows",
    "reject_non_finite",
]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


BENCHMARK_DIR_ENV = "SCOPE_OPD_BENCHMARK_DIR"


class UnavailableError(RuntimeError):
    """A backend, verifier or data source this run needs is not available here."""


@dataclass(frozen=True)
class Problem:
    """One evaluation problem: ``prompt`` is the full user message (instruction included)."""

    id: str
    prompt: str
    answer: object  # the gold passed to the verifier: a string for maths, a dict of tests for code


@dataclass
class ProblemSet:
    """The problems of one benchmark plus how to score them.

    ``verifier`` is anything :func:`scope_opd.verifiers.get_verifier` accepts
    (``"math"``, ``"exact"``, ``"code"``, ``"pkg.module:function"``) or a
    ``(completion, gold) -> float`` callable.
    """

    name: str
    problems: list[Problem]
    verifier: str | Callable[[str, object], float] = "math"
    source: str = ""

    def __post_init__(self):
        if not self.problems:
            raise ValueError(f"benchmark {self.name!r} has no problems (source: {self.source or 'in memory'})")
        ids = [p.id for p in self.problems]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"benchmark {self.name!r}: problem ids must be unique, repeated: {repeated}")


def normalize_math_answer(value) -> str:
    """Gold answer as a plain LaTeX string for the math verifier.

    * lists (OlympiadBench ``final_answer``) are joined with ", " (multi-answer
      problems then compare as a tuple; single answers unwrap);
    * integral floats (``27.0``) become ``27``;
    * one surrounding ``$...$`` is removed, and a ``\\boxed{...}`` (AIME24's
      ``solution`` field holds ``\\boxed{204}``) is unwrapped to its content.
    """
    if isinstance(value, (list, tuple)):
        return ", ".join(normalize_math_answer(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    boxed = last_boxed_content(text)
    if boxed is not None:
        text = boxed.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def reject_non_finite(value, where: str, field: str) -> None:
    """A NaN or infinite gold (a float anywhere in it) is a broken row: ``float("nan")`` would become the gold "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: field {field!r} is {value!r}, not a usable gold answer")
    if isinstance(value, Mapping):
        for item in value.values():
            reject_non_finite(item, where, field)
    elif isinstance(value, (list, tuple)):
        for item in value:
            reject_non_finite(item, where, field)


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to load and score one benchmark."""

    name: str
    hf_id: str
    split: str
    prompt_field: str
    answer_field: str | None  # None: the gold is built from the whole row by ``make_gold``
    id_field: str | None = None  # None: the 0-based row index
    verifier: str = "math"
    instruction: str = MATH_INSTRUCTION
    normalize: Callable = normalize_math_answer
    make_gold: Callable[[Mapping], object] | None = None
    hf_config: str | None = None
    num_problems: int | None = None  # as published: a full load of another size logs a warning
    aliases: tuple[str, ...] = ()
    package_copy: tuple[str, str] | None = None  # (python package, file inside it)
    notes: str = ""
    # Benchmarks that select and build problems themselves (the code track, code_benchmarks.py):
    # (description, rows, limit=) -> problems; and how to read the hub when read_rows cannot.
    build_problems: Callable[..., list[Problem]] | None = None
    hub_rows: Callable[[BenchmarkSpec], tuple[str, Iterable]] | None = None


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        # utf-8-sig on the first line: a byte-order mark some editors write is not part of the JSON.
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: line {lineno}: not UTF-8 (byte {raw[err.start:err.start + 1]!r} at column {err.start + 1}); "
            "re-encode the file as UTF-8"
        ) from err


def _read_json_rows(path: Path) -> Iterable[tuple[str, Mapping]]:
    """Rows of a JSON Lines file, streamed line by line, or of a JSON array (read whole).

    Lines end at ``\n`` only: U+2028, U+0085 and the other characters ``str.splitlines``
    also breaks on are valid inside JSON strings.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.peek(64)[:64] if hasattr(fh, "peek") else b""
        if path.name.endswith(".json") and head.lstrip().lstrip(b"\xef\xbb\xbf").startswith(b"["):
            data = fh.read()
            try:
                rows = json.loads(data.decode("utf-8-sig"))
            except UnicodeDecodeError as err:
                line = data.count(b"\n", 0, err.start) + 1
                raise ValueError(f"{path}: line {line}: not UTF-8 (byte {data[err.start:err.start + 1]!r})") from err
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            except RecursionError:
                raise ValueError(f"{path}: JSON nested too deeply to read (deeper than Python's recursion limit)") from None
            for i, row in enumerate(rows):
                yield f"row {i}", row
            return
        # Binary iteration splits on b"\n" only, one line in memory at a time.
        for lineno, raw in enumerate(fh, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from err
            except RecursionError:
                raise ValueError(f"{path}: line {lineno}: JSON nested too deeply to read (deeper than Python's "
                                 "recursion limit)") from None
            yield f"line {lineno}", row


def read_rows(source: str, *, split: str = "test", hf_config: str | None = None) -> tuple[str, Iterable]:
    """(description, iterable of (location, row)) for a local file or a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.name.endswith(".parquet"):
            import datasets

            import pyarrow.parquet

            try:
                if pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0:
                    # datasets refuses a row-less file with 'Instruction "train" corresponds to no data!'.
                    return str(path), iter(())
                ds = datasets.Dataset.from_parquet(str(path))
            except pyarrow.ArrowException as err:
                raise ValueError(f"{path}: cannot read this parquet file ({err})") from err
            return str(path), ((f"row {i}", row) for i, row in enumerate(ds))
        if path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            return str(path), _read_json_rows(path)
        raise ValueError(f"{path}: unsupported file type (use .jsonl, .json, .jsonl.gz or .parquet)")
    # "org/name" is a hub id; anything that looks like a file path must exist.
    if (
        path.suffix in (".jsonl", ".json", ".parquet", ".gz")
        or str(source).startswith(("/", ".", "~"))
        or path.is_dir()
    ):
        raise FileNotFoundError(f"dataset file not found: {path}")
    import datasets

    try:
        ds = datasets.load_dataset(source, hf_config, split=split)
    except Exception as err:  # offline, unknown id, bad split: say which and how to go local
        raise UnavailableError(
            f"could not load Hugging Face dataset {source!r} (split {split!r}): {type(err).__name__}: {err}. "
            f"Offline? Save it once with datasets and pass the file (--dataset FILE / --benchmark-file), "
            f"or put <name>.jsonl files in ${BENCHMARK_DIR_ENV}."
        ) from err
    return f"{source} [{split}]", ((f"row {i}", row) for i, row in enumerate(ds))
