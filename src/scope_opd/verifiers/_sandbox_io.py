"""What goes into a sandboxed run and what comes back: the job file, the three pipes, the records.

Part of :mod:`scope_opd.verifiers.sandbox` (read its docstring first). The
parent reads the run's results, stderr and pid 1's control pipe within one
byte budget, and parses the records one line at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


# How many JSON values (containers and items) the records of one run may hold once parsed. Parsed,
# "[]," (3 bytes) is a 64-byte list: within the output budget alone, 64 MiB of them took 1.5 GiB
# of the verifier's memory. 2**20 values cost at most about 75 MiB; a return value that needs more
# is an error for its test.
MAX_RECORD_VALUES = 1 << 20
# How the errors of a return value that could not come back start (the harness writes "return value is
# not JSON" / "not a plain value"): no exception's description does ("TypeName: ..."), so they are told
# apart from exceptions the program raised.
RETURN_VALUE_ERROR_PREFIX = "return value is "
# The start of the harness's own record of a test that ran (json.dumps of its dict, in this order).
_RECORD_START = re.compile(rb'\{"test": (\d+), "status": "ok", "error": "", ')
_STDOUT_KEY = b'"stdout": '


def _value_count(line: bytes) -> int:
    """An upper bound on the JSON values in ``line``: each container opens with [ or {, each further item
    follows a comma (separators inside strings count too, which only over-estimates)."""
    return line.count(b"[") + line.count(b"{") + line.count(b",") + 1


def _parse_stdout_record(line: bytes) -> dict | None:
    """The harness's record of a stdin/stdout test that ran, parsed as its one string, or None if ``line``
    does not have exactly that shape (whatever else the line holds is then never parsed)."""
    match = _RECORD_START.match(line)
    if match is None or not line.endswith(b"}") or not line.startswith(_STDOUT_KEY, match.end()):
        return None
    try:
        stdout = json.loads(line[match.end() + len(_STDOUT_KEY) : -1])
    except (ValueError, RecursionError):
        return None
    if not isinstance(stdout, str):
        return None
    return {"test": int(match.group(1)), "status": "ok", "error": "", "stdout": stdout}


def _parse_records(raw: bytes | bytearray, n_tests: int | None = None) -> tuple[dict[int, dict], int]:
    """(test index -> record, malformed line count), from the results pipe.

    The last record per test wins: the harness writes a test's record after that
    test's code has run, so it overrides anything the code wrote. A line that is
    not a valid test record (garbage, JSON nested too deeply to parse, or a
    supervisor or set-up record, which only pid 1 sends, on its own pipe) is
    counted and ignored, and so is a record of a test index outside ``range(n_tests)``.

    Memory: the records hold at most :data:`MAX_RECORD_VALUES` JSON values (a
    stdout is one string, however long). A line past that is not parsed: a
    record of the harness's shape becomes an error of its test, any other line
    is malformed.
    """
    records: dict[int, dict] = {}
    malformed = 0
    values_left = MAX_RECORD_VALUES
    start = 0
    while start < len(raw):
        # One line at a time (the harness escapes newlines inside a record): never a second copy of all of it.
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        line_bytes = bytes(memoryview(raw)[start:end])
        start = end + 1
        if not line_bytes.strip():
            continue
        record = _parse_stdout_record(line_bytes)
        if record is None:
            values = _value_count(line_bytes)
            if values > values_left:
                match = re.match(rb'\{"test": (\d+), "status": "ok", ', line_bytes)
                if match is None:
                    malformed += 1
                    continue
                record = {"test": int(match.group(1)), "status": "error",
                          "error": f"{RETURN_VALUE_ERROR_PREFIX}too large: its record holds more than the "
                          f"{MAX_RECORD_VALUES} JSON values all records of a run may hold"}
            else:
                values_left -= values
        try:
            if record is None:
                record = json.loads(line_bytes.decode("utf-8", errors="replace"))
            index = int(record["test"])
            record["status"], record["error"] = str(record["status"]), str(record.get("error", ""))
            if not isinstance(record.get("stdout", ""), str):
                raise TypeError("stdout is not a string")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            malformed += 1
            continue
        if n_tests is not None and not -1 <= index < n_tests:
            malformed += 1
            continue
        records[index] = record
        del record, line_bytes
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
