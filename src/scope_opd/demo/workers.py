"""Running the jobs: spawned worker processes (:class:`WorkerPool`) and the one-line-per-event progress.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback

from .jobs import Job, JobContext, quiet_libraries, warm_verifier, run_job
from .settings import DemoSettings, log


class Progress:
    """One line per event: run i/N, method, seed, step, and the minutes left at the pace so far.

    The pace counts work units: a training step is one, an evaluation (or the recovery study)
    as many as its measured seconds are worth in steps (a guess of a quarter of the training
    until the first one is measured). Units done over the wall time since the start, across all
    workers, gives the rate.
    """

    def __init__(self, jobs: list[Job], steps: int, workers: int, log=log):
        self.steps = steps
        self.workers = workers
        self.jobs = jobs
        self.log = log
        self.eval_units = max(1.0, steps / 4)
        self.started: float | None = None  # the first job's start: worker start-up is not work done
        self.step_done: dict[Job, int] = {}
        self.finished: set[Job] = set()
        self.runs = sum(j.kind == "train" for j in jobs)
        self._lock = threading.Lock()

    def _units(self, job: Job) -> float:
        return (self.steps if job.kind == "train" else 0) + self.eval_units

    def _done_units(self) -> float:
        return sum(self._units(j) if j in self.finished else self.step_done.get(j, 0) for j in self.jobs)

    def minutes_left(self) -> float:
        done = self._done_units()
        if not done or self.started is None:
            return float("nan")
        total = sum(self._units(j) for j in self.jobs)
        return (time.perf_counter() - self.started) / done * (total - done) / 60

    def _eta(self) -> str:
        left = self.minutes_left()
        return "time left unknown yet" if math.isnan(left) else f"about {left:.1f} min left"

    def _name(self, job: Job) -> str:
        return f"run {job.index}/{self.runs} {job.name} seed {job.seed}" if job.kind == "train" else job.name

    def event(self, kind: str, job: Job, **data) -> None:
        with self._lock:
            if self.started is None:
                self.started = time.perf_counter()
            if kind == "start":
                what = "training" if job.kind == "train" else "evaluating" if job.kind == "eval" else "running"
                self.log(f"{self._name(job)}: {what} ({self._eta()})")
            elif kind == "step":
                self.step_done[job] = data["step"]
                if data.get("show", True):
                    self.log(f"{self._name(job)}: step {data['step']}/{data['steps']} ({self._eta()})")
            elif kind == "done":
                self.finished.add(job)
                seconds = data.get("seconds", {})
                if job.kind == "train" and seconds.get("train"):
                    self.eval_units = max(1.0, seconds.get("eval", 0.0) / (seconds["train"] / self.steps))
                self.log(f"{self._name(job)}: {data.get('summary', 'done')} "
                         f"({sum(seconds.values()):.0f}s; {self._eta()})")


def _worker_main(settings: DemoSettings, jobs, events) -> None:
    """A worker process: import and warm up, then run ``(context, job)`` items from ``jobs`` until None,
    sending events, results and errors to ``events``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    quiet_libraries()
    # What every job imports (torch, transformers, TRL: seconds of CPU), done while the parent
    # builds or checks the toy models.
    from ..analysis import recovery  # noqa: F401
    from ..evaluation import evaluate  # noqa: F401
    from .. import trainer  # noqa: F401

    warm_verifier(settings)

    def report(kind, job, **data):
        events.put((kind, job, data))

    while (item := jobs.get()) is not None:
        ctx, job = item
        try:
            events.put(("result", job, run_job(job, ctx, report)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent, which stops the run
            events.put(("error", job, traceback.format_exc()))
            return


def _job_summary(job: Job, result: dict, k: int) -> str:
    if "result" in result:
        top = result["result"]["benchmarks"]["toy"]
        return f"Avg@{k} {top['avg']:.1%} Pass@{k} {top['pass'][str(k)]:.1%}"
    recovery = result.get("recovery") or {}
    return "skipped" if "skipped" in recovery else "done"


class WorkerPool:
    """Runs jobs in this process (``workers`` 1) or in ``workers`` spawned processes.

    The processes start at construction, so that their imports overlap the toy model build;
    :meth:`run` hands jobs out in list order to whichever worker is free (put the long ones
    first). A job that raises, or a worker that dies, stops the run with an error naming the
    job. Use as a context manager: leaving it stops the processes.
    """

    def __init__(self, workers: int, settings: DemoSettings):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.settings = settings
        self.processes = []
        if workers == 1:
            return
        import multiprocessing

        # spawn, not fork: the parent has run torch (its thread pools do not survive a fork), and
        # a fresh interpreter per worker is the same state however many workers there are.
        context = multiprocessing.get_context("spawn")
        self.jobs, self.events = context.Queue(), context.Queue()
        self.processes = [context.Process(target=_worker_main, args=(settings, self.jobs, self.events),
                                          name=f"scope-demo-worker-{i}") for i in range(workers)]
        for process in self.processes:
            process.start()

    def run(self, jobs: list[Job], ctx: JobContext, progress: Progress) -> dict[Job, dict]:
        results: dict[Job, dict] = {}
        k = ctx.settings.k
        if not self.processes:
            warm_verifier(ctx.settings)
            for job in jobs:
                result = run_job(job, ctx, progress.event)
                results[job] = result
                progress.event("done", job, seconds=result["seconds"], summary=_job_summary(job, result, k))
            return results
        for job in jobs:
            self.jobs.put((ctx, job))
        while len(results) < len(jobs):
            try:
                kind, job, data = self.events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"scope demo: worker {dead[0].name} exited (code {dead[0].exitcode}) "
                                       "before the jobs were done; its job's result is lost (out of memory?)") from None
                continue
            if kind == "error":
                raise RuntimeError(f"scope demo: job {job.label!r} failed in a worker process:\n{data}")
            if kind == "result":
                results[job] = data
                progress.event("done", job, seconds=data["seconds"], summary=_job_summary(job, data, k))
            else:
                progress.event(kind, job, **data)
        return results

    def close(self) -> None:
        """Stops the workers: the end-of-jobs signal to idle ones, SIGTERM to any still busy."""
        for _ in self.processes:
            self.jobs.put(None)
        for process in self.processes:
            process.join(timeout=10)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        self.processes = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # an error or Ctrl-C: do not wait for busy workers to finish their jobs
            for process in self.processes:
                process.terminate()
        self.close()
