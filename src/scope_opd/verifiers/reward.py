"""Verifiers as TRL reward functions that can neither crash nor hang a training run.

:class:`RewardFunction` runs a verifier on every rollout of a batch in a small pool
of worker processes and turns each failure (the verifier raised, overran
``timeout_s``, or the gold answer is missing or unusable) into a 0.0 score, a
counter in ``.stats``, and one warning per kind of failure.

Why worker processes rather than threads: a Python thread cannot be killed, so
a hung verification would keep its thread, and its share of the GIL, for the
rest of a days-long run; a sympy call stuck in C code (``\\boxed{10^{10^{8}}}``)
holds the GIL outright and would freeze the trainer, timeout logic included;
and a verifier that crashes the interpreter (a C stack overflow in a deep
parse) would take the trainer with it. A worker process that overruns is
SIGKILLed and replaced, which costs one ``fork``; at most ``max_workers``
processes ever exist per :class:`RewardFunction`, so nothing leaks however many
calls hang.

Why ``fork``: workers inherit the verifier itself (closures and lambdas
included, nothing is pickled) and the modules already imported (sympy for the
maths verifier). Workers are forked once and reused across batches; only a
timeout or a crash forks again. PyTorch's DataLoader forks its workers from the
same trainer process; like them, ours never touch CUDA. Each worker freezes the
garbage collector's view of the inherited heap so that collections do not copy
the trainer's pages by touching them. (Python >= 3.12 warns about forking a
multi-threaded process: a lock held by another thread stays locked in the
child. The locks a verifier reaches, the import lock, logging's and malloc's,
are reset after fork by Python and glibc.)

Wall time of a batch: jobs are spread over the workers, so a hung verification
costs ``timeout_s`` on one worker while the others go on; only when every worker
hangs at once does the batch wait a whole ``timeout_s``.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .registry import InvalidGoldError, Verifier, get_verifier

__all__ = ["STAT_KEYS", "RewardFunction", "completion_text", "verify_batch"]

# Failure kinds are also the names of their counters.
STAT_KEYS = ("calls", "errors", "timeouts", "missing_gold", "invalid_gold")
_FAILURE_DESCRIPTIONS = {
    "errors": "the verifier failed",
    "timeouts": "a verification overran the time limit and its worker process was killed",
    "missing_gold": "the gold answer is missing (no such column, None, NaN or empty)",
    "invalid_gold": "the gold answer cannot be used",
}
_MAX_DETAIL_CHARS = 300


def completion_text(completion: object) -> str:
    """The text to verify: a string as is; in a conversational completion (a list of
    ``{"role", "content"}`` messages), the last assistant message's content; else ``""``.

    Content given as a list of parts (``[{"type": "text", "text": ...}]``) is joined.
    """
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else completion
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return ""
    return ""


def _is_missing(gold: object) -> bool:
    if gold is None:
        return True
    if isinstance(gold, float) and math.isnan(gold):
        return True
    return isinstance(gold, str) and not gold.strip()


def _short(text: str) -> str:
    """At most ``_MAX_DETAIL_CHARS`` on one line: newlines, terminal escapes and other
    non-printable characters escaped, so that text a program wrote (an exception
    message) cannot forge log lines or run on for megabytes."""
    escaped = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[:_MAX_DETAIL_CHARS])
    if len(text) > _MAX_DETAIL_CHARS or len(escaped) > _MAX_DETAIL_CHARS:
        escaped = escaped[: _MAX_DETAIL_CHARS - 3] + "..."
    return escaped


def _verify_one(verifier: Verifier, completion: str, gold: object) -> tuple[str, float | str]:
    """``("ok", score)`` or ``(failure kind, detail)``; runs inside a worker process."""
    try:
        score = verifier(completion, gold)
    except InvalidGoldError as error:
        return "invalid_gold", _short(str(error))
    except Exception as error:
        return "errors", _short(f"{type(error).__name__}: {error}")
    try:
        score = float(score)
    except (TypeError, ValueError):
        return "errors", f"the verifier returned {type(score).__name__}, not a number"
    if not 0.0 <= score <= 1.0:  # NaN fails this too
        return "errors", f"the verifier returned {score!r}, outside [0, 1]"
    return "ok", score


def _serve(verifier: Verifier, connection, inherited_connections: list) -> None:
    """Worker process main loop: verify jobs from ``connection`` until the parent closes it."""
    # Parent-side ends of earlier workers' pipes, inherited by fork: holding them
    # open would keep those workers from seeing EOF if the trainer died.
    for inherited in inherited_connections:
        inherited.close()
    gc.freeze()
    # Ctrl-C is for the trainer; it then kills us, or we see EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job_id, completion, gold = connection.recv()
        except (EOFError, OSError):
            return
        connection.send((job_id, *_verify_one(verifier, completion, gold)))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection


class _VerifierProcessPool:
    """At most ``size`` forked processes running ``verifier``; a process that overruns is killed and replaced."""

    def __init__(self, verifier: Verifier, size: int):
        self._verifier = verifier
        self._size = size
        self._workers: list[_Worker] = []
        self._context = multiprocessing.get_context("fork")

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        inherited = [worker.connection for worker in self._workers] + [parent_end]
        process = self._context.Process(
            target=_serve, args=(self._verifier, child_end, inherited), name="scope-verifier", daemon=True
        )
        process.start()
        child_end.close()
        worker = _Worker(process, parent_end)
        self._workers.append(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.connection.close()

    def run(self, jobs: Sequence[tuple[str, object]], timeout_s: float) -> list[tuple[str, float | str]]:
        """``_verify_one``'s result for each ``(completion, gold)``, or ``("timeouts", ...)``."""
        for worker in [worker for worker in self._workers if not worker.process.is_alive()]:
            self._discard(worker)
        while len(self._workers) < min(self._size, len(jobs)):
            self._start_worker()
        idle = list(self._workers)
        queue = deque(range(len(jobs)))
        busy: dict[multiprocessing.connection.Connection, tuple[_Worker, int, float]] = {}
        results: list[tuple[str, float | str] | None] = [None] * len(jobs)
        while queue or busy:
            while queue and idle:
                worker, job_id = idle.pop(), queue.popleft()
                try:
                    worker.connection.send((job_id, *jobs[job_id]))
                except Exception as error:  # unpicklable gold, or a worker that died while idle
                    results[job_id] = ("errors", _short(f"cannot send the job to a worker: {error!r}"))
                    if worker.process.is_alive():
                        idle.append(worker)
                    else:
                        self._discard(worker)
                        idle.append(self._start_worker())
                    continue
                busy[worker.connection] = (worker, job_id, time.monotonic() + timeout_s)
            if not busy:
                continue
            next_deadline = min(deadline for _, _, deadline in busy.values())
            ready = multiprocessing.connection.wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic()))
            for connection in ready:
                worker, job_id, _ = busy.pop(connection)
                try:
                    answered_id, kind, value = connection.recv()
                except (EOFError, OSError):
                    worker.process.join()
                    results[job_id] = ("errors", f"the worker process died (exit code {worker.process.exitcode})")
                    self._discard(worker)
                    idle.append(self._start_worker())
                    continue
                assert answered_id == job_id, (answered_id, job_id)
                results[job_id] = (kind, value)
                idle.append(worker)
            now = time.monotonic()
            for connection, (worker, job_id, deadline) in list(busy.items()):
                if deadline <= now:
                    del busy[connection]
                    results[job_id] = ("timeouts", f"no result after {timeout_s:g} s")
                    self._discard(worker)
                    idle.append(self._start_worker())
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in list(self._workers):
            self._discard(worker)


class RewardFunction:
    """A verifier as a TRL reward function: ``reward(prompts, completions, **kwargs) -> list[float]``.

    Gold answers come from ``kwargs[answer_field]`` (TRL passes a dataset's extra
    columns this way), aligned with ``completions``. Every rollout gets a score in
    ``[0, 1]``; a verification that raises, runs past ``timeout_s``, or has a
    missing/unusable gold scores 0.0 instead and is counted in :attr:`stats`, with
    one ``RuntimeWarning`` the first time each kind of failure happens.

    Calls are thread-safe; concurrent calls run one after another. A hung
    verification costs ``timeout_s`` of one worker, while the others keep going.

    Args:
        verifier: anything :func:`~scope_opd.verifiers.registry.get_verifier` accepts.
        answer_field: name of the keyword argument holding the gold answers.
        timeout_s: wall-clock limit per verification, seconds. For ``"code"``, keep
            it above the sandbox's own ``wall_time_s`` (8 s by default), so a slow
            program scores 0 as a wrong answer, not as a verifier timeout.
        max_workers: worker processes (forked on the first call, then reused).
        name: ``__name__``, which TRL uses to label the reward in logs; by default
            the verifier's name.

    Attributes:
        stats: running totals since construction, keys :data:`STAT_KEYS`:
            ``calls`` (rollouts scored), ``errors``, ``timeouts``, ``missing_gold``,
            ``invalid_gold``.
    """

    def __init__(
        self,
        verifier: str | Verifier,
        *,
        answer_field: str = "answer",
        timeout_s: float = 10.0,
        max_workers: int = 4,
        name: str | None = None,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.verifier = get_verifier(verifier)
        self.answer_field = answer_field
        self.timeout_s = float(timeout_s)
        self.__name__ = name or (verifier if isinstance(verifier, str) else getattr(verifier, "__name__", "verifier"))
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._stats_at_last_delta = dict(self.stats)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._pool = _VerifierProcessPool(self.verifier, max_workers)
        # Kills the workers when this object is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self._pool.close)

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        """TRL's reward-function signature; ``prompts`` and other keyword arguments are ignored."""
        texts = [completion_text(completion) for completion in completions or []]
        golds = kwargs.get(self.answer_field)
        if golds is None:
            golds = [None] * len(texts)
        return self.score(texts, list(golds))

    def score(self, completions: Sequence[str], golds: Sequence[object]) -> list[float]:
        """Score of each completion text against its gold answer (failures score 0.0)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        with self._lock:
            self.stats["calls"] += len(completions)
            scores = [0.0] * len(completions)
            to_verify = []
            for index, gold in enumerate(golds):
                if _is_missing(gold):
                    self._record_failure("missing_gold", f"answer field {self.answer_field!r} is {gold!r}")
                else:
                    to_verify.append(index)
            outcomes = self._pool.run([(completions[i], golds[i]) for i in to_verify], self.timeout_s)
            for index, (kind, value) in zip(to_verify, outcomes):
                if kind == "ok":
                    scores[index] = value
                else:
                    self._record_failure(kind, value)
            return scores

    def _record_failure(self, kind: str, detail: str) -> None:
        self.stats[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"reward {self.__name__!r}: {_FAILURE_DESCRIPTIONS[kind]} ({detail}); that rollout scored 0.0. "
                f"Further cases are counted in .stats[{kind!r}] without another warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    def stats_delta(self) -> dict[str, int]:
        """Counter increments since the previous ``stats_delta()`` (or construction), for per-step logging."""
        with self._lock:
            delta = {key: self.stats[key] - self._stats_at_last_delta[key] for key in STAT_KEYS}
            self._stats_at_last_delta = dict(self.stats)
            return delta

    def close(self) -> None:
        """Stops the worker processes now; they also stop when this object is collected.

        Score nothing afterwards: a later call would fork new workers, which only
        multiprocessing's exit handler would stop.
        """
        self._finalizer()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, answer_field={self.answer_field!r}, timeout_s={self.timeout_s:g})"


def verify_batch(
    verifier: str | Verifier,
    completions: Sequence[object],
    golds: Sequence[object],
    *,
    timeout_s: float = 10.0,
    max_workers: int = 4,
) -> list[float]:
    """Scores of ``completions`` (strings or conversational) against ``golds``, with
    :class:`RewardFunction`'s timeouts and failure handling, in a pool made for this call."""
    with RewardFunction(verifier, timeout_s=timeout_s, max_workers=max_workers) as reward:
        return reward.score([completion_text(completion) for completion in completions], list(golds))
