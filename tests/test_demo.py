"""`scope demo --quick`: the whole comparison pipeline end to end on the quick toy models."""

from __future__ import annotations

import json

from scope_opd.cli import main as scope_main


def test_quick_demo_writes_the_report_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_OPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert scope_main(["demo", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["k"] >= 8
    assert set(results["methods"]) == {"base", "scope", "opd", "grpo", "kd"}
    for name, entry in results["methods"].items():
        assert 0.0 <= entry["avg"] <= 1.0 and 0.0 <= entry["pass"] <= 1.0, name
        assert entry["pass"] >= entry["avg"] - 1e-9, name  # Pass@k >= Avg@k
        curve = [entry["pass_at_k"][str(k)] for k in range(1, results["k"] + 1)]
        assert curve == sorted(curve), name  # Pass@k is non-decreasing in k
    for name in ("scope", "opd", "grpo", "kd"):
        (run,) = results["curves"][name]
        assert [p["step"] for p in run["accuracy"]][0] == 0 and run["accuracy"][-1]["step"] == 2
        assert run["entropy"], name
    report = (out / "report.md").read_text()
    assert "| scope |" in report and "vs OPD" in report and "## Reading" in report
    for picture in ("pass_at_k.png", "training_curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_sums_demo_writes_paired_comparisons_and_signals(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_OPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert scope_main(["demo", "--quick", "--task", "sums", "--seeds", "2", "--steps", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sums" and results["seeds"] == [0, 1]
    assert set(results["methods"]) == {"base", "scope", "opd", "grpo", "kd"}
    scope_opd = results["comparisons"]["scope-opd"]
    per_seed = [s["avg"] - o["avg"] for s, o in zip(results["methods"]["scope"]["seeds"],
                                                    results["methods"]["opd"]["seeds"])]
    assert scope_opd["avg_diffs"] == per_seed and scope_opd["n"] == 2
    assert scope_opd["ci95"][0] <= scope_opd["avg_diff"] <= scope_opd["ci95"][1]
    training = results["signals"]["scope_training"]
    for key in ("teacher_weight_max", "frac_groups_teacher_weight_above_1.5"):
        assert training[key]["steps"] == 2, key  # one step per seed, every step logged
        assert training[key]["p25"] <= training[key]["median"] <= training[key]["p75"] <= training[key]["max"]
    # The quick student is almost never right: steps without correct rollouts log no student weights.
    assert training.get("frac_groups_student_weight_above_1.5", {"steps": 0})["steps"] <= 2
    assert "recovery" in results["signals"]
    report = (out / "report.md").read_text()
    assert "toy sums task" in report and "Paired comparisons" in report and "| scope-opd |" in report
