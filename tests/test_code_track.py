"""The paper's code track: TACO training data, Codeforces and LiveCodeBench in `scope eval`, `scope train` on code."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import zlib
from pathlib import Path

import pytest
import yaml

from scope_opd.cli import main as scope_main
from scope_opd.data import load_taco_dataset
from scope_opd.evaluation import code_benchmarks
from scope_opd.evaluation.benchmarks import BENCHMARK_DIR_ENV, load_benchmark
from scope_opd.evaluation.code_benchmarks import (
    STDIN_INSTRUCTION,
    MalformedTests,
    build_codeforces_list,
    decode_private_tests,
    livecodebench_problem,
    taco_problem,
)
from helpers import read_jsonl

BENCH_DIR = Path(__file__).parent / "fixtures" / "eval" / "benchmarks"
CODEFORCES = BENCH_DIR / "Codeforces.jsonl"  # TACO test-split rows, TACO's own fields
LIVECODEBENCH = BENCH_DIR / "LiveCodeBench.jsonl"  # code_generation_lite rows, compressed private tests included


@pytest.fixture
def no_shipped_list(monkeypatch, tmp_path):
    monkeypatch.setattr(code_benchmarks, "CODEFORCES_LIST", tmp_path / "absent.json")


def taco_row(question, io, *, starter="", source="codeforces"):
    return {"question": question, "starter_code": starter, "source": source, "url": "",
            "input_output": io if isinstance(io, str) else json.dumps(io), "solutions": "[]"}


def compress(value) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(value))).decode()


# ---------------------------------------------------------------------------- TACO rows


def test_taco_rows_become_a_stated_prompt_and_the_code_verifiers_tests_in_both_styles():
    prompt, gold = taco_problem(taco_row("Print a+b.", {"inputs": ["1 2\n"], "outputs": ["3\n"]}))
    assert prompt == f"Print a+b.\n\n{STDIN_INSTRUCTION}"
    assert gold == {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    prompt, gold = taco_problem(taco_row("Double n.", {"fn_name": "double", "inputs": [[2]], "outputs": [[4]]},
                                         starter="def double(n):\n\t"))
    assert gold == {"inputs": [[2]], "outputs": [[4]], "fn_name": "double"}
    assert "called directly" in prompt and prompt.endswith("```python\ndef double(n):\n```")
    # Function-call tests without starter code: the instruction names the function, never "standard input".
    prompt, _ = taco_problem(taco_row("Double n.", {"fn_name": "double", "inputs": [[2]], "outputs": [[4]]}))
    assert "named `double`" in prompt and "reads the input" not in prompt


@pytest.mark.parametrize(
    "io, reason",
    [
        ("", "no tests"),
        ('{"inputs": ["1\\n"], "outputs": ', "not valid JSON"),
        ({"inputs": [], "outputs": []}, "no test cases"),
        ({"inputs": ["1\n", "2\n"], "outputs": ["1\n"]}, "2 test inputs but 1 expected outputs"),
        ({"inputs": "1\n", "outputs": "1\n"}, "need 'inputs' and 'outputs' lists"),
        ('{"fn_name": "f", "inputs": [[1]], "outputs": [NaN]}', "non-finite"),
        ("[1, 2]", "must be a JSON object"),
    ],
    ids=["empty", "truncated-json", "no-tests", "misaligned", "not-lists", "nan", "not-object"],
)
def test_malformed_taco_tests_are_refused_with_the_reason(io, reason):
    with pytest.raises(MalformedTests, match=re.escape(reason)):
        taco_problem(taco_row("Q", io))


def test_taco_training_loader_drops_malformed_rows_counting_and_naming_file_and_row(tmp_path):
    rows = [taco_row("Print a+b.", {"inputs": ["1 2\n"], "outputs": ["3\n"]}),
            taco_row("Broken.", '{"inputs": ['),
            taco_row("No tests.", ""),
            taco_row("Double n.", {"fn_name": "double", "inputs": [[2]], "outputs": [[4]]}, starter="def double(n):")]
    path = tmp_path / "taco.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: dropped 2 of 4 TACO rows whose tests cannot be verified: "
                                                   "line 2 (input_output is not valid JSON") + r".*; line 3 \(no tests"):
        dataset = load_taco_dataset(str(path), answer_field="tests")
    assert dataset.column_names == ["prompt", "tests"]
    assert [json.loads(t) for t in dataset["tests"]] == [
        {"inputs": ["1 2\n"], "outputs": ["3\n"]}, {"inputs": [[2]], "outputs": [[4]], "fn_name": "double"}]
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no TACO row with usable tests (of 1 rows)")):
        with pytest.warns(UserWarning):
            load_taco_dataset(str(path))


# ---------------------------------------------------------------------------- Codeforces


def test_codeforces_rule_picks_taco_test_codeforces_rows_with_tests_in_order(no_shipped_list, caplog):
    with caplog.at_level(logging.WARNING):
        problems = load_benchmark("Codeforces", file=CODEFORCES)
    # Row 1 is CodeChef, 2 has no tests, 3 unparsable tests, 4 Codewars; 5's source is spelled "Codeforces".
    assert [p.id for p in problems.problems] == ["taco-test-0", "taco-test-5"]
    assert problems.verifier == "code"
    assert problems.problems[1].answer == {"inputs": ["abc\n", "xy\n"], "outputs": ["cba\n", "yx\n"]}
    assert "id list is not shipped" in caplog.text and "the first 500" in caplog.text
    assert [p.id for p in load_benchmark("cf", file=CODEFORCES, limit=1).problems] == ["taco-test-0"]


def test_codeforces_list_is_built_from_a_local_copy_and_the_benchmark_fails_if_data_and_list_disagree(
        tmp_path, monkeypatch, capsys):
    listing = tmp_path / "codeforces.json"
    with pytest.raises(ValueError, match="the rule found only 2 Codeforces problems with usable tests \\(needs 500\\)"):
        build_codeforces_list(str(CODEFORCES), listing)
    path, count = build_codeforces_list(str(CODEFORCES), listing, size=2)
    written = json.loads(listing.read_text())
    assert count == 2 and [p["id"] for p in written["problems"]] == ["taco-test-0", "taco-test-5"]
    assert written["split"] == "test" and "codeforces" in written["rule"]
    monkeypatch.setattr(code_benchmarks, "CODEFORCES_LIST", listing)
    assert [p.id for p in load_benchmark("Codeforces", file=CODEFORCES).problems] == ["taco-test-0", "taco-test-5"]
    # Another copy whose rows differ (an edited question) is not the same benchmark.
    rows = read_jsonl(CODEFORCES)
    rows[5]["question"] += " Edited."
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"selection rule and the shipped id list disagree: .* first difference at "
                                         r"position 1 \(rule: taco-test-5, list: taco-test-5\)"):
        load_benchmark("Codeforces", file=other)
    # The CLI writes the list too (refusing here: the fixture has fewer than 500).
    assert scope_main(["eval", "--build-codeforces-list", str(CODEFORCES), "--out", str(tmp_path / "x.json")]) == 2
    assert "needs 500" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_shipped_codeforces_list_if_present_holds_500_distinct_problems():
    shipped = Path(code_benchmarks.__file__).resolve().parent.parent / "benchmark_data" / "codeforces_taco_test.json"
    if not shipped.is_file():
        pytest.skip("the Codeforces id list has not been generated yet (needs TACO: scope eval --build-codeforces-list)")
    problems = json.loads(shipped.read_text())["problems"]
    assert len(problems) == 500 and len({p["sha256"] for p in problems}) == 500


# ---------------------------------------------------------------------------- LiveCodeBench


def test_compressed_private_tests_decode_and_a_hostile_pickle_is_refused_without_running(tmp_path):
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    assert decode_private_tests(compress(json.dumps(tests))) == tests  # as LiveCodeBench stores them
    assert decode_private_tests(json.dumps(tests)) == tests  # the older, plain JSON form
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(MalformedTests, match="refusing to load global"):
        decode_private_tests(compress(Hostile()))
    assert not marker.exists()
    with pytest.raises(MalformedTests, match="unpickled to list, expected a JSON string"):
        decode_private_tests(compress(tests))
    with pytest.raises(MalformedTests, match="neither JSON nor base64/zlib/pickle"):
        decode_private_tests("not base64 at all!")


def test_livecodebench_keeps_the_papers_window_with_public_and_private_tests_in_both_styles(monkeypatch):
    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(BENCH_DIR))
    problem_set = load_benchmark("LiveCodeBench")
    assert problem_set.source == str(LIVECODEBENCH)
    # 2024-07-15 and 2025-02-08 are outside; 2025-02-01T00:00 is the window's (inclusive) end.
    assert [p.id for p in problem_set.problems] == ["3500", "abc370_a", "abc390_b"]
    functional, stdin, _ = (p.answer for p in problem_set.problems)
    assert functional == {"fn_name": "addTwo", "inputs": [[1, 2], [-5, 5], [100, 23]], "outputs": [3, 0, 123],
                          "apps_wrapped_outputs": False}
    assert stdin == {"inputs": ["3\n", "50\n"], "outputs": ["6\n", "100\n"]}
    assert "class Solution:\n    def addTwo(self, a: int, b: int) -> int:\n```" in problem_set.problems[0].prompt
    with pytest.raises(ValueError, match="builds its prompts and tests itself; --instruction cannot apply"):
        load_benchmark("LiveCodeBench", instruction="")


def test_a_malformed_livecodebench_row_in_the_window_is_an_error_naming_it(tmp_path):
    row = read_jsonl(LIVECODEBENCH)[0]
    row["private_test_cases"] = "eJzLSM3JyQcABiwCFQ=="  # zlib of "hello", not a pickle
    path = tmp_path / "lcb.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"({path}): line 1 (3500): private_test_cases is neither JSON")):
        load_benchmark("LiveCodeBench", file=path)
    row = read_jsonl(LIVECODEBENCH)[0]
    row["public_test_cases"] = json.dumps([{"input": "1\n2", "output": "3", "testtype": "stdin"}])
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="tests must all be 'stdin' or all 'functional'"):
        livecodebench_problem(row)


def test_code_benchmark_golds_score_right_and_wrong_programs_in_the_real_sandbox(monkeypatch, code_sandbox,
                                                                                 no_shipped_list):
    from scope_opd.verifiers import code_score

    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(BENCH_DIR))
    functional, stdin, _ = load_benchmark("LiveCodeBench").problems
    solution = "```python\nclass Solution:\n    def addTwo(self, a: int, b: int) -> int:\n        return a + b\n```"
    assert code_score(solution, functional.answer) == 1.0
    assert code_score(solution.replace("a + b", "a - b"), functional.answer) == 0.0
    assert code_score("```python\nprint(2 * int(input()))\n```", stdin.answer) == 1.0
    add, reverse = load_benchmark("Codeforces").problems
    assert code_score("a, b = map(int, input().split())\nprint(a + b)\n", add.answer) == 1.0
    assert code_score("print(input()[::-1])\n", reverse.answer) == 1.0
    assert code_score("print(input())\n", reverse.answer) == 0.0


def test_scope_eval_runs_codeforces_and_livecodebench_from_local_files(tiny_pair_dir, tmp_path, monkeypatch,
                                                                       code_sandbox, no_shipped_list):
    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(BENCH_DIR))
    out = tmp_path / "eval"
    assert scope_main(["eval", "--model", tiny_pair_dir["student"], "--benchmark", "Codeforces", "--benchmark",
                       "LiveCodeBench", "--n", "1", "--max-new-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert results["Codeforces"]["num_problems"] == 2 and results["LiveCodeBench"]["num_problems"] == 3
    for name in ("Codeforces", "LiveCodeBench"):
        assert results[name]["verifier"] == "code"
        stats = results[name]["verifier_stats"]
        assert stats["calls"] == results[name]["num_samples"] and stats["invalid_gold"] == 0


# ---------------------------------------------------------------------------- scope train on code


def test_scope_train_with_the_code_verifier_on_a_taco_file_through_the_sandbox(tiny_pair_dir, tmp_path, code_sandbox):
    rows = [taco_row(f"Print {a}+{b}.", {"inputs": [f"{a} {b}\n"], "outputs": [f"{a + b}\n"]})
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    rows.insert(2, taco_row("Broken.", '{"inputs": ["1\\n"]'))
    data = tmp_path / "taco_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model_name_or_path": tiny_pair_dir["student"], "teacher_model": tiny_pair_dir["teacher"],
              "dataset_name": str(data), "dataset_format": "taco", "verifier": "code", "algorithm": "scope",
              "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8, "max_steps": 1,
              "logging_steps": 1, "save_steps": 1, "report_to": [], "use_cpu": True, "bf16": False,
              "output_dir": str(tmp_path / "out"), "seed": 0}
    path = tmp_path / "code.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match=re.escape(f"{data}: dropped 1 of 5 TACO rows") + ".*line 3"):
        assert scope_main(["train", "--config", str(path)]) == 0
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    logged = state["log_history"][0]
    # 2 prompts x 4 rollouts verified in the sandbox, every gold usable.
    assert logged["verifier/calls"] == 8 and logged["verifier/invalid_gold"] == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_code_presets_are_valid_scope_train_configs():
    from trl import ModelConfig, TrlParser

    from scope_opd.train_cli import TrainScriptArguments
    from scope_opd.trainer import SCOPEConfig

    presets = sorted((Path(__file__).parent.parent / "configs" / "paper").glob("*code*.yaml"))
    assert presets, "no configs/paper/*code*.yaml"
    for preset in presets:
        config = yaml.safe_load(preset.read_text())
        assert config["verifier"] == "code" and config["dataset_format"] == "taco"
        assert config["dataset_name"] == "BAAI/TACO" and config["dataset_train_split"] == "train"
        parser = TrlParser((TrainScriptArguments, SCOPEConfig, ModelConfig))
        script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(preset), "--bf16", "false"])  # no GPU here
        assert training_args.verifier == "code" and script_args.dataset_format == "taco"
