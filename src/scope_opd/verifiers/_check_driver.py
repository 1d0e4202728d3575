"""Runs a trusted ``check(candidate)`` against answers the sandbox already gave; no candidate code here.

Executed by :mod:`scope_opd.verifiers.trusted_check` as ``python -s -S -c <this
source>`` in a fresh interpreter (never imported by the package), with
``PYTHONHASHSEED=0`` so that sets iterate the same way on every run. Standard
library only.

The job arrives on stdin as one JSON line: ``{"setup": [source, ...],
"check": name, "fn_name": name, "memory_mb": int}``.
``setup`` is trusted source (a problem's prompt helpers, its test) run in one
namespace, where ``fn_name`` is then bound to a stand-in for the candidate, and
``check`` is called with it. Its asserts are rewritten so that a run with a
pending call goes on past a failed one (:class:`SoftAsserts`). Each call's arguments are
turned into a key (tagged JSON, see ``to_tagged``); ``known`` maps keys to what
the real candidate did in the sandbox, sent as JSON lines ``[[key, outcome], ...]``
between runs: ``{"returned": tagged value}`` or
``{"error": text}``. A known call returns that value, rebuilt here from plain
built-in types, or raises :class:`CandidateError`; an unknown one is recorded
as pending and returns a :class:`Pending` placeholder so that the check can go
on and reveal its other calls.

Each run of the check writes one JSON line to stdout: ``{"passed": bool,
"error": str, "pending": [key, ...], "unsupported": str | None}``; the driver
then waits for the outcomes of the pending calls and runs the check again,
until a run has none. ``passed`` is only ever true for a
run in which no call was pending, so a placeholder never decides a verdict.
"""

import ast
import builtins
import json
import random
import resource
import sys

MAX_ERROR_CHARS = 300
MAX_CALLS = 100000


class CandidateError(Exception):
    """The candidate raised this (in the sandbox) for these arguments."""


def candidate_error(outcome):
    """The exception a known failed call raises in the check: a CandidateError, and an instance of the
    built-in exception class the candidate raised where the sandbox named one."""
    text, name = str(outcome["error"]), outcome.get("raised")
    builtin = getattr(builtins, name, None) if type(name) is str else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return type(name, (CandidateError, builtin), {})(text)
        except Exception:  # a class that cannot be combined or built from one message
            pass
    return CandidateError(text)


class Unsupported(BaseException):
    """The check passed the candidate something that cannot be sent to the sandbox."""


class DependsOnPending(Exception):
    pass


class Pending:
    """Stands in for an answer not known yet. It passes every comparison, so that
    the check continues and reveals its further calls; the run it appears in never
    gives a verdict."""

    def __init__(self):
        pass

    def _self(self, *args, **kwargs):
        return self

    def _true(self, *args):
        return True

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = __bool__ = _true
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _self
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = _self
    __abs__ = __round__ = __getitem__ = __call__ = __and__ = __or__ = __xor__ = __invert__ = _self

    def __getattr__(self, name):
        return self

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __hash__(self):
        return 0

    def __int__(self):
        return 0

    __index__ = __int__

    def __float__(self):
        return 0.0

    def __str__(self):
        return ""


CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def to_tagged(value, depth=0):
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is Pending:
        raise DependsOnPending()
    if depth > 100:
        raise Unsupported("an argument nested more than 100 deep")
    if kind in (list, tuple, set, frozenset):
        return {kind.__name__: [to_tagged(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[to_tagged(key, depth + 1), to_tagged(item, depth + 1)] for key, item in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise Unsupported("an argument of type %s.%s" % (kind.__module__, kind.__qualname__))


def from_tagged(value, depth=0):
    """A value from the sandbox, rebuilt only from exact built-in types; ValueError if it is not well formed."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if depth > 100 or kind is not dict or len(value) != 1:
        raise ValueError("not a tagged plain value")
    ((tag, items),) = value.items()
    if tag in CONTAINERS and type(items) is list:
        return CONTAINERS[tag](from_tagged(item, depth + 1) for item in items)
    if tag == "dict" and type(items) is list:
        result = {}
        for pair in items:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("a dict item is not a [key, value] pair")
            result[from_tagged(pair[0], depth + 1)] = from_tagged(pair[1], depth + 1)
        return result
    if tag == "bytes" and type(items) is str:
        return bytes.fromhex(items)
    if tag == "complex" and type(items) is list and len(items) == 2 and all(type(x) is float for x in items):
        return complex(items[0], items[1])
    raise ValueError("unknown tag %r" % (tag,))


class SoftAsserts(ast.NodeTransformer):
    """``assert test, message`` becomes ``if not test: assert_failed(message)``: the same in a run
    without pending calls, but a run that is only finding calls goes on past a failed assert."""

    def visit_Assert(self, node):
        self.generic_visit(node)
        call = ast.Call(func=ast.Name(id=ASSERT_FAILED, ctx=ast.Load()), args=[node.msg] if node.msg else [],
                        keywords=[])
        replacement = ast.If(test=ast.UnaryOp(op=ast.Not(), operand=node.test), body=[ast.Expr(value=call)], orelse=[])
        return ast.copy_location(replacement, node)


ASSERT_FAILED = "__scope_check_assert_failed__"


def describe(error):
    return ("%s: %s" % (type(error).__name__, error))[:MAX_ERROR_CHARS]


def run_check(job, trees, known):
    """One run of the check: {"passed", "error", "pending", "unsupported"}."""
    pending = {}
    calls = [0]
    unrebuilt = []

    def candidate(*args, **kwargs):
        calls[0] += 1
        if calls[0] > MAX_CALLS:
            raise Unsupported("more than %d calls of the candidate" % MAX_CALLS)
        if kwargs:
            raise Unsupported("keyword arguments")
        try:
            key = json.dumps(to_tagged(list(args)), sort_keys=True)
        except DependsOnPending:  # arguments made from an answer not known yet: the next round asks
            return Pending()
        outcome = known.get(key)
        if outcome is None:
            pending[key] = None  # a dict: ordered, and each call asked once
            return Pending()
        if "error" in outcome:
            raise candidate_error(outcome)
        try:
            return from_tagged(outcome["returned"])
        except (ValueError, TypeError, KeyError, RecursionError) as error:
            # Fails the run whatever the check catches: not an exception of the candidate's.
            unrebuilt.append("a return value could not be rebuilt: %s" % describe(error))
            raise CandidateError(unrebuilt[-1])

    def assert_failed(*message):
        if not pending:
            raise AssertionError(*message)

    random.seed(0)  # checks that draw random inputs without a seed ask the same calls on every run
    namespace = {"__name__": "__check__", ASSERT_FAILED: assert_failed}
    passed, error, unsupported = False, "", None
    try:
        for index, tree in enumerate(trees):
            exec(compile(tree, "setup_%d.py" % index, "exec"), namespace)
        # A check may call the function by its own name too (HumanEval/33 does): that is the candidate as well.
        namespace[job["fn_name"]] = candidate
        namespace[job["check"]](candidate)
        passed = True
    except Unsupported as reason:
        unsupported = str(reason)
    except BaseException as failure:
        error = describe(failure)
    if unrebuilt:
        passed, error = False, unrebuilt[0]
    return {"passed": passed and not pending, "error": error, "pending": list(pending), "unsupported": unsupported}


def main():
    job = json.loads(sys.stdin.readline())
    memory = int(job["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    trees = [ast.fix_missing_locations(SoftAsserts().visit(ast.parse(source, "setup_%d.py" % index)))
             for index, source in enumerate(job["setup"])]
    known = {}
    while True:
        result = run_check(job, trees, known)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["pending"] or result["unsupported"] is not None:
            return
        line = sys.stdin.readline()  # the sandbox's outcomes of the pending calls: [[key, outcome], ...]
        if not line:
            return
        known.update((key, outcome) for key, outcome in json.loads(line))


if __name__ == "__main__":
    main()
