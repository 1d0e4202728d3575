"""The README and the docs site: short README with the two commands first, every page reachable, every
link into docs/ alive, and a configuration reference generated from the code that matches what the
code accepts. ``mkdocs build --strict`` itself runs here too (the test extra installs mkdocs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SET_UP_COMMANDS = [
    "pip install torch==2.13.0 -e . && scope demo",
    'pip install torch==2.13.0 -e ".[test]" && python -m pytest && bash scripts/test_verl_tier.sh',
]
NOT_PAGES = ("incoming", "_hooks")  # excluded from the site in mkdocs.yml


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference_hook", DOCS / "_hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_readme_is_short_and_starts_with_the_two_set_up_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert first_block == SET_UP_COMMANDS
    assert lines.index("```bash") <= 3  # the commands come first, under the title


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in NOT_PAGES)
    assert sorted(nav) == pages
    for required in ("getting-started.md", "algorithm.md", "configuration.md", "reproducing.md", "verl.md",
                     "teachers.md", "evaluation.md", "demo.md", "performance.md", "reliability.md", "gpu.md",
                     "real-model.md", "contributing.md"):
        assert required in nav, required
    assert all(pattern.strip("/") in NOT_PAGES for pattern in config["exclude_docs"].split())
    assert config["theme"]["name"] == "material" and config["strict"] is True


def test_links_from_the_readme_into_the_docs_point_at_pages_and_headings_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:  # mkdocs' default slugs: lower case, punctuation dropped, spaces to hyphens
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}
            assert anchor in slugs, (target, anchor)


def test_the_configuration_page_keeps_the_markers_the_generator_fills():
    text = (DOCS / "configuration.md").read_text()
    hook = _hook()
    assert hook.FIELDS_MARKER in text and hook.VERL_MARKER in text


def test_the_generated_reference_lists_every_option_the_command_line_parser_takes_with_its_default():
    from transformers import HfArgumentParser

    from scope_opd.trainer import SCOPEConfig

    reference = _hook().scope_config_reference()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \| `+ ?([^|]*?) ?`+ \|", reference, re.M)}
    # The real parser scope train uses (TrlParser is an HfArgumentParser): every option it takes is a row.
    parser = HfArgumentParser(SCOPEConfig)
    options = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(options) <= set(rows), sorted(set(options) - set(rows))
    for name in ("algorithm", "tau", "loss_aggregation", "teacher_timeout", "student_logprob_source"):
        assert rows[name] == str(options[name].default), name
    assert rows["learning_rate"] == "5e-05" and rows["beta"] == "null" and rows["kd_keep_only_correct"] == "true"


@pytest.mark.parametrize("name", ["algorithm", "weight_normalization", "student_weighting", "teacher_weighting",
                                  "loss_aggregation", "off_policy_clip", "student_logprob_source"])
def test_the_allowed_values_in_the_reference_are_exactly_what_scopeconfig_accepts(name, tmp_path):
    from scope_opd.trainer import SCOPEConfig

    reference = _hook().scope_config_reference()
    row = next(line for line in reference.splitlines() if line.startswith(f"| `{name}` |"))
    allowed = re.findall(r"`([^`]+)`", row.split(" | ")[2])
    assert allowed, row
    for value in allowed:  # each accepted by the config's own checks
        SCOPEConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **{name: value})
    with pytest.raises(ValueError):  # and a value outside the list refused
        SCOPEConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **{name: "not-an-option"})


def test_a_field_added_to_the_config_appears_without_editing_the_generator():
    from scope_opd.trainer import SCOPEConfig

    @dataclasses.dataclass
    class ExtendedConfig(SCOPEConfig):
        brand_new_knob: str = dataclasses.field(default="low", metadata={"help": "A knob added later.",
                                                                       "choices": ("low", "high")})

    reference = _hook().scope_config_reference(ExtendedConfig)
    own = reference.split("### Inherited")[0]
    assert "| `brand_new_knob` | `low` | `low`, `high` | A knob added later. |" in own
    assert "| `tau` |" in own  # SCOPEConfig's own fields stay in the first table


def test_the_verl_keys_reference_lists_every_scope_key_with_values_the_plugin_accepts():
    from scope_opd.integrations.verl.config import ScopeOptions, scope_options

    reference = _hook().verl_keys_reference()
    for f in dataclasses.fields(ScopeOptions):
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{f.name}` |")), None)
        assert row is not None, f.name
        assert row.split(" | ")[3].strip(" |"), f"scope.{f.name} has no help text"
        for value in re.findall(r"`([^`]+)`", row.split(" | ")[2]):
            parsed = {"true": True, "false": False}.get(value, value)
            assert getattr(scope_options({"scope": {f.name: parsed}}), f.name) == parsed
    with pytest.raises(ValueError, match="scope.algorithm"):
        scope_options({"scope": {"algorithm": "grpo"}})  # verl's GRPO is verl's own trainer, not a scope key


def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a page missing from the nav or a failing reference hook fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
