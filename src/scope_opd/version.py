"""The package version and what produced a result: library versions, machine, git commit.

At the bottom of the import graph (standard library only), so that any module can stamp its
outputs without importing the package ``__init__`` above it. The same seeds give other numbers
under other versions of torch or transformers; :func:`provenance` is written beside every
``scope demo`` and ``scope eval`` result so that a reader can tell that drift from a bug.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__version__ = "0.1.0"

# Distributions whose versions change the numbers (sampling, kernels, trainer internals, the verifier).
RECORDED_DISTRIBUTIONS = ("torch", "transformers", "trl", "accelerate", "datasets", "math-verify")


def library_versions() -> dict[str, str | None]:
    """``{"python": ..., "scope-opd": ..., "torch": ..., ...}``; None for a distribution that is not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "scope-opd": __version__}
    for name in RECORDED_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("model name", "Processor", "cpu model"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """CPU model, logical cores (and how many this process may use), OS and architecture."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "system": f"{platform.system()} {platform.release()}", "arch": platform.machine()}


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit checked out where this package's source lives (``None`` outside a git work tree, or
    without git); ``+dirty`` when tracked files differ from it."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def provenance() -> dict:
    """What produced a result: ``{"versions": ..., "machine": ..., "git_commit": ..., "command": ...}``."""
    return {"versions": library_versions(), "machine": machine(), "git_commit": git_commit(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None}


def provenance_lines(prov: dict) -> list[str]:
    """Markdown lines naming the versions, the machine and the commit (for ``report.md`` files)."""
    v, m = prov["versions"], prov["machine"]
    libs = ", ".join(f"{name} {version or 'not installed'}" for name, version in v.items())
    return [f"- versions: {libs}",
            f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['system']} {m['arch']}",
            f"- git commit: {prov['git_commit'] or 'none (not a git checkout)'}",
            "- other versions of torch or transformers give other numbers for the same seeds: compare runs made "
            "with the same versions"]
