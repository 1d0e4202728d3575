"""Outputs of ``scope eval``: samples.jsonl, results.json, the Table-1-style table, the Pass@k plot.

``scope eval compare`` reads several results.json folders back and draws the same
table (one row per model) and plot (one panel per benchmark, one line per model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PLOT_FILE",
    "RESULTS_FILE",
    "SAMPLES_FILE",
    "TABLE_FILE",
    "compare",
    "format_table",
    "load_results",
    "plot_pass_at_k",
    "write_outputs",
]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
PLOT_FILE = "pass_at_k.png"


def _percent(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_table(results: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    """Markdown table like paper Table 1: one row per results dict, one column per benchmark.

    Each cell is ``Avg@n / Pass@n`` in percent (n = that benchmark's samples per
    problem); the last column averages over benchmarks when a row has them all.
    """
    labels = list(labels) if labels is not None else [r.get("model", f"run {i}") for i, r in enumerate(results)]
    columns: list[str] = []
    for r in results:
        columns.extend(b for b in r["benchmarks"] if b not in columns)
    ns = {b["n"] for r in results for b in r["benchmarks"].values()}
    n_label = str(ns.pop()) if len(ns) == 1 else "n"
    show_average = len(columns) > 1
    header = ["model", *columns] + (["Average"] if show_average else [])
    lines = [
        f"Avg@{n_label} / Pass@{n_label} (%)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for label, r in zip(labels, results):
        cells, avgs, passes = [], [], []
        for name in columns:
            b = r["benchmarks"].get(name)
            if b is None:
                cells.append("—")
                continue
            top = b["pass"].get(str(b["n"]))
            cells.append(f"{_percent(b['avg'])} / {_percent(top)}")
            avgs.append(b["avg"])
            passes.append(top)
        if show_average:
            complete = len(avgs) == len(columns) and None not in passes
            cells.append(
                f"{_percent(sum(avgs) / len(avgs))} / {_percent(sum(passes) / len(passes))}" if complete else "—"
            )
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def plot_pass_at_k(results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Pass@k (percent) against k on a log2 axis.

    One results dict: one line per benchmark. Several (compare mode): one panel
    per benchmark, one line per model.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend alone
    # (callers may be in a notebook or a training process).
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else [r.get("model", f"run {i}") for i, r in enumerate(results)]
    benchmarks: list[str] = []
    for r in results:
        benchmarks.extend(b for b in r["benchmarks"] if b not in benchmarks)

    def curve(b: dict) -> tuple[list[int], list[float]]:
        ks = sorted(int(k) for k in b["pass"])
        return ks, [100 * b["pass"][str(k)] for k in ks]

    if len(results) == 1:
        title = Path(str(labels[0])).name or "Pass@k"
        panels = [(title, [(name, results[0]["benchmarks"][name]) for name in benchmarks])]
    else:
        panels = [
            (name, [(label, r["benchmarks"][name]) for label, r in zip(labels, results) if name in r["benchmarks"]])
            for name in benchmarks
        ]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        all_ks: set[int] = set()
        for line_label, b in lines:
            ks, values = curve(b)
            all_ks.update(ks)
            ax.plot(ks, values, marker="o", label=line_label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        ax.set_title(title)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(result, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Write an :class:`~scope_opd.evaluation.evaluate.EvalResult` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out / SAMPLES_FILE, "results": out / RESULTS_FILE, "table": out / TABLE_FILE}
    with open(paths["samples"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in result.records)
    paths["results"].write_text(json.dumps(result.results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["table"].write_text(format_table([result.results]) + "\n", encoding="utf-8")
    if plot:
        paths["plot"] = plot_pass_at_k([result.results], out / PLOT_FILE)
    return paths


def load_results(folder: str | Path) -> dict:
    """results.json of a ``scope eval`` output folder (or the file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {folder} (is it a `scope eval --out` folder?)")
    results = json.loads(path.read_text(encoding="utf-8"))
    if "benchmarks" not in results:
        raise ValueError(f"{path}: not a scope eval results file (no 'benchmarks')")
    return results


def compare(folders: Sequence[str | Path], *, labels: Sequence[str] | None = None, out_dir: str | Path | None = None):
    """Merge result folders: returns (table text, merged dict); writes table + plot + compare.json into ``out_dir``."""
    if not folders:
        raise ValueError("compare needs at least one results folder")
    results = [load_results(f) for f in folders]
    if labels is None:
        labels = [r.get("model") or Path(f).name for r, f in zip(results, folders)]
        if len(set(labels)) != len(labels):  # same model twice (e.g. two checkpoints' runs): the folder names
            labels = [Path(f).name for f in folders]
    elif len(labels) != len(folders):
        raise ValueError(f"{len(labels)} labels for {len(folders)} folders")
    table = format_table(results, labels)
    merged = {label: r for label, r in zip(labels, results)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / TABLE_FILE).write_text(table + "\n", encoding="utf-8")
        (out / "compare.json").write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        plot_pass_at_k(results, out / PLOT_FILE, labels)
    return table, merged
