"""Outputs of ``scope analyze recovery``: recovery.json, solutions.jsonl, recovery.md, recovery.png.

* ``recovery.json``: the dictionary :func:`~scope_opd.analysis.recovery.run_recovery_analysis`
  returns, with each per-solution record kept but its texts and ids (the solution, its
  sampled token ids and the teacher's continuations) left out, so the file stays small
  at paper scale;
* ``solutions.jsonl``: the full records, texts and the scored token ids included, one
  solution a line;
* ``recovery.md``: paper Tables 6 and 7 with the paper's numbers beside ours, and
  a short reading;
* ``recovery.png``: recovery rate against truncation ratio, one line per quartile (Fig. 1b).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .recovery import BUCKETS

__all__ = [
    "JSON_FILE",
    "PLOT_FILE",
    "SOLUTIONS_FILE",
    "TABLE_FILE",
    "format_recovery_report",
    "plot_recovery",
    "write_recovery_outputs",
]

JSON_FILE = "recovery.json"
SOLUTIONS_FILE = "solutions.jsonl"
TABLE_FILE = "recovery.md"
PLOT_FILE = "recovery.png"

# Two standard errors: the line between "a gap" and "noise" in the reading.
_SIGNIFICANT_SE = 2.0


def _pct(x: float | None, stderr: float | None = None) -> str:
    if x is None:
        return "—"
    text = f"{100 * x:.1f}"
    return text if stderr is None else f"{text} ± {100 * stderr:.1f}"


def _ratios(results: dict) -> list[str]:
    return list(results["recovery"]["all"])


def format_bucket_table(results: dict) -> str:
    """Paper Table 6: teacher perplexity of the incorrect solutions, per quartile."""
    paper = results["paper_reference"]["mean_ppl"]
    lines = [
        "| bucket | solutions | mean PPL | mean NLL | PPL range | paper mean PPL |",
        "|---|---|---|---|---|---|",
    ]
    for b in results["buckets"]:
        reference = f"{paper[b['bucket']]:.2f}" if b["bucket"] in paper else ""
        lines.append(
            f"| {b['bucket']} | {b['count']} | {b['mean_ppl']:.3f} | {b['mean_nll']:.3f} | "
            f"{b['min_ppl']:.3f}-{b['max_ppl']:.3f} | {reference} |"
        )
    return "\n".join(lines)


def format_recovery_table(results: dict) -> str:
    """Paper Table 7: recovery rate (%) per quartile and truncation ratio, ± one standard error."""
    ratios = _ratios(results)
    paper = results["paper_reference"]
    header = "| bucket | " + " | ".join(f"r = {r}" for r in ratios) + " |"
    lines = [header, "|---|" + "---|" * len(ratios)]
    for name in (*BUCKETS, "all"):
        cells = []
        for r in ratios:
            cell = results["recovery"][name][r]
            text = _pct(cell["rate"], cell["stderr"])
            reference = paper["recovery"].get(name, {}).get(r)
            cells.append(text + (f" (paper {100 * reference:.1f})" if reference is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gap_cells = []
    for r in ratios:
        gap = results["gaps"][r]
        reference = paper["gap"].get(r)
        gap_cells.append(_pct(gap["gap"], gap["stderr"]) + (f" (paper {100 * reference:.1f})" if reference is not None else ""))
    lines.append("| Q1 - Q4 (points) | " + " | ".join(gap_cells) + " |")
    kept = results["counts"]["mean_kept_fraction"]
    lines.append("| mean prefix kept (% of chars) | " + " | ".join(_pct(kept[r]) for r in ratios) + " |")
    return "\n".join(lines)


def _verdict(gap: float | None, stderr: float | None) -> str:
    if gap is None:
        return "undefined (an extreme bucket has no prefix at this ratio)"
    if stderr is None:
        return "of unknown precision (too few solutions for a standard error)"
    if stderr == 0:
        return "of unknown precision (every solution of both buckets recovered at the same rate, so no spread to measure)"
    if gap > _SIGNIFICANT_SE * stderr:
        return "positive beyond two standard errors, the paper's direction"
    if gap < -_SIGNIFICANT_SE * stderr:
        return "negative beyond two standard errors, opposite to the paper"
    return "within two standard errors of zero: this run can neither confirm nor refute the paper's gap"


def format_reading(results: dict) -> str:
    """A short, mechanical reading of the tables: what the numbers do and do not show."""
    ratios = _ratios(results)
    first, last = ratios[0], ratios[-1]
    counts = results["counts"]
    gap_first, gap_last = results["gaps"][first], results["gaps"][last]
    q1, q4 = results["recovery"]["Q1"][first], results["recovery"]["Q4"][first]
    lines = [
        f"- {counts['incorrect']} of {counts['samples']} student solutions were incorrect "
        f"(student accuracy {_pct(counts['student_accuracy'])}%); {counts['analysed']} were analysed, "
        f"about {counts['analysed'] // len(BUCKETS)} per quartile.",
        f"- At r = {first}, Q1 (lowest teacher PPL) recovers {_pct(q1['rate'])}% and Q4 {_pct(q4['rate'])}%: "
        f"a gap of {_pct(gap_first['gap'], gap_first['stderr'])} points, {_verdict(gap_first['gap'], gap_first['stderr'])}. "
        "The paper reports 64.9% vs 45.4% (19.5 points) at r = 0.2.",
    ]
    if last != first:
        trend = ""
        if gap_first["gap"] is not None and gap_last["gap"] is not None:
            trend = "shrinks" if gap_last["gap"] < gap_first["gap"] else "does not shrink"
            trend = f" The gap {trend} from r = {first} to r = {last}"
        lines.append(
            f"- At r = {last} the gap is {_pct(gap_last['gap'], gap_last['stderr'])} points "
            f"({_verdict(gap_last['gap'], gap_last['stderr'])}).{trend}; the paper's shrinks to 7.2 points at r = 0.8."
        )
    by_bucket = [results["recovery"][name][first]["rate"] for name in BUCKETS]
    if None not in by_bucket:
        monotone = all(a >= b for a, b in zip(by_bucket, by_bucket[1:]))
        lines.append(
            f"- Across quartiles at r = {first} ({', '.join(_pct(x) for x in by_bucket)}%) recovery "
            + ("falls monotonically with teacher PPL." if monotone else "does not fall monotonically with teacher PPL.")
        )
    overall = results["recovery"]["all"]
    lines.append(
        "- Overall recovery by ratio: "
        + ", ".join(f"r = {r}: {_pct(overall[r]['rate'])}%" for r in ratios)
        + ". Longer prefixes keep more of the student's error, so recovery usually falls with r."
    )
    if overall[last]["rate"] is not None and overall[last]["rate"] < 0.05:
        lines.append(
            f"- At r = {last} almost nothing is recovered in any quartile (floor effect): the gap there is bounded "
            "by the floor, not evidence for or against the paper."
        )
    for a, b in zip(ratios, ratios[1:]):
        pairs = [
            (s["truncations"][a], s["truncations"][b])
            for s in results["solutions"]
            if s["truncations"][a] is not None and s["truncations"][b] is not None
        ]
        same = sum(x["cut_chars"] == y["cut_chars"] for x, y in pairs)
        if pairs and same / len(pairs) >= 0.5:
            lines.append(
                f"- r = {a} and r = {b} cut {same} of {len(pairs)} solutions at the same newline (few lines per "
                "solution), so those columns share most of their prefixes."
            )
    char_cuts = sum(counts["char_cuts"].values())
    skipped = sum(counts["skipped_prefixes"].values())
    if char_cuts or skipped:
        lines.append(
            f"- {char_cuts} prefixes were cut at a character (no usable newline) and {skipped} skipped, "
            f"out of {counts['analysed'] * len(ratios)}."
        )
    lines.append(
        "- Standard errors treat solutions as independent (several come from one problem, so they are "
        "optimistic); the paper's numbers come from 1.5B-7B models on competition maths and are printed "
        "for orientation, not as a target a different model pair must hit."
    )
    return "\n".join(lines)


def format_recovery_report(results: dict) -> str:
    """The whole recovery.md: settings line, Table 6, Table 7, reading."""
    s = results["settings"]
    counts = results["counts"]
    return "\n".join(
        [
            "# Error recovery vs teacher perplexity (paper Sec. 2.2, Tables 6-7)",
            "",
            f"student `{results['student']}`, teacher `{results['teacher']}`, dataset `{results['dataset']}` "
            f"({counts['problems']} problems, verifier `{results['verifier']}`); {s['samples_per_problem']} student "
            f"samples per problem, {s['completions_per_prefix']} teacher continuations per prefix, temperature "
            f"{s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}, seed {s['seed']}.",
            "",
            "## Teacher perplexity of the incorrect solutions (Table 6)",
            "",
            format_bucket_table(results),
            "",
            "## Recovery rate (%) when the teacher continues a truncated solution (Table 7)",
            "",
            format_recovery_table(results),
            "",
            "## Reading",
            "",
            format_reading(results),
            "",
        ]
    )


def plot_recovery(results: dict, path: str | Path) -> Path:
    """Recovery rate (%) against truncation ratio, one line per quartile, like paper Fig. 1b."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    ratios = _ratios(results)
    x = [float(r) for r in ratios]
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    for b in results["buckets"]:
        name = b["bucket"]
        cells = [results["recovery"][name][r] for r in ratios]
        y = [math.nan if c["rate"] is None else 100 * c["rate"] for c in cells]
        err = [0.0 if c["stderr"] is None else 100 * c["stderr"] for c in cells]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{name} (PPL {b['mean_ppl']:.2f})")
    ax.set_xticks(x, ratios)
    ax.set_xlabel("truncation ratio r")
    ax.set_ylabel("recovery rate (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Teacher recovery from truncated incorrect solutions", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="teacher PPL quartile", title_fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _without_texts(record: dict) -> dict:
    compact = {k: v for k, v in record.items() if k not in ("solution", "token_ids", "truncations")}
    compact["truncations"] = {
        key: None
        if t is None
        else {**{k: v for k, v in t.items() if k != "continuations"}, "correct": [c["correct"] for c in t["continuations"]]}
        for key, t in record["truncations"].items()
    }
    return compact


def write_recovery_outputs(results: dict, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Write recovery.json, solutions.jsonl, recovery.md and (``plot``) recovery.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_FILE, "solutions": out / SOLUTIONS_FILE, "table": out / TABLE_FILE}
    compact = {**results, "solutions": [_without_texts(s) for s in results["solutions"]]}
    paths["json"].write_text(json.dumps(compact, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(paths["solutions"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in results["solutions"])
    paths["table"].write_text(format_recovery_report(results), encoding="utf-8")
    if plot:
        paths["plot"] = plot_recovery(results, out / PLOT_FILE)
    return paths
