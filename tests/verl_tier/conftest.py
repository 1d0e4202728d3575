"""verl tier: runs in the verl venv (scripts/test_verl_tier.sh), not in the system python.

Without verl installed the whole folder is left out of collection, so the main suite stays green;
the tier script runs it with verl present, where a missing plugin or changed internal fails.
"""

import importlib.util

import pytest

if importlib.util.find_spec("verl") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def paper_config():
    from verl_batch import compose_config

    return compose_config()
