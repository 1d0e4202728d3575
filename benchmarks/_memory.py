"""Peak memory of one call, shared by the teacher-memory benchmarks (``bench_teacher_memory.py``, ``bench_topk_scorer.py``).

Peak = the highest resident set (CPU: ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``
just before the call) or the highest allocated CUDA memory, minus what was in use just before the call.
Linux only on CPU. The scripts import it by name: ``python benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

MIB = 2**20

T = TypeVar("T")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_memory_of(device: torch.device, call: Callable[[], T]) -> tuple[T, int, float]:
    """``call()``'s result, its peak memory in bytes above what was in use before it, and its seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes("VmRSS")
        _reset_peak_rss()
    start = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_bytes("VmHWM") - before
    seconds = time.perf_counter() - start
    return result, peak, seconds
