"""What goes into a sandboxed run and what comes back: the job file, the three pipes, the records.

Part of :mod:`scope_opd.verifiers.sandbox` (read its docstring first). The
parent reads the run's results, stderr and pid 1's control pipe within one
byte budget, and parses the records one line at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import tempfile
import time
from typing import Iterator

_STDERR_TAIL_CHARS = 2000
# pid 1's control pipe carries at most a set-up error or a supervisor record.
_CONTROL_MAX_BYTES = 64 * 1024


def _stdin_bytes(test_input: object) -> int:
    if isinstance(test_input, list):
        return sum(len(str(line).encode()) + 1 for line in test_input)
    return len(str(test_input).encode())


class _Output:
    """What the parent reads back from a run, within one byte budget for all of it.

    Three pipes: ``results`` (the harness's test records, which the program can
    also write to), ``stderr``, and ``control``: pid 1's own records (set-up
    errors, why it ended the run), a pipe the harness child closes before any
    program code runs, so nothing the program writes is read as one.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.results = bytearray()
        self.control = bytearray()
        self.stderr_tail = b""
        self.total = 0
        self.over_budget = False

    def add(self, stream: str, chunk: bytes) -> None:
        if stream == "control":  # written only by pid 1, a few short records
            self.control += chunk[: max(0, _CONTROL_MAX_BYTES - len(self.control))]
            return
        self.total += len(chunk)
        if self.total > self.budget_bytes:
            self.over_budget = True
            return
        if stream == "stderr":
            self.stderr_tail = (self.stderr_tail + chunk)[-4 * _STDERR_TAIL_CHARS :]
        else:
            self.results += chunk


def _communicate(process: subprocess.Popen, output: _Output, deadline: float, control_fd: int | None = None) -> bool:
    """Reads the run's stdout, stderr and control pipes until all close, or until the process exits and
    what it wrote is drained (without a pid namespace, a process that left the group can hold
    the pipes open); False at the deadline or over the budget."""
    streams = {process.stdout.fileno(): "results", process.stderr.fileno(): "stderr"}
    if control_fd is not None:
        streams[control_fd] = "control"
    poller = select.poll()
    for fd in streams:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    exited = False
    while streams:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return False
        ready = poller.poll(max(1, int(min(left_s, 0.05) * 1000)))
        if not ready and exited:
            return True  # drained: nothing more since the process exited
        for fd, _ in ready:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                poller.unregister(fd)
                del streams[fd]
                continue
            output.add(streams[fd], chunk)
            if output.over_budget:
                return False
        exited = exited or process.poll() is not None
    return True


def _parse_control(raw: bytes) -> tuple[dict | None, str | None]:
    """(supervisor record, set-up error) from pid 1's control pipe, which only pid 1 can write to."""
    supervisor, setup_error = None, None
    for line in raw.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError, RecursionError):
            record = json.loads(line)
            if "setup_error" in record:
                setup_error = str(record["setup_error"])
            elif "supervisor" in record:
                supervisor = {"supervisor": str(record["supervisor"]), "error": str(record["error"])}
    return supervisor, setup_error


def _parse_records(raw: bytes | bytearray) -> tuple[dict[int, dict], int]:
    """(test index -> record, malformed line count), from the results pipe.

    The last record per test wins: the harness writes a test's record after that
    test's code has run, so it overrides anything the code wrote. A line that is
    not a valid test record (garbage, JSON nested too deeply to parse, or a
    supervisor or set-up record, which only pid 1 sends, on its own pipe) is
    counted and ignored.
    """
    records: dict[int, dict] = {}
    malformed = 0
    start = 0
    while start < len(raw):
        # One line at a time (the harness escapes newlines inside a record): never a second copy of all of it.
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        line = raw[start:end].decode("utf-8", errors="replace")
        start = end + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index = int(record["test"])
            record["status"], record["error"] = str(record["status"]), str(record.get("error", ""))
            if not isinstance(record.get("stdout", ""), str):
                raise TypeError("stdout is not a string")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            malformed += 1
            continue
        records[index] = record
    return records, malformed


@contextlib.contextmanager
def _job_file(data: bytes) -> Iterator[object]:
    """An unlinked file holding ``data``, for the run's stdin: the job reaches the sandbox without
    a path on the host. In memory (memfd) where available, else a temporary file."""
    if hasattr(os, "memfd_create"):
        job_file = os.fdopen(os.memfd_create("scope-sandbox-job", os.MFD_CLOEXEC), "w+b")
    else:
        job_file = tempfile.TemporaryFile()
    with job_file:
        job_file.write(data)
        job_file.seek(0)
        yield job_file
