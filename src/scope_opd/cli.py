"""`scope` command line: one entry point, one subcommand per stage of the workflow.

Each subcommand lives beside the code it drives and exposes
``configure_parser(parser)`` and ``main(args) -> int | None``; this file only
dispatches, importing a subcommand's module (and its heavy dependencies) when
that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("scope_opd.train_cli", "train a student with SCOPE / OPD / GRPO / KD (TRL-based)"),
    "eval": ("scope_opd.evaluation.cli", "sample a model on benchmarks and report Avg@k / Pass@k"),
    "analyze": ("scope_opd.analysis.cli", "analyses from the paper (error recovery vs teacher perplexity)"),
    "serve-teacher": ("scope_opd.teachers.serve", "serve teacher prompt log-probs over an OpenAI-compatible API"),
    "demo": ("scope_opd.demo", "toy end-to-end comparison of SCOPE, OPD, GRPO and KD on CPU"),
}


CHECK_FLAG = "--check"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="scope", description=__doc__.splitlines()[0],
        usage="scope [--check] COMMAND [ARGS ...]",
        epilog=f"{CHECK_FLAG}: parse and validate COMMAND's arguments (for train: the --config file and every config "
        "check) and exit without running it, loading a model or reading data.",
    )
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
    check_only = bool(argv) and argv[0] == CHECK_FLAG
    if check_only:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # prints the usage error and exits 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"scope {name}", description=SUBCOMMANDS[name][1])
    if hasattr(module, "run_cli"):
        # Subcommands with their own parser (e.g. `train` uses TRL's TrlParser).
        if check_only:
            return int(module.run_cli(rest, prog=f"scope {name}", check_only=True) or 0)
        return int(module.run_cli(rest, prog=f"scope {name}") or 0)
    module.configure_parser(sub)
    args = sub.parse_args(rest)
    if check_only:
        print(f"scope {name}: arguments OK")
        return 0
    return int(module.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
