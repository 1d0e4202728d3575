"""`scope analyze recovery`: the paper's error-recovery study (Sec. 2.2, Tables 6-7, Fig. 1b).

The rules the paper leaves open (truncation point, quartile buckets) are tested
on their own; the whole study runs end to end on the tiny random models of
`tiny_pair_dir`, which are (almost) always wrong, so every run has incorrect
solutions to study.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import read_jsonl

from scope_opd.analysis import (
    BUCKETS,
    RecoverySettings,
    TooFewIncorrectError,
    quartile_buckets,
    run_recovery_analysis,
    truncation_point,
)
from scope_opd.cli import main as scope_main
from scope_opd.evaluation import Problem, ProblemSet
from scope_opd.sampling import encode_prompts

RATIOS = ("0.2", "0.4", "0.6", "0.8")


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [
        {"id": "p1", "problem": "2+2?", "answer": "4"},
        {"id": "p2", "problem": "3*3?", "answer": "9"},
        {"id": "p3", "problem": "1/2?", "answer": "\\frac{1}{2}"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_recovery(*args: str) -> int:
    return scope_main(["analyze", "recovery", *args])


# --- the truncation rule --------------------------------------------------------------------------


def test_truncation_cuts_just_after_the_newline_nearest_to_r_times_length():
    solution = "ab\ncd\nef\ngh"  # 11 characters; cuts after each newline at 3, 6, 9
    assert truncation_point(solution, 0.2) == (3, "newline")  # target 2.2
    assert truncation_point(solution, 0.5) == (6, "newline")  # target 5.5
    assert truncation_point(solution, 0.8) == (9, "newline")  # target 8.8
    assert truncation_point(solution, 0.4) == (3, "newline")  # target 4.4: 3 is 1.4 away, 6 is 1.6
    cut, _ = truncation_point(solution, 0.5)
    assert solution[:cut] == "ab\ncd\n"  # the prefix ends with its newline: the teacher starts a new line


def test_truncation_tie_goes_to_the_shorter_prefix_and_ties_are_exact():
    # Cuts at 4 and 6 around target 5 = 0.5 * 10.
    assert truncation_point("abc\nd\nefgh", 0.5) == (4, "newline")
    # Cuts at 6 and 8 around 0.7 * 10, which is 7.000000000000001 in floats: still a tie.
    assert truncation_point("abcde\nf\nhi", 0.7) == (6, "newline")


def test_truncation_prefix_is_always_shorter_than_the_solution():
    # A trailing newline is no cut point (the "prefix" would be the whole solution).
    assert truncation_point("abc\n", 0.5) == (2, "char")
    assert truncation_point("abc\n", 0.99) == (3, "char")  # 3.96 rounds to 4, capped at 3
    assert truncation_point("ab\ncdef\n", 0.9) == (3, "newline")
    assert truncation_point("\nabc", 0.9) == (1, "newline")  # a leading newline is a cut point


def test_truncation_without_newline_cuts_at_the_nearest_character_or_skips():
    assert truncation_point("abcdefghij", 0.25) == (2, "char")  # 2.5: half rounds down
    assert truncation_point("abcdefghij", 0.36) == (4, "char")  # 3.6
    assert truncation_point("a", 0.8) == (0, "char")  # capped below the whole solution
    assert truncation_point("", 0.5) == (0, "char")
    assert truncation_point("abcdefghij", 0.5, no_newline="skip") is None
    assert truncation_point("abc\n", 0.5, no_newline="skip") is None
    with pytest.raises(ValueError, match="ratio"):
        truncation_point("abc", 1.0)


# --- quartile buckets -----------------------------------------------------------------------------


def sizes(buckets: list[int]) -> list[int]:
    return [buckets.count(b) for b in range(len(BUCKETS))]


def test_quartiles_are_equal_count_by_ascending_perplexity():
    assert quartile_buckets([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]) == [3, 0, 3, 0, 2, 1, 2, 1]


@pytest.mark.parametrize(("n", "expected"), [(4, [1, 1, 1, 1]), (5, [2, 1, 1, 1]), (6, [2, 2, 1, 1]), (7, [2, 2, 2, 1]), (9, [3, 2, 2, 2])])
def test_quartile_sizes_differ_by_at_most_one_lower_buckets_take_the_remainder(n, expected):
    buckets = quartile_buckets([float(n - i) for i in range(n)])
    assert sizes(buckets) == expected
    # Lower perplexity never lands in a higher bucket.
    values = [float(n - i) for i in range(n)]
    assert all(buckets[i] <= buckets[j] for i in range(n) for j in range(n) if values[i] < values[j])


def test_quartile_ties_are_ordered_by_position_and_keep_equal_counts():
    assert quartile_buckets([1.0] * 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    # The tie group {2, 2, 2} straddles the Q1/Q2 boundary: first by position goes lower.
    assert quartile_buckets([3.0, 1.0, 2.0, 2.0, 2.0, 5.0]) == [2, 0, 0, 1, 1, 3]
    assert quartile_buckets([math.inf, 1.0, 2.0, 3.0]) == [3, 0, 1, 2]


def test_quartiles_need_four_solutions():
    with pytest.raises(TooFewIncorrectError, match="at least 4"):
        quartile_buckets([1.0, 2.0, 3.0])


# --- continuation prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["chatml", "r1"])
def test_teacher_continues_the_students_prompt_ids_with_the_prefix_ids(style):
    """Greedy, so each continuation can be recomputed alone: it is the teacher's continuation of
    prompt ids + prefix ids, the prompt as the student saw it (R1: one BOS, not two)."""
    from helpers import chat_tokenizer

    from conftest import build_tiny_qwen2
    from scope_opd.sampling import SamplingSettings, generate_completions

    tokenizer = chat_tokenizer(style)
    student, teacher = build_tiny_qwen2(tokenizer, seed=0), build_tiny_qwen2(tokenizer, hidden_size=48, seed=1)
    problems = ProblemSet("tiny", [Problem(f"p{i}", f"{i}+{i}?", str(2 * i)) for i in range(2)], verifier="math")
    settings = RecoverySettings(samples_per_problem=2, completions_per_prefix=1, ratios=(0.5,), temperature=0.0,
                                max_new_tokens=12, batch_size=8, verifier_workers=1)
    results = run_recovery_analysis(student, teacher, tokenizer, problems, settings, progress=False)
    for record in results["solutions"]:
        prompt_ids = encode_prompts(tokenizer, [problems.problems[record["problem_index"]].prompt])[0]
        if style == "r1":
            assert prompt_ids.count(tokenizer.bos_token_id) == 1
        truncation = record["truncations"]["0.5"]
        prefix = record["solution"][: truncation["cut_chars"]]
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=12, batch_size=1)
        ((alone,),) = generate_completions(teacher, tokenizer, [prompt_ids + prefix_ids], greedy, progress=False)
        assert truncation["continuations"][0]["text"] == alone.text


# --- the whole study ------------------------------------------------------------------------------


def test_table7_study_in_process_scores_ppl_on_response_tokens_and_continues_every_prefix(tiny_pair):
    import torch

    student, teacher, tokenizer = tiny_pair
    problems = ProblemSet("tiny", [Problem(f"p{i}", f"{i}+{i}?", str(2 * i)) for i in range(2)], verifier="math")
    settings = RecoverySettings(
        samples_per_problem=3, completions_per_prefix=2, ratios=(0.3, 0.7), max_new_tokens=20, batch_size=16, verifier_workers=1
    )
    results = run_recovery_analysis(student, teacher, tokenizer, problems, settings, teacher_tokenizer=tokenizer, progress=False)

    counts = results["counts"]
    assert counts["samples"] == 6 and counts["incorrect"] == 6 - counts["correct"]
    assert counts["analysed"] == len(results["solutions"]) == sum(b["count"] for b in results["buckets"])
    assert counts["continuations"] == 2 * counts["prefixes"] == 2 * 2 * counts["analysed"]

    # Table 6: quartiles are ordered by teacher perplexity.
    ppl_ranges = [(b["min_ppl"], b["max_ppl"]) for b in results["buckets"]]
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(ppl_ranges, ppl_ranges[1:]))

    # Teacher PPL recomputed by a plain forward on the ids the student sampled: prompt excluded,
    # EOS included when the student emitted it.
    for record in results["solutions"]:
        prompt = encode_prompts(tokenizer, [problems.problems[record["problem_index"]].prompt])[0]
        completion = record["token_ids"]
        assert tokenizer.decode(completion, skip_special_tokens=True) == record["solution"]
        assert (completion[-1] == tokenizer.eos_token_id) == record["finished"]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + completion])).logits[0].double()
        logp = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert record["scored_tokens"] == len(completion)
        assert record["teacher_nll"] == pytest.approx(-logp.mean().item(), abs=1e-4)
        assert record["teacher_ppl"] == pytest.approx(math.exp(record["teacher_nll"]), rel=1e-9)

        for key, truncation in record["truncations"].items():
            cut = truncation["cut_chars"]
            assert cut < max(len(record["solution"]), 1)
            assert (truncation["cut_kind"] == "newline") == record["solution"][:cut].endswith("\n")
            assert len(truncation["continuations"]) == 2
            assert truncation["recovery"] == sum(c["correct"] for c in truncation["continuations"]) / 2

    # Table 7: each cell is the mean over its solutions; the gap is Q1 - Q4.
    for key in ("0.3", "0.7"):
        for name in BUCKETS:
            members = [s for s in results["solutions"] if s["bucket"] == name]
            cell = results["recovery"][name][key]
            assert cell["solutions"] == len(members)
            assert cell["rate"] == pytest.approx(sum(s["truncations"][key]["recovery"] for s in members) / len(members))
        gap = results["gaps"][key]["gap"]
        assert gap == pytest.approx(results["recovery"]["Q1"][key]["rate"] - results["recovery"]["Q4"][key]["rate"])

    # Same seed, same study.
    again = run_recovery_analysis(student, teacher, tokenizer, problems, settings, progress=False)
    assert [s["solution"] for s in again["solutions"]] == [s["solution"] for s in results["solutions"]]
    assert again["recovery"] == results["recovery"]


def test_scope_analyze_recovery_end_to_end_writes_json_markdown_and_plot(tiny_pair_dir, problems_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_recovery(
        "--student", tiny_pair_dir["student"], "--teacher", tiny_pair_dir["teacher"],
        "--dataset", str(problems_file), "--instruction", "",
        "--samples-per-problem", "4", "--completions-per-prefix", "2", "--max-new-tokens", "24",
        "--verifier-workers", "1", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Table 6" in printed and "Table 7" in printed and "Q1 - Q4" in printed

    results = json.loads((out / "recovery.json").read_text())
    assert {"settings", "counts", "buckets", "recovery", "gaps", "paper_reference", "timing_s", "solutions"} <= results.keys()
    assert results["settings"]["samples_per_problem"] == 4 and results["settings"]["temperature"] == 0.6
    assert results["settings"]["top_k"] == 20 and results["settings"]["top_p"] == 0.95
    assert list(results["settings"]["ratios"]) == [0.2, 0.4, 0.6, 0.8]
    assert [b["bucket"] for b in results["buckets"]] == list(BUCKETS)
    assert set(results["recovery"]) == {*BUCKETS, "all"}
    assert all(list(results["recovery"][name]) == list(RATIOS) for name in results["recovery"])
    assert list(results["gaps"]) == list(RATIOS)
    assert results["paper_reference"]["gap"]["0.8"] == pytest.approx(0.072)
    assert results["counts"]["samples"] == 12 and results["counts"]["analysed"] >= 4
    # recovery.json keeps verdicts, solutions.jsonl the texts.
    compact = results["solutions"][0]
    assert "solution" not in compact and "token_ids" not in compact and set(compact["truncations"]) == set(RATIOS)
    full = read_jsonl(out / "solutions.jsonl")
    assert len(full) == len(results["solutions"])
    assert all(len(s["token_ids"]) == s["scored_tokens"] for s in full)
    assert all("text" in c for c in full[0]["truncations"]["0.2"]["continuations"])

    report = (out / "recovery.md").read_text()
    assert "Table 6" in report and "Table 7" in report and "## Reading" in report
    assert "paper 64.9" in report and "paper 45.4" in report and "paper 7.2" in report
    assert (out / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_incorrect_solutions_is_a_clear_error_saying_how_many(tiny_pair_dir, problems_file, tmp_path, capsys):
    rc = run_recovery(
        "--student", tiny_pair_dir["student"], "--teacher", tiny_pair_dir["teacher"],
        "--dataset", str(problems_file), "--instruction", "", "--limit", "1",
        "--samples-per-problem", "3", "--max-new-tokens", "8", "--verifier-workers", "1",
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "found 3 incorrect student solutions" in err and "at least 4" in err
    assert not (tmp_path / "out").exists()


def test_student_and_teacher_must_share_a_tokenizer(tiny_pair_dir, problems_file, tmp_path, capsys):
    from conftest import build_tiny_qwen2

    from scope_opd.toy.tokenizer import build_char_tokenizer

    other_tokenizer = build_char_tokenizer("0123456789+=\n")
    other = tmp_path / "other_teacher"
    build_tiny_qwen2(other_tokenizer, hidden_size=16, layers=1).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    rc = run_recovery(
        "--student", tiny_pair_dir["student"], "--teacher", str(other), "--dataset", str(problems_file),
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "different vocabularies" in err and tiny_pair_dir["student"] in err and str(other) in err


def test_help_lists_recovery_and_its_paper_defaults(capsys):
    with pytest.raises(SystemExit):
        scope_main(["analyze", "--help"])
    assert "recovery" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scope_main(["analyze", "recovery", "--help"])
    text = capsys.readouterr().out
    for option in ("--student", "--teacher", "--dataset", "--benchmark", "--samples-per-problem", "--ratios", "--no-newline", "--seed"):
        assert option in text
    assert "0.2,0.4,0.6,0.8" in text


def test_bad_settings_are_usage_errors(tiny_pair_dir, capsys):
    with pytest.raises(SystemExit):
        run_recovery("--student", "s", "--teacher", "t", "--dataset", "toy", "--ratios", "0.2,1.0")
    assert "between 0 and 1" in capsys.readouterr().err
    rc = run_recovery("--student", tiny_pair_dir["student"], "--teacher", tiny_pair_dir["teacher"])
    assert rc == 2 and "--dataset" in capsys.readouterr().err
