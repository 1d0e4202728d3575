"""Every `scope ...` command line in the README and the docs parses and passes the config checks.

(``accelerate launch ... -m scope_opd.cli COMMAND ...`` lines count too: the same entry point.)

A documented command that does not parse (an unknown flag, a value the config refuses, a preset that no
longer exists) fails here. Each command runs as ``scope --check COMMAND ...``: the real ``scope`` entry point
parses and validates the arguments (for ``train``: the ``--config`` file and every SCOPEConfig / GRPOConfig
check) and stops before loading a model or reading data, so hub ids need no stand-in and nothing downloads.

Placeholders the docs use are filled in (``PLACEHOLDERS``), and ``train`` gets ``--use_cpu true`` on a machine
without a GPU (the paper presets ask for bf16, which TrainingArguments refuses on CPU otherwise). An inline code
span counts as a command line when it has an option (``--...``) and is not a listed flag mention (``FRAGMENTS``);
a line of a fenced code block always does.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from scope_opd.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parent.parent
# docs/incoming/ holds helpers' notes for the lead (drafts quoting old README lines), not user documentation.
DOC_FILES = sorted([REPO / "README.md", *(p for p in (REPO / "docs").glob("**/*.md") if "incoming" not in p.parts)])
_COMMAND = re.compile(r"(?:^|&&|;|\|\|)\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S+\s+)*(scope\s+(?:%s)\b.*)$"
                      % "|".join(re.escape(name) for name in SUBCOMMANDS))
# `accelerate launch ... -m scope_opd.cli train ...` / `python -m scope_opd.cli ...`: the same entry point.
_MODULE = re.compile(r"\s-m\s+scope_opd\.cli\s+((?:%s)\b.*)$" % "|".join(re.escape(name) for name in SUBCOMMANDS))
_INLINE = re.compile(r"`(scope\s+(?:%s)\b[^`]*)`" % "|".join(re.escape(name) for name in SUBCOMMANDS))
# What the docs write for "fill in your own": a preset, a count.
PLACEHOLDERS = [
    (re.compile(r"--config\s+\.\.\.(?=\s|$)"), "--config configs/toy/scope.yaml"),
    (re.compile(r"\[(--[\w-]+)\s+N\]"), r"\1 10"),
]


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].rstrip()


def doc_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every `scope ...` command line of the README and docs/**/*.md."""
    found: dict[str, str] = {}
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        block = None  # None outside a code block, else "shell" or "other"
        pending, pending_start = "", 0
        for number, line in enumerate(lines, start=1):
            if line.lstrip().startswith("```"):
                # A block opens with its language; only shell blocks (or unlabelled ones) hold command lines:
                # a ```text block is a listing (the layout page), not something to run.
                if block is None:
                    block = "shell" if line.strip()[3:].strip() in ("", "bash", "sh", "shell", "console") else "other"
                else:
                    block = None
                pending = ""
                continue
            where = f"{path.relative_to(REPO)}:{number}"
            if block == "other":
                continue
            if block == "shell":
                if pending:
                    line, where = pending + " " + line.strip(), pending_start
                if line.rstrip().endswith("\\"):
                    pending, pending_start = line.rstrip()[:-1].rstrip(), where
                    continue
                pending = ""
                match = _COMMAND.search(_strip_comment(line.strip()))
                module = _MODULE.search(_strip_comment(line.strip()))
                if match:
                    found.setdefault(match.group(1).strip(), where)
                elif module:
                    found.setdefault("scope " + module.group(1).strip(), where)
            else:
                for span in _INLINE.findall(line):
                    if " --" in span and span.strip() not in FRAGMENTS:
                        found.setdefault(span.strip(), where)
    return [(where, command) for command, where in found.items()]


# Inline spans that name a flag in prose rather than give a command line (each says what it documents).
FRAGMENTS = {
    "scope serve-teacher --api-key-env",  # reliability table: the flag whose key never leaks
    "scope serve-teacher --api-key-env VAR",  # reliability table: the flag with its variable unset
}


def filled(command: str) -> str:
    for pattern, replacement in PLACEHOLDERS:
        command = pattern.sub(replacement, command)
    return command


def host_stand_ins(argv: list[str]) -> list[str]:
    """The paper presets train in bf16 on GPUs; TrainingArguments refuses bf16 without one unless use_cpu is set."""
    import torch

    if argv[0] == "train" and not torch.cuda.is_available():
        return [*argv, "--use_cpu", "true"]
    return argv


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_this_test_is_about():
    commands = [command for _, command in COMMANDS]
    assert len(commands) >= 10, commands
    assert any("--teacher_model null" in c for c in commands), "the server-teacher switch is no longer documented?"
    assert {c.split()[1] for c in commands} >= {"train", "eval", "demo", "analyze", "serve-teacher"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses_and_passes_the_config_checks(where, command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the docs' relative paths (configs/...) are from the repository root
    argv = host_stand_ins(shlex.split(filled(command))[1:])
    try:
        code = main(["--check", *argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    except Exception as err:  # noqa: BLE001 - a config check's ValueError, a missing preset, ...
        pytest.fail(f"{where}: `{command}` failed its argument/config validation: {type(err).__name__}: {err}")
    captured = capsys.readouterr()
    assert code == 0, f"{where}: `{command}` exited {code}:\n{captured.err[-2000:]}"
    assert "arguments OK" in captured.out
