"""User-style callables that the fault and resume tests load by import path in subprocesses."""

from __future__ import annotations

import os
import time

from scope_opd.verifiers import exact_score


def slow_exact(completion: str, gold) -> float:
    """The exact verifier, optionally slowed (SCOPE_TEST_VERIFIER_DELAY seconds) so a test can kill mid-run."""
    time.sleep(float(os.environ.get("SCOPE_TEST_VERIFIER_DELAY", "0")))
    return exact_score(completion, gold)
