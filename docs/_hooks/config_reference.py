"""mkdocs hook: the configuration reference, generated from the code at build time.

``docs/configuration.md`` holds two markers; this hook replaces them with tables built from the
dataclasses themselves, so the reference cannot drift from the code and a field added to
``SCOPEConfig`` (or to verl's ``scope:`` block) appears without touching the docs:

- ``<!-- scope-config-fields -->``: every field of :class:`scope_opd.trainer.SCOPEConfig`, its own
  first (defined or re-defaulted by SCOPE), then everything it inherits from TRL's ``GRPOConfig``
  and transformers' ``TrainingArguments``; each with its default, allowed values and help text.
- ``<!-- scope-verl-keys -->``: every key of the verl ``scope:`` block
  (:class:`scope_opd.integrations.verl.config.ScopeOptions`).

Allowed values come from, in order: the field's ``metadata["choices"]`` (the convention
``HfArgumentParser`` also reads), a ``Literal`` / ``Enum`` / ``bool`` annotation, or the option
tuples the code validates against (``ALLOWED_FROM_CODE`` below names the constant, the values are
read from it). Run it by hand: ``python docs/_hooks/config_reference.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

FIELDS_MARKER = "<!-- scope-config-fields -->"
VERL_MARKER = "<!-- scope-verl-keys -->"
REFERENCE_PAGE = "configuration.md"

# Field name -> "module:CONSTANT", the tuple of values the code accepts for it (its validation reads the
# same constant, so the reference lists exactly what is accepted).
ALLOWED_FROM_CODE = {
    "algorithm": "scope_opd.trainer:ALGORITHMS",
    "weight_normalization": "scope_opd.algorithms:NORMALIZATIONS",
    "student_weighting": "scope_opd.algorithms:STUDENT_WEIGHTINGS",
    "teacher_weighting": "scope_opd.algorithms:TEACHER_WEIGHTINGS",
    "loss_aggregation": "scope_opd.algorithms:AGGREGATIONS",
    "off_policy_clip": "scope_opd.trainer:OFF_POLICY_CLIPS",
    "student_logprob_source": "scope_opd.trainer:STUDENT_LOGPROB_SOURCES",
    "mle_surrogate": "scope_opd.algorithms:MLE_SURROGATES",
    "verifier": "scope_opd.verifiers.registry:BUILTIN_VERIFIERS",
}
# verl's ``algorithm`` takes only the algorithms the verl plugin implements.
VERL_ALLOWED_FROM_CODE = {**ALLOWED_FROM_CODE, "algorithm": "scope_opd.batch:SCOPE_ALGORITHMS"}
OPEN_ENDED = {"verifier": "or an import path `package.module:function`"}


def _use_checkout_source() -> None:
    """Import ``scope_opd`` from this checkout's ``src/`` (the code the docs describe), not an older install."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def _constant(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _yaml(value) -> str:
    """A default as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    return str(value)


def _cell(text: str) -> str:
    """Table-cell safe: one line, escaped pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = _cell(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def allowed_values(f: dataclasses.Field, annotation, from_code: dict[str, str]) -> list[str]:
    """The values a field accepts, as strings; empty when any value of its type goes."""
    choices = f.metadata.get("choices") if f.metadata else None
    if choices:
        return [_yaml(c) for c in choices]
    for arg in [annotation, *typing.get_args(annotation)]:
        if typing.get_origin(arg) is typing.Literal:
            return [_yaml(a) for a in typing.get_args(arg)]
        if inspect.isclass(arg) and issubclass(arg, enum.Enum):
            return [_yaml(member) for member in arg]
    if annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}:
        return ["true", "false"]
    if f.name in from_code:
        return [_yaml(v) for v in _constant(from_code[f.name])]
    return []


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a library's annotation that does not resolve here: fall back to the raw ones
        hints: dict = {}
        for klass in reversed(cls.__mro__):
            hints.update(getattr(klass, "__annotations__", {}))
        return hints


def source_comments(cls) -> dict[str, str]:
    """``# ...`` comments on a field's line or on the lines just above it, by field name (for dataclasses
    without ``metadata["help"]``)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    lines = source.splitlines()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1]
            text = tok.string.lstrip("#").strip()
            field_name = line.split(":")[0].strip() if line.lstrip() != tok.string else None
            if field_name and field_name.isidentifier():
                comments[field_name] = " ".join([*pending, text])
                pending = []
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and pending:
            comments.setdefault(tok.string, " ".join(pending))
            pending = []
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            if tok.start[1] == 4 and tok.type != tokenize.NAME:
                pending = []
    return comments


def field_rows(cls, names, from_code: dict[str, str], fallback_help: dict[str, str] | None = None) -> list[str]:
    hints = _type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    comments = source_comments(cls)
    rows = []
    for name in names:
        f = by_name[name]
        help_text = (f.metadata or {}).get("help") or comments.get(name) or (fallback_help or {}).get(name, "")
        allowed = allowed_values(f, hints.get(name), from_code)
        allowed_cell = ", ".join(_code(a) for a in allowed)
        if name in OPEN_ENDED and allowed:
            allowed_cell += f"; {OPEN_ENDED[name]}"
        rows.append(f"| `{name}` | {_code(_yaml(field_default(f)))} | {allowed_cell} | {_cell(help_text)} |")
    return rows


TABLE_HEAD = ["| field | default | allowed values | help |", "|---|---|---|---|"]


def scope_config_reference(config_cls=None) -> str:
    """Markdown tables of every ``SCOPEConfig`` field (or of ``config_cls``, a subclass of it)."""
    if config_cls is None:
        _use_checkout_source()
        from scope_opd.trainer import SCOPEConfig as config_cls
    own = [name for name in config_cls.__annotations__ if name in config_cls.__dataclass_fields__]
    for klass in config_cls.__mro__[1:]:  # a subclass of SCOPEConfig: SCOPEConfig's own fields count too
        if klass.__name__ == "SCOPEConfig" or klass.__module__.startswith("scope_opd"):
            own += [n for n in klass.__dict__.get("__annotations__", {}) if n not in own]
    own = [f.name for f in dataclasses.fields(config_cls) if f.name in own]  # declaration order
    inherited = [f.name for f in dataclasses.fields(config_cls) if f.name not in own]
    lines = [f"### SCOPE's fields ({len(own)})", "",
             "Defined by `SCOPEConfig`, or TRL / transformers fields whose default SCOPE changes (paper Table 3).", "",
             *TABLE_HEAD, *field_rows(config_cls, own, ALLOWED_FROM_CODE), "",
             f"### Inherited from TRL's `GRPOConfig` and transformers' `TrainingArguments` ({len(inherited)})", "",
             "Unchanged; their meaning is TRL's and transformers'.", "",
             *TABLE_HEAD, *field_rows(config_cls, inherited, {}), ""]
    return "\n".join(lines)


def verl_keys_reference() -> str:
    """Markdown table of every key of the verl ``scope:`` block."""
    _use_checkout_source()
    from scope_opd.integrations.verl.config import ScopeOptions

    try:
        from scope_opd.trainer import SCOPEConfig

        same_name_help = {f.name: (f.metadata or {}).get("help", "") for f in dataclasses.fields(SCOPEConfig)}
    except ImportError:  # TRL missing: the verl keys still document themselves from their comments
        same_name_help = {}
    from scope_opd.algorithms import scope_loss

    names = [f.name for f in dataclasses.fields(ScopeOptions)]
    # Keys that are scope_loss's own arguments say so (its docstring has the details).
    loss_arguments = set(inspect.signature(scope_loss).parameters)
    for name in names:
        if name in loss_arguments and not same_name_help.get(name):
            same_name_help[name] = f"`scope_loss(..., {name}=...)` (`scope_opd.algorithms`), passed as is."
    head = ["| `scope.` key | default | allowed values | help |", "|---|---|---|---|"]
    return "\n".join([*head, *field_rows(ScopeOptions, names, VERL_ALLOWED_FROM_CODE, same_name_help), ""])


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:  # mkdocs hook
    if page.file.src_uri != REFERENCE_PAGE:
        return markdown
    for marker in (FIELDS_MARKER, VERL_MARKER):
        if marker not in markdown:
            raise ValueError(f"docs/{REFERENCE_PAGE} lost its marker {marker}")
    return markdown.replace(FIELDS_MARKER, scope_config_reference()).replace(VERL_MARKER, verl_keys_reference())


if __name__ == "__main__":
    print(scope_config_reference())
    print(verl_keys_reference())
