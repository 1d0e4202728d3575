"""The paper's code track (Table 2): TACO rows as prompts and tests, Codeforces, LiveCodeBench.

Every gold built here is what :func:`scope_opd.verifiers.code.parse_test_cases` accepts today:
``{"inputs": [...], "outputs": [...]}`` for stdin/stdout problems, plus ``"fn_name"`` for
function-call problems (a top-level function or a method of ``class Solution``, called with
each input list as its arguments). A row whose tests that parser refuses, or that holds a NaN
or infinite value, is malformed: :func:`taco_problem` raises :class:`MalformedTests` naming
why, and callers drop the row, count it and report it by file and row - it never reaches the
verifier.

**TACO** (``BAAI/TACO``, config ``ALL``; fields ``question``, ``starter_code``, ``input_output``
(JSON text), ``source``, ``url``, ...). Prompt = the question, a blank line and the instruction for how its tests run
the code (:func:`code_prompt`: stdin, or a call of the starter code's / ``fn_name``'s function).

**Codeforces** (paper: "500 TACO problems", not listed). The selection rule, applied by
:func:`select_codeforces`: TACO's *test* split (disjoint from the training split), in its row
order, rows whose ``source`` is ``codeforces`` (case-insensitive) and whose tests are well-formed
as above; the first :data:`CODEFORCES_SIZE`. The package ships the chosen problems as
``scope_opd/benchmark_data/codeforces_taco_test.json`` (ids plus a SHA-256 of each question),
written by ``scope eval --build-codeforces-list TACO_TEST`` from a local copy. Loading applies
the rule to the data and, when the list is shipped, fails unless both pick the same problems in
the same order; without the list it warns and uses the rule's pick.

**LiveCodeBench** (``livecodebench/code_generation_lite``, code generation). Problems whose
``contest_date`` lies in the paper's window, :data:`LIVECODEBENCH_WINDOW` (both ends included,
compared as datetimes like LiveCodeBench's own ``--start_date/--end_date``). Tests = public +
private. ``private_test_cases`` is either JSON text or, in the later releases, base64 of zlib
of a pickled JSON *string*; :func:`decode_private_tests` unpickles it with an unpickler that
refuses every global (no class, no function: nothing can execute) and accepts only a ``str``.
Functional tests (``testtype: functional``) call ``metadata["func_name"]`` with one JSON value
per input line (as LiveCodeBench's harness splits them); stdin tests compare standard output.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import pickle
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from .problems import BenchmarkSpec, Problem, UnavailableError

__all__ = [
    "CODEFORCES_LIST",
    "CODEFORCES_SIZE",
    "LIVECODEBENCH_WINDOW",
    "MalformedTests",
    "FUNCTION_INSTRUCTION",
    "STARTER_INSTRUCTION",
    "STDIN_INSTRUCTION",
    "build_codeforces_list",
    "codeforces_problems",
    "decode_private_tests",
    "livecodebench_problem",
    "livecodebench_problems",
    "select_codeforces",
    "taco_problem",
]

logger = logging.getLogger(__name__)

STDIN_INSTRUCTION = (
    "Write a Python 3 program that reads the input from standard input and prints the answer to standard output. "
    "Reply with the complete program in a single ```python code block."
)
STARTER_INSTRUCTION = (
    "Write a Python 3 solution that completes the starter code below, keeping its function (or class and method) "
    "names: it is called directly with the arguments, not through standard input. Reply with the complete code in a "
    "single ```python code block.\n```python\n{starter_code}\n```"
)
FUNCTION_INSTRUCTION = (  # function-call tests without starter code
    "Write a Python 3 function named `{fn_name}` (top-level, or a method of `class Solution`) that solves the problem: "
    "it is called directly with the arguments, not through standard input. Reply with the complete code in a single "
    "```python code block."
)
STDIN_STARTER_SUFFIX = "\nStart from this code:\n```python\n{starter_code}\n```"
CODEFORCES_SIZE = 500
CODEFORCES_LIST = Path(__file__).resolve().parent.parent / "benchmark_data" / "codeforces_taco_test.json"
CODEFORCES_RULE = (
    "TACO test split, row order, source == 'codeforces' (case-insensitive), tests accepted by the code verifier; "
    f"the first {CODEFORCES_SIZE}"
)
LIVECODEBENCH_WINDOW = ("2024-08-01", "2025-02-01")
# release_v1 .. release_v6 of code_generation_lite, one file each; the window is filtered by date.
LIVECODEBENCH_FILES = ["test.jsonl"] + [f"test{n}.jsonl" for n in range(2, 7)]


class MalformedTests(ValueError):
    """A row's tests cannot be verified (unparsable, none, misaligned, non-finite)."""


def _check_gold(gold: dict) -> dict:
    from ..verifiers.code import parse_test_cases
    from ..verifiers.registry import InvalidGoldError

    try:
        parse_test_cases(gold)  # exactly what the code verifier will do with it
        json.dumps(gold, allow_nan=False)
    except InvalidGoldError as err:
        raise MalformedTests(str(err)) from err
    except ValueError as err:  # NaN / inf somewhere in the tests
        raise MalformedTests(f"tests hold a non-finite number ({err})") from err
    return gold


def code_prompt(question: str, starter_code: str | None, fn_name: str | None) -> str:
    """The problem text, a blank line and the stated instruction for how the tests run the code.

    Function-call tests (``fn_name``): :data:`STARTER_INSTRUCTION` with the starter code, or
    :data:`FUNCTION_INSTRUCTION` naming the function when there is none. Stdin tests:
    :data:`STDIN_INSTRUCTION` (plus any starter code).
    """
    starter = (starter_code or "").strip("\n").rstrip()
    if fn_name:
        instruction = (STARTER_INSTRUCTION.format(starter_code=starter) if starter
                       else FUNCTION_INSTRUCTION.format(fn_name=fn_name))
    else:
        instruction = STDIN_INSTRUCTION + (STDIN_STARTER_SUFFIX.format(starter_code=starter) if starter else "")
    return f"{question.strip()}\n\n{instruction}"


def taco_problem(row: Mapping) -> tuple[str, dict]:
    """(prompt, gold tests) of one TACO row; :class:`MalformedTests` when it cannot be verified."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MalformedTests("no question text")
    raw = row.get("input_output")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise MalformedTests("no tests (input_output is empty)")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise MalformedTests(f"input_output is not valid JSON ({err})") from err
    if not isinstance(raw, Mapping):
        raise MalformedTests(f"input_output must be a JSON object, got {type(raw).__name__}")
    gold = {"inputs": raw.get("inputs"), "outputs": raw.get("outputs")}
    if raw.get("fn_name"):
        gold["fn_name"] = raw["fn_name"]
    return code_prompt(question, row.get("starter_code"), gold.get("fn_name")), _check_gold(gold)


def question_sha256(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


# --- Codeforces -------------------------------------------------------------------------------


def select_codeforces(rows: Iterable[tuple[str, Mapping]], *, size: int = CODEFORCES_SIZE) -> list[dict]:
    """The selection rule (module docstring) over TACO test rows: ``[{id, row, sha256, url, prompt, gold}]``."""
    chosen = []
    for index, (where, row) in enumerate(rows):
        if len(chosen) >= size:
            break
        if not isinstance(row, Mapping) or str(row.get("source") or "").strip().lower() != "codeforces":
            continue
        try:
            prompt, gold = taco_problem(row)
        except MalformedTests as err:
            logger.info("Codeforces rule: TACO test %s skipped: %s", where, err)
            continue
        chosen.append({"id": f"taco-test-{index}", "row": index, "sha256": question_sha256(row["question"]),
                       "url": row.get("url") or "", "prompt": prompt, "gold": gold})
    return chosen


def build_codeforces_list(
    source: str, out: str | os.PathLike = CODEFORCES_LIST, *, size: int = CODEFORCES_SIZE
) -> tuple[Path, int]:
    """Apply the rule to a local copy of TACO's test split and write the id list; returns (path, count).

    ``source``: a .jsonl/.json/.parquet file of the test split (rows in the hub's order), or a
    folder: a ``save_to_disk`` copy, or a download of the ``BAAI/TACO`` repository (``ALL/test-*.parquet``).
    """
    description, rows = _taco_test_rows(source)
    chosen = select_codeforces(rows, size=size)
    if len(chosen) < size:
        raise ValueError(
            f"{description}: the rule found only {len(chosen)} Codeforces problems with usable tests "
            f"(needs {size}); is this TACO's whole test split?"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    listing = {
        "benchmark": "Codeforces",
        "rule": CODEFORCES_RULE,
        "dataset": "BAAI/TACO",
        "split": "test",
        "built_from": str(description),
        "problems": [{"id": c["id"], "sha256": c["sha256"], "url": c["url"]} for c in chosen],
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)  # never a half-written list
    return out, len(chosen)


def _taco_test_rows(source: str):
    from .problems import read_rows

    path = Path(source).expanduser()
    if not path.is_dir():
        return read_rows(str(source), split="test", hf_config="ALL" if not path.exists() else None)
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        parquet = sorted(path.glob("ALL/test-*.parquet")) or sorted(path.glob("**/test*.parquet"))
        if not parquet:
            raise FileNotFoundError(f"{path}: neither a save_to_disk copy nor a folder with ALL/test-*.parquet")
        loaded = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["test"]
    return f"{path} [test]", ((f"row {i}", row) for i, row in enumerate(loaded))


def _shipped_codeforces_list(path: Path = CODEFORCES_LIST) -> list[dict] | None:
    if not path.is_file():
        return None
    listing = json.loads(path.read_text(encoding="utf-8"))
    return listing["problems"]


def codeforces_problems(description: str, rows: Iterable, *, limit: int | None = None,
                        listing_path: Path | None = None) -> list[Problem]:
    """The Codeforces problems of TACO's test split, checked against the shipped id list."""
    chosen = select_codeforces(rows)
    listing = _shipped_codeforces_list(listing_path or CODEFORCES_LIST)
    if listing is None:
        logger.warning(
            "%s: the Codeforces id list is not shipped in this package (%s); using the selection rule's %d problems "
            "(%s). Write the list with `scope eval --build-codeforces-list TACO_TEST`.",
            description, CODEFORCES_LIST.name, len(chosen), CODEFORCES_RULE,
        )
    else:
        picked = [c["sha256"] for c in chosen]
        listed = [p["sha256"] for p in listing]
        if picked != listed:
            first = next((i for i, (a, b) in enumerate(zip(picked, listed)) if a != b), min(len(picked), len(listed)))
            got = chosen[first]["id"] if first < len(chosen) else "nothing"
            want = listing[first]["id"] if first < len(listing) else "nothing"
            raise ValueError(
                f"{description}: the Codeforces selection rule and the shipped id list disagree: the rule picks "
                f"{len(picked)} problems, the list has {len(listed)}; first difference at position {first} "
                f"(rule: {got}, list: {want}). Is this TACO's whole, unmodified test split?"
            )
        for c, listed_problem in zip(chosen, listing):
            c["id"] = listed_problem["id"]
    if not chosen:
        raise ValueError(f"{description}: no Codeforces problems with usable tests ({CODEFORCES_RULE})")
    chosen = chosen[:limit] if limit is not None else chosen
    return [Problem(id=c["id"], prompt=c["prompt"], answer=c["gold"]) for c in chosen]


# --- LiveCodeBench ----------------------------------------------------------------------------


class _StrOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (class, function) is refused, so nothing can run."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from LiveCodeBench test data")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id in LiveCodeBench test data")


def decode_private_tests(value) -> list:
    """LiveCodeBench's ``private_test_cases``: JSON text, or base64(zlib(pickle(JSON text))).

    Raises :class:`MalformedTests` on anything else (including a pickle that is not a str).
    """
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise MalformedTests(f"private_test_cases must be text, got {type(value).__name__}")
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        packed = zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True))
        text = _StrOnlyUnpickler(io.BytesIO(packed)).load()
    except Exception as err:  # binascii/zlib errors, and whatever a corrupt pickle stream raises (not only UnpicklingError)
        raise MalformedTests(
            f"private_test_cases is neither JSON nor base64/zlib/pickle of JSON ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(text, str):
        raise MalformedTests(f"private_test_cases unpickled to {type(text).__name__}, expected a JSON string")
    try:
        return json.loads(text)
    except ValueError as err:
        raise MalformedTests(f"decoded private_test_cases is not valid JSON ({err})") from err


def _parse_date(value) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(tzinfo=None)


def livecodebench_problem(row: Mapping) -> tuple[str, dict]:
    """(prompt, gold tests) of one code_generation_lite row; :class:`MalformedTests` when unusable."""
    question = row.get("question_content")
    if not isinstance(question, str) or not question.strip():
        raise MalformedTests("no question_content")
    public = row.get("public_test_cases") or "[]"
    try:
        tests = (json.loads(public) if isinstance(public, str) else list(public))
    except ValueError as err:
        raise MalformedTests(f"public_test_cases is not valid JSON ({err})") from err
    tests = tests + decode_private_tests(row.get("private_test_cases") or "[]")
    if not tests:
        raise MalformedTests("no public or private tests")
    if not all(isinstance(t, Mapping) and {"input", "output", "testtype"} <= set(t) for t in tests):
        raise MalformedTests("a test lacks input, output or testtype")
    kinds = {t["testtype"] for t in tests}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise MalformedTests(f"tests must all be 'stdin' or all 'functional', got {sorted(map(str, kinds))}")
    if kinds == {"stdin"}:
        gold = {"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]}
    else:
        metadata = row.get("metadata") or "{}"
        try:
            metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
            fn_name = metadata["func_name"]
            # One JSON value per input line: the call's arguments, as LiveCodeBench's harness reads them.
            inputs = [[json.loads(line) for line in t["input"].rstrip("\n").split("\n")] for t in tests]
            outputs = [json.loads(t["output"]) for t in tests]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise MalformedTests(f"functional tests or metadata.func_name unusable ({type(err).__name__}: {err})") from err
        # The outputs are the return values themselves: no APPS-style one-item list unwrapping.
        gold = {"fn_name": fn_name, "inputs": inputs, "outputs": outputs, "apps_wrapped_outputs": False}
    return code_prompt(question, row.get("starter_code"), gold.get("fn_name")), _check_gold(gold)


def livecodebench_problems(description: str, rows: Iterable, *, limit: int | None = None,
                           window: tuple[str, str] = LIVECODEBENCH_WINDOW) -> list[Problem]:
    """The window's problems; a malformed row in the window is an error naming it (a benchmark never shrinks silently)."""
    start, end = (datetime.fromisoformat(day) for day in window)
    problems = []
    for where, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        if not isinstance(row, Mapping):
            raise ValueError(f"{description}: {where}: expected a JSON object, got {type(row).__name__}")
        try:
            date = _parse_date(row.get("contest_date"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{description}: {where}: contest_date {row.get('contest_date')!r} is not a date") from err
        if not start <= date <= end:
            continue
        try:
            prompt, gold = livecodebench_problem(row)
        except MalformedTests as err:
            raise ValueError(f"{description}: {where} ({row.get('question_id')}): {err}") from err
        problems.append(Problem(id=str(row.get("question_id") or where), prompt=prompt, answer=gold))
    if not problems:
        raise ValueError(f"{description}: no problems dated {window[0]} to {window[1]}")
    return problems


def livecodebench_hub_rows(spec: BenchmarkSpec):
    """code_generation_lite's release files from the hub (the repo's loading script is not run)."""
    import datasets

    files = [f"hf://datasets/{spec.hf_id}/{name}" for name in LIVECODEBENCH_FILES]
    try:
        ds = datasets.load_dataset("json", data_files=files, split="train")
    except Exception as err:
        raise UnavailableError(
            f"could not load {spec.hf_id} ({', '.join(LIVECODEBENCH_FILES)}): {type(err).__name__}: {err}. "
            "Offline? Pass --benchmark-file FILE.jsonl (the release files concatenated) or put LiveCodeBench.jsonl "
            "in $SCOPE_OPD_BENCHMARK_DIR."
        ) from err
    return f"{spec.hf_id} [{', '.join(LIVECODEBENCH_FILES)}]", ((f"row {i}", row) for i, row in enumerate(ds))

