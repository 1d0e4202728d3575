"""Error recovery vs teacher perplexity: the study that motivates SCOPE's teacher-guided weight.

Paper Sec. 2.2, Appendix C.1, Tables 6-7, Fig. 1b. The claim under test: among a
student's *incorrect* solutions, those the teacher finds less perplexing are the
ones it can still rescue, so teacher perplexity tells how useful a wrong rollout
is as a distillation signal. One run is, top to bottom:

1. the student samples ``samples_per_problem`` solutions per problem (temperature
   0.6, top-p 0.95, top-k 20); the verifier keeps the incorrect ones;
2. the teacher scores each incorrect solution teacher-forced on prompt +
   solution; ``PPL = exp(-mean log p_T)`` over the response tokens only;
3. the solutions are split by teacher PPL into quartile buckets Q1 (lowest) .. Q4
   (paper Table 6);
4. each solution is truncated at the newline nearest to ``r * len(solution)``
   for every ratio r, the teacher completes prompt + prefix
   ``completions_per_prefix`` times, and prefix + continuation is verified;
   the recovery rate of a cell is the mean accuracy (paper Table 7, Fig. 1b).

Decisions the paper leaves open, all made here:

* **Response tokens.** The teacher scores the ids the student sampled
  (``Completion.token_ids``), its EOS included when it stopped by itself, as in
  training, where EOS is a completion token; nothing is re-encoded from text.
* **Truncation** (:func:`truncation_point`): lengths are in characters; the cut
  goes just *after* a newline (the prefix ends with it, so the teacher starts a
  new step) and the prefix is always shorter than the solution. The newline
  whose cut is nearest to ``r * len`` wins; a tie goes to the shorter prefix. A
  solution without a usable newline is cut at the nearest character
  (``no_newline="char"``, the default, so every solution takes part at every
  ratio) or left out at that ratio (``"skip"``); how many fell back is reported.
* **Quartiles** (:func:`quartile_buckets`): equal counts, sorted by PPL; sizes
  differ by at most one, the lower buckets taking the remainder; tied PPLs are
  ordered by their position in the run (problem, then sample), so a tie group may
  straddle a boundary rather than unbalance the buckets.
* **Recovery rate** of a cell: the mean over its solutions of the fraction of
  their continuations that are correct (every solution has the same number of
  continuations, so this is also the mean over continuations). Its standard
  error treats solutions as independent.
* Solutions whose teacher log-probs are not all finite, or that have no token to
  score, are left out and counted.
* **Prompts of the continuation.** The teacher is given the student's prompt ids
  (the ones the student was sampled from: chat template of the shared tokenizer)
  followed by the prefix's ids as the start of its own answer, as token ids, so no
  BOS is doubled and the prompt is not re-tokenised. The prefix is cut in characters
  (above) and encoded alone, without special tokens.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction

from ..evaluation.benchmarks import ProblemSet
from ..sampling import SamplingSettings, encode_prompts, generate_completions
from ..version import __version__

__all__ = [
    "BUCKETS",
    "NO_NEWLINE_CHOICES",
    "PAPER_REFERENCE",
    "RecoverySettings",
    "TooFewIncorrectError",
    "quartile_buckets",
    "ratio_key",
    "run_recovery_analysis",
    "teacher_perplexities",
    "truncation_point",
]

BUCKETS = ("Q1", "Q2", "Q3", "Q4")
NO_NEWLINE_CHOICES = ("char", "skip")
MIN_INCORRECT = len(BUCKETS)  # one solution per quartile at least
CORRECT_THRESHOLD = 1.0 - 1e-6  # as in evaluation: reward 1 within float noise is a pass

# Numbers the paper gives (SCOPE_METHOD.md sec. 7), fractions; printed beside ours for reading.
PAPER_REFERENCE = {
    "mean_ppl": {"Q1": 1.36, "Q4": 2.38},
    "recovery": {"Q1": {"0.2": 0.649}, "Q4": {"0.2": 0.454}},
    "gap": {"0.2": 0.649 - 0.454, "0.8": 0.072},
}


class TooFewIncorrectError(ValueError):
    """Fewer incorrect solutions than quartile buckets."""


@dataclass(frozen=True)
class RecoverySettings:
    """Settings of one error-recovery run; defaults are the paper's (Appendix C.1).

    ``max_new_tokens`` bounds the student's solutions, ``continuation_max_new_tokens``
    the teacher's continuations (``None``: the same). ``batch_size`` is sequences
    per ``generate`` call, ``teacher_batch_size`` rows per teacher scoring forward.
    Student sampling uses ``seed``, teacher continuations ``seed + 1``.
    """

    samples_per_problem: int = 4
    completions_per_prefix: int = 4
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768
    continuation_max_new_tokens: int | None = None
    repetition_penalty: float = 1.0
    no_newline: str = "char"
    batch_size: int = 32
    teacher_batch_size: int = 8
    seed: int = 0
    apply_chat_template: bool = True
    verifier_timeout_s: float = 10.0
    verifier_workers: int = 4

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if not self.ratios:
            raise ValueError("give at least one truncation ratio")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"truncation ratios must be in (0, 1), got {list(self.ratios)}")
        if len(set(map(ratio_key, self.ratios))) != len(self.ratios):
            raise ValueError(f"truncation ratios repeat: {list(self.ratios)}")
        if self.no_newline not in NO_NEWLINE_CHOICES:
            raise ValueError(f"no_newline must be one of {NO_NEWLINE_CHOICES}, got {self.no_newline!r}")
        if self.teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be >= 1, got {self.teacher_batch_size}")
        if self.continuation_max_new_tokens is not None and self.continuation_max_new_tokens < 1:
            raise ValueError(f"continuation_max_new_tokens must be >= 1, got {self.continuation_max_new_tokens}")
        self.student_sampling()  # validates n, temperature, top-p, ... now rather than mid-run
        self.teacher_sampling()

    def student_sampling(self) -> SamplingSettings:
        return SamplingSettings(
            n=self.samples_per_problem,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            batch_size=self.batch_size,
            seed=self.seed,
            apply_chat_template=self.apply_chat_template,
        )

    def teacher_sampling(self) -> SamplingSettings:
        # The continuation prompts arrive as token ids (the student's prompt ids), so no template applies.
        return replace(
            self.student_sampling(),
            n=self.completions_per_prefix,
            max_new_tokens=self.continuation_max_new_tokens or self.max_new_tokens,
            seed=self.seed + 1,
            apply_chat_template=False,
        )


def ratio_key(ratio: float) -> str:
    """JSON key of a ratio: ``0.2 -> "0.2"``."""
    return f"{ratio:g}"


# --- truncation and bucketing: the two rules of the study ---------------------------------------


def truncation_point(solution: str, ratio: float, *, no_newline: str = "char") -> tuple[int, str] | None:
    """Characters of ``solution`` kept at truncation ratio ``ratio``, and how the cut was found.

    With ``L = len(solution)`` and target ``t = ratio * L`` (computed exactly from
    the ratio's decimal form, so ties are exact), the candidate cuts are ``i + 1``
    for every ``solution[i] == "\\n"`` with ``i + 1 < L``: the prefix
    ``solution[:cut]`` ends with that newline and is shorter than the solution.
    Returns ``(cut, "newline")`` for the candidate nearest to ``t``, the smaller
    one on a tie. Without a candidate: ``no_newline="char"`` returns
    ``(cut, "char")`` with ``cut`` the integer nearest to ``t`` (ties down),
    capped at ``L - 1`` (0 for an empty solution); ``"skip"`` returns ``None``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if no_newline not in NO_NEWLINE_CHOICES:
        raise ValueError(f"no_newline must be one of {NO_NEWLINE_CHOICES}, got {no_newline!r}")
    length = len(solution)
    target = Fraction(repr(float(ratio))) * length
    cuts = [i + 1 for i, ch in enumerate(solution) if ch == "\n" and i + 1 < length]
    if cuts:
        return min(cuts, key=lambda cut: (abs(cut - target), cut)), "newline"
    if no_newline == "skip":
        return None
    nearest = math.ceil(target - Fraction(1, 2))  # round half down
    return min(nearest, max(length - 1, 0)), "char"


def quartile_buckets(perplexities: Sequence[float]) -> list[int]:
    """Bucket index 0..3 (Q1..Q4) of each value: equal-count quartiles by ascending perplexity.

    Sizes differ by at most one, the lower buckets taking the remainder (``n = 6``:
    2, 2, 1, 1). Ties are ordered by position in ``perplexities``, so equal values
    may fall on both sides of a boundary. Needs at least 4 values.
    """
    n = len(perplexities)
    if n < MIN_INCORRECT:
        raise TooFewIncorrectError(f"quartile buckets need at least {MIN_INCORRECT} values, got {n}")
    order = sorted(range(n), key=lambda i: (perplexities[i], i))
    base, extra = divmod(n, len(BUCKETS))
    buckets = [0] * n
    position = 0
    for bucket in range(len(BUCKETS)):
        size = base + (1 if bucket < extra else 0)
        for i in order[position : position + size]:
            buckets[i] = bucket
        position += size
    return buckets


# --- teacher perplexity ---------------------------------------------------------------------------


def teacher_perplexities(
    teacher, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *, batch_size: int = 8, progress: bool = True
) -> list[tuple[float, float]]:
    """``(mean NLL, PPL)`` of each completion under ``teacher``, response tokens only.

    ``teacher`` is a causal LM; scoring goes through
    :class:`~scope_opd.teachers.InProcessTeacher` (teacher-forced, memory-lean).
    A row with no completion token, or a non-finite log-prob, gets ``(nan, nan)``.
    """
    from tqdm.auto import tqdm

    from ..teachers import InProcessTeacher

    scorer = InProcessTeacher(teacher, batch_size=batch_size)
    out: list[tuple[float, float]] = []
    # Calls of a few forwards each, only so that progress shows; the scorer sorts by length within a call.
    step = 4 * batch_size
    with tqdm(total=len(prompt_ids), desc="teacher perplexity", unit="solution", disable=not progress, leave=False) as bar:
        for start in range(0, len(prompt_ids), step):
            logprobs = scorer.score(list(prompt_ids[start : start + step]), list(completion_ids[start : start + step]))
            for row in logprobs:
                if row.numel() == 0 or not bool(row.isfinite().all()):
                    out.append((math.nan, math.nan))
                    continue
                nll = -float(row.double().mean())
                out.append((nll, math.exp(nll) if nll < 700 else math.inf))
            bar.update(len(logprobs))
    return out


# --- the run --------------------------------------------------------------------------------------


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"[recovery] {message}", file=sys.stderr, flush=True)


def _mean_and_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def _verifier_label(verifier) -> str:
    return verifier if isinstance(verifier, str) else getattr(verifier, "__name__", repr(verifier))


def run_recovery_analysis(
    student,
    teacher,
    tokenizer,
    problems: ProblemSet,
    settings: RecoverySettings = RecoverySettings(),
    *,
    teacher_tokenizer=None,
    student_name: str | None = None,
    teacher_name: str | None = None,
    allow_special_token_mismatch: bool = False,
    progress: bool = True,
) -> dict:
    """Run the error-recovery study on loaded models; returns the ``recovery.json`` dictionary.

    ``student`` and ``teacher`` are causal LMs on the same device sharing
    ``tokenizer``; pass ``teacher_tokenizer`` to have that checked
    (:func:`~scope_opd.teachers.check_tokenizers_match`). ``problems`` carries
    the prompts, gold answers and verifier.

    Raises:
        TooFewIncorrectError: fewer than 4 incorrect (and scorable) solutions.
        ValueError: the tokenizers differ, or a setting is invalid.

    Result keys: ``settings``, ``counts``, ``buckets`` (Table 6), ``recovery``
    (Table 7: bucket -> ratio -> rate, stderr, solutions, continuations; plus
    ``"all"``), ``gaps`` (Q1 - Q4 per ratio, fractions), ``paper_reference``,
    ``timing_s`` and ``solutions`` (one record per analysed solution, with its
    continuations' verdicts). Rates are fractions in [0, 1].
    """
    from ..evaluation.evaluate import make_reward_function

    student_name = student_name or getattr(student.config, "_name_or_path", "") or "student"
    teacher_name = teacher_name or getattr(teacher.config, "_name_or_path", "") or "teacher"
    if teacher_tokenizer is not None:
        from ..teachers import check_tokenizers_match

        check_tokenizers_match(
            tokenizer,
            teacher_tokenizer,
            student_name,
            teacher_name,
            allow_special_token_mismatch=allow_special_token_mismatch,
        )
    timing: dict[str, float] = {}
    # Built first: an unusable verifier (no code sandbox) fails before any sampling.
    reward = make_reward_function(
        problems.verifier,
        benchmark=problems.name,
        timeout_s=settings.verifier_timeout_s,
        max_workers=settings.verifier_workers,
    )
    try:
        # 1. Student solutions, verified; the incorrect ones are the study's population.
        prompts = [p.prompt for p in problems.problems]
        _say(f"student samples {settings.samples_per_problem} solutions for each of {len(prompts)} problems", progress)
        start = time.perf_counter()
        prompt_ids = encode_prompts(tokenizer, prompts, settings.apply_chat_template)
        sampled = generate_completions(
            student, tokenizer, prompt_ids, settings.student_sampling(), progress=progress, desc="student solutions"
        )
        timing["student_sampling"] = time.perf_counter() - start
        flat = [(p_index, s_index, c) for p_index, row in enumerate(sampled) for s_index, c in enumerate(row)]
        start = time.perf_counter()
        scores = reward.score([c.text for _, _, c in flat], [problems.problems[p].answer for p, _, _ in flat])
        incorrect = [item for item, score in zip(flat, scores) if not score >= CORRECT_THRESHOLD]
        timing["verification"] = time.perf_counter() - start
        counts = {
            "problems": len(prompts),
            "samples": len(flat),
            "correct": len(flat) - len(incorrect),
            "incorrect": len(incorrect),
            "student_accuracy": (len(flat) - len(incorrect)) / len(flat),
            "unfinished_samples": sum(not c.finished for _, _, c in flat),
        }
        _say(f"{len(incorrect)} of {len(flat)} student solutions are incorrect", progress)
        _check_enough(len(incorrect), counts, what="incorrect")

        # 2. Teacher perplexity of each incorrect solution, response tokens only.
        completion_ids = [list(completion.token_ids) for _, _, completion in incorrect]
        start = time.perf_counter()
        scored = teacher_perplexities(
            teacher,
            [prompt_ids[p] for p, _, _ in incorrect],
            completion_ids,
            batch_size=settings.teacher_batch_size,
            progress=progress,
        )
        timing["teacher_scoring"] = time.perf_counter() - start
        kept = [(item, ids, nll, ppl) for item, ids, (nll, ppl) in zip(incorrect, completion_ids, scored) if math.isfinite(nll)]
        counts["unscorable"] = len(incorrect) - len(kept)
        counts["analysed"] = len(kept)
        _check_enough(len(kept), counts, what="scorable incorrect")

        # 3. Quartile buckets by teacher perplexity (Table 6).
        bucket_of = quartile_buckets([ppl for *_, ppl in kept])
        solutions = []
        for (item, ids, nll, ppl), bucket in zip(kept, bucket_of):
            p_index, s_index, completion = item
            problem = problems.problems[p_index]
            solutions.append(
                {
                    "problem_id": problem.id,
                    "problem_index": p_index,
                    "sample_index": s_index,
                    "gold": problem.answer if isinstance(problem.answer, (str, int, float)) else None,
                    "solution": completion.text,
                    "num_tokens": completion.num_tokens,
                    "finished": completion.finished,
                    "scored_tokens": len(ids),
                    "token_ids": ids,
                    "teacher_nll": nll,
                    "teacher_ppl": ppl,
                    "bucket": BUCKETS[bucket],
                    "truncations": {},
                }
            )

        # 4. Truncate, let the teacher continue (all prefixes in one batched call), verify.
        jobs = []  # (solution index, ratio key, prefix)
        fallback = dict.fromkeys(map(ratio_key, settings.ratios), 0)
        skipped = dict.fromkeys(map(ratio_key, settings.ratios), 0)
        for index, record in enumerate(solutions):
            text = record["solution"]
            for ratio in settings.ratios:
                key = ratio_key(ratio)
                point = truncation_point(text, ratio, no_newline=settings.no_newline)
                if point is None:
                    skipped[key] += 1
                    record["truncations"][key] = None
                    continue
                cut, kind = point
                fallback[key] += kind == "char"
                record["truncations"][key] = {
                    "cut_chars": cut,
                    "cut_kind": kind,
                    "kept_fraction": cut / len(text) if text else 0.0,
                }
                jobs.append((index, key, text[:cut]))
        counts["char_cuts"] = fallback
        counts["skipped_prefixes"] = skipped
        # Newline cuts can land far from r (a short solution has few lines): what was really kept.
        counts["mean_kept_fraction"] = {
            key: _mean_and_stderr(
                [s["truncations"][key]["kept_fraction"] for s in solutions if s["truncations"][key] is not None]
            )[0]
            for key in map(ratio_key, settings.ratios)
        }
        counts["prefixes"] = len(jobs)
        counts["continuations"] = len(jobs) * settings.completions_per_prefix
        teacher_settings = settings.teacher_sampling()
        continuation_prompts = [prompt_ids[solutions[i]["problem_index"]] for i, _, _ in jobs]
        prefix_ids = [tokenizer(prefix, add_special_tokens=False)["input_ids"] for _, _, prefix in jobs]
        # Longest first, so each generate batch holds prompts of similar length (less padding).
        order = sorted(range(len(jobs)), key=lambda j: -(len(continuation_prompts[j]) + len(prefix_ids[j])))
        _say(
            f"teacher continues {len(jobs)} prefixes x {settings.completions_per_prefix} "
            f"(ratios {', '.join(map(ratio_key, settings.ratios))})",
            progress,
        )
        start = time.perf_counter()
        generated = generate_completions(
            teacher,
            tokenizer,
            [continuation_prompts[j] for j in order],
            teacher_settings,
            prefixes=[prefix_ids[j] for j in order],
            progress=progress,
            desc="teacher continuations",
        )
        continuations = [None] * len(jobs)
        for j, row in zip(order, generated):
            continuations[j] = row
        timing["teacher_continuation"] = time.perf_counter() - start
        start = time.perf_counter()
        texts = [prefix + c.text for (_, _, prefix), row in zip(jobs, continuations) for c in row]
        golds = [
            problems.problems[solutions[i]["problem_index"]].answer
            for i, _, _ in jobs
            for _ in range(settings.completions_per_prefix)
        ]
        verdicts = reward.score(texts, golds)
        timing["continuation_verification"] = time.perf_counter() - start
        counts["verifier_stats"] = dict(reward.stats)
    finally:
        reward.close()

    position = 0
    for (index, key, _), row in zip(jobs, continuations):
        truncation = solutions[index]["truncations"][key]
        correct = [bool(v >= CORRECT_THRESHOLD) for v in verdicts[position : position + len(row)]]
        position += len(row)
        truncation["continuations"] = [
            {"text": c.text, "num_tokens": c.num_tokens, "finished": c.finished, "correct": ok}
            for c, ok in zip(row, correct)
        ]
        truncation["recovery"] = sum(correct) / len(correct)

    results = {
        "analysis": "error_recovery",
        "scope_opd_version": __version__,
        "student": student_name,
        "teacher": teacher_name,
        "dataset": problems.name,
        "source": problems.source,
        "verifier": _verifier_label(problems.verifier),
        "settings": asdict(settings),
        "counts": counts,
        "buckets": _bucket_stats(solutions),
        **_recovery_table(solutions, settings.ratios),
        "paper_reference": PAPER_REFERENCE,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "solutions": solutions,
    }
    return results


def _check_enough(found: int, counts: dict, *, what: str) -> None:
    if found >= MIN_INCORRECT:
        return
    raise TooFewIncorrectError(
        f"found {found} {what} student solution{'s' if found != 1 else ''} "
        f"({counts['samples']} samples: {counts['problems']} problems x {counts['samples'] // max(counts['problems'], 1)}, "
        f"{counts['correct']} correct); the quartile buckets need at least {MIN_INCORRECT}. "
        "Use more problems (--limit), more --samples-per-problem, or a weaker student."
    )


def _bucket_stats(solutions: list[dict]) -> list[dict]:
    """Paper Table 6: per quartile, count and mean teacher PPL / NLL (plus the PPL range)."""
    stats = []
    for name in BUCKETS:
        members = [s for s in solutions if s["bucket"] == name]
        ppls = [s["teacher_ppl"] for s in members]
        stats.append(
            {
                "bucket": name,
                "count": len(members),
                "mean_ppl": sum(ppls) / len(ppls),
                "mean_nll": sum(s["teacher_nll"] for s in members) / len(members),
                "min_ppl": min(ppls),
                "max_ppl": max(ppls),
            }
        )
    return stats


def _recovery_table(solutions: list[dict], ratios: Sequence[float]) -> dict:
    """Paper Table 7: recovery rate per bucket and ratio, and the Q1 - Q4 gap per ratio."""
    table: dict[str, dict[str, dict]] = {}
    for name in (*BUCKETS, "all"):
        members = [s for s in solutions if name == "all" or s["bucket"] == name]
        table[name] = {}
        for ratio in ratios:
            key = ratio_key(ratio)
            rates = [s["truncations"][key]["recovery"] for s in members if s["truncations"][key] is not None]
            rate, stderr = _mean_and_stderr(rates)
            table[name][key] = {
                "rate": rate,
                "stderr": stderr,
                "solutions": len(rates),
                "continuations": sum(
                    len(s["truncations"][key]["continuations"]) for s in members if s["truncations"][key] is not None
                ),
            }
    gaps = {}
    for ratio in ratios:
        key = ratio_key(ratio)
        q1, q4 = table["Q1"][key], table["Q4"][key]
        if q1["rate"] is None or q4["rate"] is None:
            gaps[key] = {"gap": None, "stderr": None}
            continue
        stderr = None
        if q1["stderr"] is not None and q4["stderr"] is not None:
            stderr = math.sqrt(q1["stderr"] ** 2 + q4["stderr"] ** 2)
        gaps[key] = {"gap": q1["rate"] - q4["rate"], "stderr": stderr}
    return {"recovery": table, "gaps": gaps}
