"""Evaluate a model on problem sets: sample n completions, verify, aggregate Avg@n / Pass@k.

:func:`evaluate_model` is what ``scope eval`` runs and what the toy demo calls
in-process (pass the model and tokenizer objects; nothing is re-loaded).
Its :class:`EvalResult` holds one record per sample (the lines of
``samples.jsonl``) and the ``results.json`` dictionary:

.. code-block:: text

    {"model": ..., "backend": ..., "sampling": {n, temperature, top_p, top_k, max_new_tokens,
     repetition_penalty, batch_size, seed, apply_chat_template},
     "ks": [1, 2, ...],
     "benchmarks": {NAME: {"n": 32, "avg": Avg@n, "pass": {"1": Pass@1, ..., "32": Pass@32},
                           "num_problems": P, "num_samples": P*n, "truncated": fraction without EOS,
                           "verifier": ..., "source": ..., "verifier_stats": {...}}}}

Scores are fractions in [0, 1]; the printed table shows percent, like the paper.
A sample is correct when its verifier reward is 1 (a partial-credit reward is not
a pass); a verifier error or timeout scores 0 and is counted in ``verifier_stats``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..metrics import benchmark_scores, default_ks
from ..version import __version__, provenance
from .benchmarks import ProblemSet, UnavailableError
from .humaneval import HUMANEVAL_VERIFIER
from ..sampling import PAPER_SAMPLING, SamplingSettings, generate_completions, vllm_generate_completions

__all__ = [
    "BACKENDS",
    "EvalResult",
    "UnavailableError",
    "aggregate_records",
    "evaluate_model",
    "extract_answer",
    "load_model",
    "make_reward_function",
]

BACKENDS = ("transformers", "vllm")
CODE_VERIFIERS = ("code", HUMANEVAL_VERIFIER)  # these need the sandbox: checked before sampling
CORRECT_THRESHOLD = 1.0 - 1e-6  # reward 1 within float noise


@dataclass
class EvalResult:
    """Per-sample ``records`` (samples.jsonl lines) and the ``results`` dictionary (results.json)."""

    records: list[dict]
    results: dict = field(default_factory=dict)

    @property
    def benchmarks(self) -> dict:
        return self.results["benchmarks"]

    def write(self, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write samples.jsonl, results.json, table.md and (``plot``) pass_at_k.png; returns their paths."""
        from .report import write_outputs

        return write_outputs(self, out_dir, plot=plot)


# --- loading ----------------------------------------------------------------------------------


def _resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, *, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) from a hub id or local path, model in eval mode on ``device`` (default: cuda if any)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    model.to(_resolve_device(device)).eval()
    return model, tokenizer


def _load_vllm(name_or_path: str, *, dtype: str, seed: int):
    try:
        from vllm import LLM
    except ImportError as err:
        raise UnavailableError(
            "--backend vllm needs vLLM, which is not installed here (pip install 'scope-opd[vllm]' on a GPU "
            "machine), or use --backend transformers"
        ) from err
    return LLM(model=name_or_path, dtype=dtype, seed=seed)


def make_reward_function(verifier, *, benchmark: str, timeout_s: float, max_workers: int):
    """A TRL-signature reward function for ``verifier``; fails before any sampling if it cannot exist."""
    from ..verifiers import RewardFunction

    if verifier in CODE_VERIFIERS:
        from .humaneval import check_code_sandbox

        try:
            check_code_sandbox()
        except Exception as err:
            raise UnavailableError(
                f"benchmark {benchmark!r} needs the sandboxed code verifier, which is unavailable here: "
                f"{type(err).__name__}: {err}"
            ) from err
    try:
        return RewardFunction(verifier, answer_field="answer", timeout_s=timeout_s, max_workers=max_workers)
    except ValueError as err:  # unknown name, unimportable path
        raise UnavailableError(f"benchmark {benchmark!r} needs verifier {verifier!r}: {err}") from err


# --- scoring ----------------------------------------------------------------------------------


def extract_answer(completion: str, verifier) -> str | None:
    """The answer a reader should see in samples.jsonl (the verifier, not this, decides correctness).

    math: last ``\\boxed{}`` content (None without one); code: the program (last
    ```python block, else the text); exact: the final answer text; others: None.
    """
    from ..verifiers.extract import final_answer_text, last_boxed_content, last_python_block

    if verifier == "math":
        return last_boxed_content(completion)
    if verifier in CODE_VERIFIERS:
        return last_python_block(completion)
    if verifier == "exact":
        return final_answer_text(completion)
    return None


def aggregate_records(records: Sequence[dict], ks: Sequence[int] | None = None) -> dict[str, dict]:
    """Benchmark scores from sample records (``benchmark``, ``problem_id``, ``sample_index``, ``correct``).

    Every problem of a benchmark must have the same number of samples n; the
    result per benchmark is :func:`scope_opd.metrics.benchmark_scores` with
    string k keys (JSON), plus ``num_samples`` and ``truncated`` when records
    carry ``finished``.
    """
    grouped: dict[str, dict[str, list[dict]]] = {}
    for record in records:
        grouped.setdefault(record["benchmark"], {}).setdefault(str(record["problem_id"]), []).append(record)
    out: dict[str, dict] = {}
    for benchmark, problems in grouped.items():
        sizes = {len(samples) for samples in problems.values()}
        if len(sizes) != 1:
            raise ValueError(f"benchmark {benchmark!r}: problems have different sample counts {sorted(sizes)}")
        n = sizes.pop()
        counts = [sum(bool(s["correct"]) for s in samples) for samples in problems.values()]
        wanted = list(ks) if ks is not None else default_ks(n)
        too_big = [k for k in wanted if k > n]
        if too_big:
            raise ValueError(f"k = {too_big} > n = {n} samples per problem for {benchmark!r}")
        scores = benchmark_scores(counts, n, wanted)
        scores["pass"] = {str(k): v for k, v in scores["pass"].items()}
        scores["num_samples"] = sum(len(s) for s in problems.values())
        finished = [s["finished"] for samples in problems.values() for s in samples if "finished" in s]
        if finished:
            scores["truncated"] = 1.0 - sum(map(bool, finished)) / len(finished)
        out[benchmark] = scores
    return out


# --- the run ----------------------------------------------------------------------------------


def evaluate_model(
    model,
    problem_sets: ProblemSet | Sequence[ProblemSet],
    *,
    tokenizer=None,
    settings: SamplingSettings = PAPER_SAMPLING,
    ks: Sequence[int] | None = None,
    backend: str = "transformers",
    dtype: str = "auto",
    device: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
    verifier_timeout_s: float = 10.0,
    verifier_workers: int = 4,
) -> EvalResult:
    """Sample ``settings.n`` completions per problem, verify them, and score each problem set.

    ``model`` is a loaded causal LM (then ``tokenizer`` is required) or a hub id /
    local path (loaded with ``dtype`` on ``device``; the only form the vLLM
    backend takes). ``ks`` defaults to 1, 2, 4, ... up to n. Each benchmark is
    sampled with the same seed, so its result does not depend on which other
    benchmarks ran with it.
    """
    sets = [problem_sets] if isinstance(problem_sets, ProblemSet) else list(problem_sets)
    if not sets:
        raise ValueError("no benchmarks to evaluate")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be unique, got {names}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ks = list(ks) if ks is not None else default_ks(settings.n)
    if not ks or any(k < 1 or k > settings.n for k in ks):
        raise ValueError(f"every k must be in [1, n = {settings.n}], got {ks}")

    # Verifiers first: a missing sandbox should fail in a second, not after hours of sampling.
    rewards = {
        s.name: make_reward_function(
            s.verifier, benchmark=s.name, timeout_s=verifier_timeout_s, max_workers=verifier_workers
        )
        for s in sets
    }

    llm = None
    if isinstance(model, (str, Path)):
        model_name = model_name or str(model)
        if backend == "vllm":
            llm = _load_vllm(str(model), dtype=dtype, seed=settings.seed)
        else:
            model, tokenizer = load_model(str(model), dtype=dtype, device=device)
    elif backend == "vllm":
        raise ValueError("the vLLM backend takes a model path or hub id, not a loaded model")
    elif tokenizer is None:
        raise ValueError("pass the tokenizer along with a loaded model")
    if model_name is None:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__

    def generate(prompts: list[str], desc: str):
        if llm is not None:
            return vllm_generate_completions(llm, prompts, settings, progress=progress)
        return generate_completions(model, tokenizer, prompts, settings, progress=progress, desc=desc)

    records: list[dict] = []
    extra: dict[str, dict] = {}
    for problem_set in sets:
        completions = generate([p.prompt for p in problem_set.problems], f"{problem_set.name} (n={settings.n})")
        flat = [(p, i, c) for p, row in zip(problem_set.problems, completions) for i, c in enumerate(row)]
        reward_fn = rewards[problem_set.name]
        scores = reward_fn(
            prompts=[p.prompt for p, _, _ in flat],
            completions=[c.text for _, _, c in flat],
            answer=[p.answer for p, _, _ in flat],
        )
        verifier_label = (
            problem_set.verifier
            if isinstance(problem_set.verifier, str)
            else getattr(problem_set.verifier, "__name__", repr(problem_set.verifier))
        )
        for (problem, index, completion), reward in zip(flat, scores):
            records.append(
                {
                    "benchmark": problem_set.name,
                    "problem_id": problem.id,
                    "sample_index": index,
                    "completion": completion.text,
                    "extracted_answer": extract_answer(completion.text, problem_set.verifier),
                    "correct": bool(reward is not None and reward >= CORRECT_THRESHOLD),
                    "reward": float(reward) if reward is not None else 0.0,
                    "gold": problem.answer if isinstance(problem.answer, (str, int, float)) else None,
                    "num_tokens": completion.num_tokens,
                    "finished": completion.finished,
                }
            )
        reward_fn.close()  # its worker processes
        extra[problem_set.name] = {
            "verifier": verifier_label,
            "source": problem_set.source,
            "verifier_stats": dict(reward_fn.stats),
        }

    scores_by_benchmark = aggregate_records(records, ks)
    for name in names:
        scores_by_benchmark[name].update(extra[name])
    results = {
        "model": model_name,
        "scope_opd_version": __version__,
        "backend": backend,
        "sampling": asdict(settings),
        "ks": ks,
        "benchmarks": {name: scores_by_benchmark[name] for name in names},
        # Other torch / transformers versions give other samples for the same seeds.
        "provenance": provenance(),
    }
    return EvalResult(records=records, results=results)
