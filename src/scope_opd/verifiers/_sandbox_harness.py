"""Runs one untrusted program on its test inputs, inside the sandbox.

Copied into the sandbox's working directory and executed there by
:mod:`scope_opd.verifiers.sandbox` (``python -I -B harness.py``); never imported
by the package. It must run on whatever Python 3.8+ the sandbox uses, so it has
no dependency beyond the standard library.

Files in the working directory (written by the parent before start):
  job.json        {"fn_name": str|null, "n_tests": int, "time_per_test_s": float,
                   "limits": {...}, "stop_at_first_error": bool}
  solution.py     the program
  stdin_<i>.txt   input of test i (stdin/stdout style)
  args.json       list of argument lists, one per test (function-call style)
Files it writes:
  stdout_<i>.txt  what the program printed on test i
  results.jsonl   one line per test run: {"test": i, "status": "ok"|"error"|"timeout",
                  "error": str, "returned": JSON value (function-call style)}

The program runs in this process, so it can tamper with this harness and its
files; that is why the expected outputs never enter the sandbox. The parent
compares outputs, so tampering can break the program's own run, or report
outputs it could as well have printed, but cannot reveal what the right ones are.
"""

import builtins
import io
import json
import os
import resource
import signal
import socket
import sys

MAX_ERROR_CHARS = 500


class _TestTimeLimit(BaseException):
    """Raised by SIGALRM when one test overruns; BaseException so `except Exception` in user code misses it."""


def _on_alarm(signum, frame):
    raise _TestTimeLimit()


def _set_limits(limits):
    """Kernel limits on this process and everything it starts. Lowering is always allowed; raising back is not."""
    mib = 1024 * 1024
    cpu_s, memory, file_size = int(limits["cpu_time_s"]), int(limits["memory_mb"] * mib), int(limits["max_file_mb"] * mib)
    processes, open_files = int(limits["max_processes"]), int(limits["max_open_files"])
    wanted = [
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_FSIZE, file_size, file_size),
        (resource.RLIMIT_NPROC, processes, processes),
        (resource.RLIMIT_NOFILE, open_files, open_files),
        (resource.RLIMIT_CORE, 0, 0),  # a core dump after SIGXCPU would be a large file
    ]
    for kind, soft, hard in wanted:
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _block_network():
    """Second layer behind the network namespace: refuse to create non-Unix sockets.

    Bypassable (``_socket``, ctypes); it exists for hosts where no network
    namespace can be made, and to make the failure message obvious.
    """
    real_socket = socket.socket

    class NoNetworkSocket(real_socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = NoNetworkSocket


def _describe(error):
    try:
        text = "%s: %s" % (type(error).__name__, error)
    except BaseException:  # a hostile __str__
        text = type(error).__name__
    return text[:MAX_ERROR_CHARS]


def _run_timed(action, seconds):
    """(status, error, value) of ``action()`` under a per-test wall-clock alarm."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            return "ok", "", action()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _TestTimeLimit:
        return "timeout", "exceeded %gs" % seconds, None
    except SystemExit as exit_:
        # sys.exit() / exit() with status 0 is a normal way for a script to end.
        if exit_.code in (None, 0):
            return "ok", "", None
        return "error", "SystemExit(%r)" % (exit_.code,), None
    except BaseException as error:
        return "error", _describe(error), None


def _redirect(fd, path, flags):
    new_fd = os.open(path, flags, 0o600)
    os.dup2(new_fd, fd)
    os.close(new_fd)


def _stdio_test(code, index, seconds, workdir):
    # Real file descriptors, not StringIO, so open(0), sys.stdin.buffer and
    # os.write(1, ...) all work as they would in a judge.
    _redirect(0, os.path.join(workdir, "stdin_%d.txt" % index), os.O_RDONLY)
    _redirect(1, os.path.join(workdir, "stdout_%d.txt" % index), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    status, error, _ = _run_timed(lambda: exec(code, namespace), seconds)
    try:
        sys.stdout.flush()
    except BaseException as flush_error:  # output over the file-size limit, or a closed stdout
        if status == "ok":
            status, error = "error", _describe(flush_error)
    return {"test": index, "status": status, "error": error}


def _call_test(code, fn_name, args, index, seconds):
    # Not "__main__": a function-style solution's own `if __name__ == "__main__":` demo must not run.
    namespace = {"__name__": "solution", "__builtins__": builtins}

    def call():
        exec(code, namespace)
        function = namespace.get(fn_name)
        if function is None and "Solution" in namespace:  # LeetCode style: a method of class Solution
            function = getattr(namespace["Solution"](), fn_name)
        if function is None:
            raise NameError("the program defines no %r" % fn_name)
        return function(*args) if isinstance(args, list) else function(args)

    status, error, returned = _run_timed(call, seconds)
    record = {"test": index, "status": status, "error": error}
    if status == "ok":
        try:
            record["returned"] = json.loads(json.dumps(returned))
        except Exception as json_error:  # not JSON, too deep, or too large for the memory limit
            record.update(status="error", error="return value is not JSON: %s" % _describe(json_error))
    return record


def _die_with_parent():
    """SIGKILL this process when the parent that started it dies, so a killed verifier leaves no sandbox behind.

    Set here, after the uid change (which clears it), not by the parent.
    """
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's process-group kill remains
        pass


def main():
    # Absolute paths: the program may chdir.
    workdir = os.getcwd()
    with open(os.path.join(workdir, "job.json"), encoding="utf-8") as job_file:
        job = json.load(job_file)
    seconds = job["time_per_test_s"]
    _die_with_parent()
    _set_limits(job["limits"])
    # Refuse rather than run unbounded: the kernel never applies RLIMIT_NPROC to uid 0.
    if os.geteuid() == 0:
        raise SystemExit("sandbox harness refuses to run user code as root")
    # Over the file-size limit, a write then fails with EFBIG instead of killing the harness.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _block_network()
    sys.dont_write_bytecode = True
    harness_pid = os.getpid()
    results = open(os.path.join(workdir, "results.jsonl"), "a", encoding="utf-8")
    args_per_test = None
    if job["fn_name"] is not None:
        with open(os.path.join(workdir, "args.json"), encoding="utf-8") as args_file:
            args_per_test = json.load(args_file)
    try:
        with open(os.path.join(workdir, "solution.py"), encoding="utf-8") as source:
            code = compile(source.read(), "solution.py", "exec")
    except BaseException as error:
        results.write(json.dumps({"test": -1, "status": "error", "error": _describe(error)}) + "\n")
        return
    for index in range(job["n_tests"]):
        if args_per_test is None:
            record = _stdio_test(code, index, seconds, workdir)
        else:
            record = _call_test(code, job["fn_name"], args_per_test[index], index, seconds)
        if os.getpid() != harness_pid:
            os._exit(0)  # a fork made by the program returned into the harness: it has no say
        try:
            results.write(json.dumps(record) + "\n")
            results.flush()
        except BaseException:
            return
        if job["stop_at_first_error"] and record["status"] != "ok":
            return


if __name__ == "__main__":
    main()
