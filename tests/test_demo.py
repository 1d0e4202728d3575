"""`scope demo`: the comparison pipeline end to end on the quick toy models.

The quick runs share one model cache (built once per session); every run is a real demo:
real toy models, the real trainer, real evaluation, one or two real worker processes.
"""

from __future__ import annotations

import json

import pytest

from scope_opd.cli import main as scope_main

# Everything in results.json except what measures time or the machine.
_TIMING_KEYS = ("wall_seconds", "run", "timing_seconds")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


def _demo(out, cache, monkeypatch, *args):
    monkeypatch.setenv("SCOPE_OPD_CACHE", str(cache))
    assert scope_main(["demo", "--quick", "--out", str(out), *args]) == 0
    return json.loads((out / "results.json").read_text())


def _numbers(results: dict) -> dict:
    return {key: value for key, value in results.items() if key not in _TIMING_KEYS}


def test_quick_sums_demo_in_two_workers_writes_every_field_and_matches_one_worker(tmp_path, cache, monkeypatch,
                                                                                  capsys):
    args = ("--seeds", "2", "--steps", "2")
    two = _demo(tmp_path / "two", cache, monkeypatch, *args, "--workers", "2")
    log = capsys.readouterr().out
    one = _demo(tmp_path / "one", cache, monkeypatch, *args, "--workers", "1")

    # The default task is sums, every method ran on both seeds, paired.
    assert two["task"] == "sums" and two["seeds"] == [0, 1] and two["run"]["workers"] == 2
    assert set(two["methods"]) == {"base", "scope", "opd", "grpo", "kd"}
    for name, entry in two["methods"].items():
        assert 0.0 <= entry["avg"] <= 1.0 and 0.0 <= entry["pass"] <= 1.0, name
        assert entry["pass"] >= entry["avg"] - 1e-9, name  # Pass@k >= Avg@k
        assert len(entry["seeds"]) == 2, name
        curve = [entry["pass_at_k"][str(k)] for k in range(1, two["k"] + 1)]
        assert curve == sorted(curve), name  # Pass@k is non-decreasing in k
    for name in ("scope-opd", "opd-grpo", "opd-kd"):
        comparison = two["comparisons"][name]
        a, b = name.split("-")
        per_seed = [x["avg"] - y["avg"] for x, y in zip(two["methods"][a]["seeds"], two["methods"][b]["seeds"])]
        assert comparison["avg_diffs"] == per_seed and comparison["n"] == 2
        assert comparison["ci95"][0] <= comparison["avg_diff"] <= comparison["ci95"][1]
        assert comparison["pass_ci95"][0] <= comparison["pass_diff"] <= comparison["pass_ci95"][1]
    assert [c["claim"] for c in two["ordering"]["claims"]] == ["scope > opd", "scope >= opd", "opd > grpo",
                                                                "opd > kd"]
    assert two["ordering"]["verdict"] in ("holds", "not confirmed", "contradicted")
    teacher_weights = two["signals"]["scope_training"]["teacher_weight_max"]
    assert teacher_weights["steps"] == 4  # two steps per seed, every step logged
    assert teacher_weights["p25"] <= teacher_weights["median"] <= teacher_weights["p75"] <= teacher_weights["max"]
    assert "recovery" in two["signals"]
    # The held-out curve runs on seed 0 only; the entropy comes with every run.
    for name in ("scope", "opd", "grpo", "kd"):
        first, second = two["curves"][name]
        assert [p["step"] for p in first["accuracy"]] == [0, 2] and second["accuracy"] == []
        assert first["entropy"] and second["entropy"], name

    # Scheduling does not enter the numbers: one worker gives the same results.json, float for float.
    assert _numbers(one) == _numbers(two)

    # One line per event: run i/N, method, seed, step, minutes left.
    assert "run 1/8 scope seed 0: step 2/2 (about" in log and "min left)" in log
    assert "run 8/8 kd seed 1:" in log and "2 worker processes" in log
    report = (tmp_path / "two" / "report.md").read_text()
    assert "toy sums task" in report and "## The paper's ordering" in report
    assert "| SCOPE > OPD | Avg@8 |" in report and "| SCOPE ≥ OPD | Pass@8 |" in report
    assert "**The paper's ordering " in report and "| scope-opd |" in report
    for picture in ("pass_at_k.png", "training_curves.png"):
        assert (tmp_path / "two" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_addition_demo_is_the_smoke_test(tmp_path, cache, monkeypatch):
    results = _demo(tmp_path / "demo", cache, monkeypatch, "--task", "addition", "--methods", "scope,opd",
                    "--workers", "1", "--no-recovery", "--ablations")
    assert results["task"] == "addition" and results["seeds"] == [0]
    assert set(results["methods"]) >= {"base", "scope", "opd", "scope-no-dpaw", "scope-reversed-student"}
    # One seed: differences without intervals, and the report says nothing is tested.
    assert results["comparisons"]["scope-no-dpaw-scope"]["ci95"] is None
    assert results["signals"]["recovery"] is None
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "One seed: no intervals" in report
    _assert_provenance(results, report)


def _assert_provenance(results: dict, report: str) -> None:
    """results.json and report.md name what produced the numbers: the libraries' own version strings,
    this machine, and the commit git reports for the source tree the package was imported from."""
    import os
    import platform
    import subprocess
    from pathlib import Path

    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    import scope_opd

    prov = results["provenance"]
    expected = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    for name, version in expected.items():
        assert prov["versions"][name] == version, name
        assert f"{name} {version}" in report, name
    assert prov["versions"]["math-verify"] and f"math-verify {prov['versions']['math-verify']}" in report
    assert prov["machine"]["cores"] == os.cpu_count() and str(prov["machine"]["cores"]) + " cores" in report
    assert prov["machine"]["cpu"] and prov["machine"]["cpu"] in report
    source = Path(scope_opd.__file__).parent
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clone is one); an installed wheel has no commit
        assert prov["git_commit"].split("+")[0] == head.stdout.strip() and head.stdout.strip() in report
    else:
        assert prov["git_commit"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "argument --workers: must be a positive integer, got '0'"),
    (["--seeds", "-1"], "argument --seeds: must be a positive integer, got '-1'"),
    (["--steps", "two"], "argument --steps: must be a positive integer, got 'two'"),
    (["--methods", "scope,ppo"], "argument --methods: must be a comma-separated subset of scope,opd,grpo,kd"),
    (["--tau", "0.5,-1"], "argument --tau: must be comma-separated positive numbers, got '0.5,-1'"),
    (["--task", "countdown"], "argument --task: invalid choice: 'countdown'"),
    (["--verifier", "exact"], "argument --verifier: invalid choice: 'exact'"),
])
def test_bad_arguments_are_refused_naming_the_argument(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scope_main(["demo", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_settings_are_refused_before_any_work(tmp_path, capsys):
    assert scope_main(["demo", "--learning-rate", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--learning-rate must be a positive number, got -1.0" in capsys.readouterr().err
    assert scope_main(["demo", "--steps", "1000", "--out", str(tmp_path / "x")]) == 2
    assert "train_problems (2000) must cover steps x prompts_per_step (1000 x 8)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _comparison(avg_ci, pass_ci):
    return {"avg_diff": sum(avg_ci) / 2, "pass_diff": sum(pass_ci) / 2, "ci95": avg_ci, "pass_ci95": pass_ci}


def test_paper_ordering_is_judged_on_the_paired_intervals():
    from scope_opd.demo import paper_ordering

    above, around, below = [0.01, 0.05], [-0.02, 0.03], [-0.04, -0.01]
    holds = paper_ordering({"scope-opd": _comparison(above, around), "opd-grpo": _comparison(above, above),
                            "opd-kd": _comparison(above, above)})
    assert holds["verdict"] == "holds"  # SCOPE >= OPD on Pass@k holds when its interval contains 0
    assert [c["verdict"] for c in holds["claims"]] == ["holds"] * 4
    unsure = paper_ordering({"scope-opd": _comparison(around, above), "opd-kd": _comparison(above, above)})
    assert unsure["verdict"] == "not confirmed" and unsure["claims"][0]["verdict"] == "not confirmed"
    assert [c["claim"] for c in unsure["claims"]] == ["scope > opd", "scope >= opd", "opd > kd"]
    reversed_ = paper_ordering({"scope-opd": _comparison(above, below), "opd-grpo": _comparison(around, around)})
    assert reversed_["verdict"] == "contradicted" and reversed_["claims"][1]["verdict"] == "reversed"
    one_seed = paper_ordering({"scope-opd": {"avg_diff": 0.1, "pass_diff": 0.0, "ci95": None, "pass_ci95": None}})
    assert one_seed["verdict"] == "not confirmed"
    assert paper_ordering({})["verdict"] == "not measured"
