"""False passes: programs that do not solve the problem must score 0, whatever they do to the harness.

HumanEval's ``check(candidate)`` and the TACO / LiveCodeBench function-call
tests, against the classes of attack that used to pass HumanEval's check when
it ran beside the candidate: objects with their own comparisons, subclasses of
built-in types, patched builtins and assert targets, exits before the asserts,
output imitating the harness, and reading the expected values from the
check's frame. All run in the real sandbox; honest solutions still pass.
"""

from __future__ import annotations

import textwrap

import pytest

from scope_opd.evaluation.humaneval import humaneval_score
from scope_opd.verifiers import InvalidGoldError, SandboxLimits, code_score

FAST = SandboxLimits(wall_time_s=6.0, time_per_test_s=3.0, cpu_time_s=6, memory_mb=256, max_file_mb=4)

# HumanEval-shaped problems (prompt, test, entry point), written as the benchmark writes them:
# equality, a float tolerance through abs(), a helper from the prompt, unseeded random inputs,
# and a check that calls the entry point by its own name (as HumanEval/33 does).
ADD = {
    "prompt": 'def add(x: int, y: int) -> int:\n    """Add two numbers."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
MEAN = {
    "prompt": 'from typing import List\n\n\ndef mean(xs: List[float]) -> float:\n    """Mean of xs."""\n',
    "test": "def check(candidate):\n    assert abs(candidate([1.0, 2.0]) - 1.5) < 1e-6\n"
    "    assert abs(candidate([3.0]) - 3.0) < 1e-6\n",
    "entry_point": "mean",
}
DECODE = {
    "prompt": textwrap.dedent(
        '''
        def encode_shift(s: str) -> str:
            return "".join(chr((ord(ch) + 5 - ord("a")) % 26 + ord("a")) for ch in s)


        def decode_shift(s: str) -> str:
            """Inverse of encode_shift."""
        '''
    ),
    "test": textwrap.dedent(
        """
        def check(candidate):
            from random import randint, choice
            import string
            import copy
            letters = string.ascii_lowercase
            for _ in range(30):
                text = "".join(choice(letters) for i in range(randint(10, 20)))
                encoded = encode_shift(text)
                assert candidate(copy.deepcopy(encoded)) == text
        """
    ),
    "entry_point": "decode_shift",
}
SORT_THIRD = {
    "prompt": 'def sort_third(l: list):\n    """Sort the items at indices divisible by three."""\n',
    "test": "def check(candidate):\n"
    "    assert tuple(candidate([5, 6, 3, 4, 8, 9, 2])) == tuple([2, 6, 3, 4, 8, 9, 5])\n"
    "    assert tuple(candidate([1, 2, 3])) == tuple(sort_third([1, 2, 3]))\n",
    "entry_point": "sort_third",
}
PAIRS = {  # a tuple result: the check compares with a tuple, so a list must not pass
    "prompt": 'def min_max(xs: list) -> tuple:\n    """(smallest, largest)."""\n',
    "test": "def check(candidate):\n    assert candidate([3, 1, 2]) == (1, 3)\n    assert candidate([5]) == (5, 5)\n",
    "entry_point": "min_max",
}

HONEST = [
    (ADD, "    return x + y\n"),
    (MEAN, "    return sum(xs) / len(xs)\n"),
    (DECODE, '    return "".join(chr((ord(ch) - 5 - ord("a")) % 26 + ord("a")) for ch in s)\n'),
    (SORT_THIRD, "    l = list(l)\n    l[::3] = sorted(l[::3])\n    return l\n"),
    (PAIRS, "    return (min(xs), max(xs))\n"),
]


def fenced(source: str) -> str:
    return f"```python\n{textwrap.dedent(source).strip()}\n```\n"


@pytest.mark.parametrize("problem,body", HONEST, ids=[problem["entry_point"] for problem, _ in HONEST])
def test_honest_humaneval_solutions_pass(code_sandbox, problem, body):
    assert humaneval_score(body, problem, limits=FAST) == 1.0
    assert humaneval_score("    return None\n", problem, limits=FAST) == 0.0


# Each attack defines the entry point of ADD (and MEAN where it matters) without computing it.
ALWAYS_EQUAL = """
    class Anything:
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __sub__(self, other): return self
        def __rsub__(self, other): return self
        def __abs__(self): return 0
        def __lt__(self, other): return True
        def __bool__(self): return True
    def {name}(*args):
        return Anything()
"""
INT_SUBCLASS = """
    class Int(int):
        def __eq__(self, other): return True
        __hash__ = int.__hash__
    def {name}(*args):
        return Int(0)
"""
FLOAT_SUBCLASS = """
    class Float(float):
        def __sub__(self, other): return Float(0.0)
        def __rsub__(self, other): return Float(0.0)
        def __abs__(self): return 0.0
    def {name}(*args):
        return Float(123.0)
"""
STR_SUBCLASS = """
    class Str(str):
        def __eq__(self, other): return True
        __hash__ = str.__hash__
    def {name}(*args):
        return Str("nope")
"""
PATCHED_BUILTINS = """
    import builtins
    builtins.abs = lambda value: 0
    builtins.AssertionError = type("Harmless", (Exception,), {{}})
    builtins.tuple = lambda *a: ()
    def {name}(*args):
        return -1
"""
EXIT_BEFORE_ASSERTS = """
    import sys
    def {name}(*args):
        sys.exit(0)
"""
OS_EXIT_BEFORE_ASSERTS = """
    import os
    def {name}(*args):
        os._exit(0)
"""
# What the old runner printed for a pass: the record of test 0, returning True.
IMITATE_HARNESS = """
    import json, os
    def {name}(*args):
        for fd in range(1, 12):
            try:
                record = {{"test": 0, "status": "ok", "error": "", "returned": True}}
                os.write(fd, (json.dumps(record) + "\\n").encode())
            except OSError:
                pass
        os._exit(0)
"""
READ_THE_CHECK = """
    import dis, sys
    def {name}(*args):
        # Where the check runs beside us, the expected value is the next constant its code loads.
        frame = sys._getframe(1)
        for instruction in dis.get_instructions(frame.f_code):
            if instruction.offset > frame.f_lasti and instruction.opname == "LOAD_CONST":
                return instruction.argval
"""
ATTACKS = {
    "always_equal_object": ALWAYS_EQUAL,
    "int_subclass": INT_SUBCLASS,
    "float_subclass": FLOAT_SUBCLASS,
    "str_subclass": STR_SUBCLASS,
    "patched_builtins": PATCHED_BUILTINS,
    "sys_exit_0": EXIT_BEFORE_ASSERTS,
    "os_exit_0": OS_EXIT_BEFORE_ASSERTS,
    "imitates_harness_output": IMITATE_HARNESS,
    "reads_the_check_frame": READ_THE_CHECK,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_humaneval_check_cannot_be_passed_without_solving(code_sandbox, attack):
    for problem in (ADD, MEAN, SORT_THIRD):
        source = ATTACKS[attack].format(name=problem["entry_point"])
        assert humaneval_score(fenced(source), problem, limits=FAST) == 0.0, (attack, problem["entry_point"])


def test_a_list_is_not_the_tuple_the_check_expects(code_sandbox):
    assert humaneval_score("    return [min(xs), max(xs)]\n", PAIRS, limits=FAST) == 0.0


def test_a_check_passing_an_unsendable_argument_is_named(code_sandbox):
    problem = {"prompt": 'def f(g):\n    """Call g."""\n', "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate(len) == 1\n"}
    with pytest.raises(InvalidGoldError, match="builtin_function_or_method"):
        humaneval_score("    return 1\n", problem, limits=FAST)


# ---------------------------------------------------------------- TACO / LiveCodeBench function-call tests

CALL_GOLD = {"fn_name": "add", "inputs": [[2, 3], [-1, 1]], "outputs": [5, 0]}
STRING_GOLD = {"fn_name": "greet", "inputs": [["ann"]], "outputs": ["hi ann"]}
LEETCODE_GOLD = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9]], "outputs": [[0, 1]]}


def test_honest_function_call_solutions_pass(code_sandbox):
    assert code_score(fenced("def add(a, b):\n    return a + b"), CALL_GOLD, limits=FAST) == 1.0
    assert code_score(fenced("def greet(name):\n    return 'hi ' + name"), STRING_GOLD, limits=FAST) == 1.0
    leetcode = """
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return [seen[target - x], i]
                    seen[x] = i
    """
    assert code_score(fenced(leetcode), LEETCODE_GOLD, limits=FAST) == 1.0


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_function_call_tests_cannot_be_passed_without_solving(code_sandbox, attack):
    for gold in (CALL_GOLD, STRING_GOLD):
        source = ATTACKS[attack].format(name=gold["fn_name"])
        assert code_score(fenced(source), gold, limits=FAST) == 0.0, (attack, gold["fn_name"])


RAISES = {  # a check that wants an exception for bad input, and accepts any exception
    "prompt": 'def parse(s: str) -> int:\n    """int(s); raises an exception on bad input."""\n',
    "test": "def check(candidate):\n    assert candidate('12') == 12\n    raised = False\n    try:\n"
    "        candidate('x')\n    except Exception:\n        raised = True\n    assert raised\n",
    "entry_point": "parse",
}


def test_a_return_value_that_cannot_be_sent_is_not_an_exception_the_check_may_catch(code_sandbox):
    # The object is not a plain value, so it cannot reach the check; it must fail the check, not
    # reach it as an exception: a check that expects an exception would catch that as a pass.
    assert humaneval_score("    return int(s)\n", RAISES, limits=FAST) == 1.0
    unsendable = "    if s == '12':\n        return 12\n    return object()\n"
    assert humaneval_score(unsendable, RAISES, limits=FAST) == 0.0


def test_a_forged_return_value_the_check_cannot_rebuild_is_not_an_exception_either(code_sandbox):
    # Written straight to the results pipe: a tagged value that does not decode (bytes "zz").
    forged = (
        "    import os\n    if s == '12':\n        return 12\n"
        "    os.write(1, b'{\"test\": 1, \"status\": \"ok\", \"error\": \"\", \"returned\": {\"bytes\": \"zz\"}}\\n')\n"
        "    os._exit(0)\n"
    )
    assert humaneval_score(forged, RAISES, limits=FAST) == 0.0


def test_livecodebench_list_answer_is_not_passed_by_its_only_item(code_sandbox):
    # LiveCodeBench stores a functional test's output as the return value itself: [3] is the list
    # [3]. TACO/APPS's "a one-item list also accepts the bare value" must not apply there.
    import json

    from scope_opd.evaluation.code_benchmarks import livecodebench_problem

    row = {
        "question_content": "Return the indices of the even numbers of nums.",
        "public_test_cases": json.dumps([{"input": "[1, 3, 4]", "output": "[2]", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "evenIndices"}),
    }
    _, gold = livecodebench_problem(row)
    honest = ("class Solution:\n    def evenIndices(self, nums):\n"
              "        return [i for i, x in enumerate(nums) if x % 2 == 0]\n")
    bare = "class Solution:\n    def evenIndices(self, nums):\n        return 2\n"
    assert code_score(honest, gold, limits=FAST) == 1.0
    assert code_score(bare, gold, limits=FAST) == 0.0
    # TACO keeps its convention: the expected [[2]] is a call returning [2], and [2] a call returning 2.
    taco = {"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}
    assert code_score("def f(x):\n    return 2\n", taco, limits=FAST) == 1.0


RAISES_VALUE_ERROR = {  # a check that wants exactly ValueError for bad input
    "prompt": 'def parse(s: str) -> int:\n    """int(s); ValueError on bad input."""\n',
    "test": "def check(candidate):\n    assert candidate('12') == 12\n    try:\n        candidate('x')\n"
    "    except ValueError:\n        return\n    raise AssertionError('no ValueError')\n",
    "entry_point": "parse",
}


def test_a_check_catches_the_built_in_exception_the_candidate_raised(code_sandbox):
    assert humaneval_score("    return int(s)\n", RAISES_VALUE_ERROR, limits=FAST) == 1.0
    assert humaneval_score("    if s == 'x':\n        raise TypeError(s)\n    return int(s)\n",
                           RAISES_VALUE_ERROR, limits=FAST) == 0.0
    # A class of the candidate's own, merely named ValueError, is not the built-in one.
    impostor = ("    class ValueError(Exception):\n        pass\n"
                "    if s == 'x':\n        raise ValueError(s)\n    return int(s)\n")
    assert humaneval_score(impostor, RAISES_VALUE_ERROR, limits=FAST) == 0.0
