"""``pass_at_k.png`` (paper Fig. 4) and ``training_curves.png`` (Fig. 3), from ``results.json``.
"""

from __future__ import annotations

from pathlib import Path


def plot_pass_at_k(summary: dict, path: Path) -> None:
    from ..evaluation.report import plot_pass_at_k

    k = summary["k"]
    results = [{"model": name, "benchmarks": {"toy": {"n": k, "pass": m["pass_at_k"], "avg": m["avg"]}}}
               for name, m in summary["methods"].items()]
    plot_pass_at_k(results, path, labels=[r["model"] for r in results])


def plot_curves(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    acc_ax, ent_ax = fig.subplots(1, 2)
    for name, runs in summary["curves"].items():
        run = runs[0]  # first seed
        if run["accuracy"]:
            acc_ax.plot([p["step"] for p in run["accuracy"]], [100 * p["accuracy"] for p in run["accuracy"]],
                        marker="o", label=name)
        if run["entropy"]:
            ent_ax.plot([p["step"] for p in run["entropy"]], [p["entropy"] for p in run["entropy"]], label=name)
    acc_ax.set(title="held-out accuracy (seed 0)", xlabel="training step", ylabel="accuracy (%)")
    ent_ax.set(title="policy entropy (seed 0)", xlabel="training step", ylabel="mean token entropy (nats)")
    for ax in (acc_ax, ent_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
