"""Old home of :mod:`scope_opd.sampling`, kept as an alias so that code written against it still imports.

Sampling moved to the package level (it serves the KD baseline, the demo and the analyses as much as
evaluation). ``scope_opd.evaluation.sampling`` was a documented path (the README's layout, the KD
docstrings, ``tests/test_kd.py``), so it re-exports the same objects; new code imports
``scope_opd.sampling``.
"""

from ..sampling import *  # noqa: F401,F403
from ..sampling import __all__  # noqa: F401
