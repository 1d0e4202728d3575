"""Several teachers: which teacher scores (and teaches) each rollout on the teacher path.

``SCOPEConfig.teachers`` maps a name to one teacher's fields (each as the single-teacher ``teacher_*``
field of that name allows); ``teacher_routing`` picks the teacher of each row:

* ``"key"``: the prompt's dataset column ``teacher_key`` names it. Only that teacher scores the row.
* ``"min_perplexity"``: every teacher scores the row; the row is distilled toward the teacher with the
  lowest perplexity on it (highest mean token log-prob over the completion), and that teacher's log-probs
  (so its perplexity) are what eq. 5's group softmax and the OPD advantage see. Ties go to the first
  teacher in the ``teachers`` mapping's order. A row that *any* teacher returns non-finite log-probs for
  is never handed to another teacher: it gets that teacher's values and the trainer drops and counts it
  exactly as it drops a single teacher's non-finite row (``scope/teacher_nonfinite_rows``), and the teacher
  that failed on it counts it in ``teacher/<name>/nan_rows``. Cost: N teachers score every teacher-path row.

:class:`TeacherPool` is one :class:`~scope_opd.teachers.TeacherScorer` over the named teachers: its
``score(prompt_ids, completion_ids, teacher_names=None)`` returns the routed teacher's log-probs per row
(``teacher_names``: one name per row, required for ``"key"``). Each teacher is built by :func:`build_teacher`
exactly as the single teacher is (tokenizer check against the student, stop-token map, context-length check
of a server). A failing teacher raises as a single teacher does (retries and errors are its own).
"""

from __future__ import annotations

import math
import re
import threading
import types
import warnings

import torch

ROUTINGS = ("key", "min_perplexity")

# A teacher's own key in ``teachers: {name: {...}}`` -> the single-teacher SCOPEConfig field it stands for.
PER_TEACHER_FIELDS = {
    "model": "teacher_model",
    "server_url": "teacher_server_url",
    "server_model": "teacher_server_model",
    "tokenizer": "teacher_tokenizer",
    "dtype": "teacher_dtype",
    "temperature": "teacher_temperature",
    "api_key_env": "teacher_api_key_env",
    "timeout": "teacher_timeout",
    "max_retries": "teacher_max_retries",
    "max_concurrency": "teacher_max_concurrency",
    "batch_size": "teacher_batch_size",
    "allow_special_token_mismatch": "teacher_allow_special_token_mismatch",
}
_STRING_FIELDS = ("model", "server_url", "server_model", "tokenizer", "dtype", "api_key_env")
_INT_FIELDS = ("max_retries", "max_concurrency", "batch_size")
_FLOAT_FIELDS = ("temperature", "timeout")


def parse_teachers(value, config=None) -> dict[str, dict] | None:
    """``teachers`` as ``{name: {field: value}}``: a mapping (YAML), or a JSON / YAML-flow string (command line).

    Unknown per-teacher keys, wrong value types, a teacher with neither or both of ``model`` / ``server_url``,
    or a server teacher with ``temperature`` != 1 are errors naming the teacher and the key.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = _parse_mapping_text(value)
        if value is None:
            return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"teachers must be a non-empty mapping name -> teacher fields, got {value!r}")
    parsed: dict[str, dict] = {}
    for name, fields in value.items():
        if not isinstance(name, str) or not name or "/" in name or name != name.strip():
            raise ValueError(f"teachers: teacher name {name!r} must be a non-empty string without '/' or surrounding spaces")
        if not isinstance(fields, dict):
            raise ValueError(f"teachers.{name} must be a mapping of teacher fields {sorted(PER_TEACHER_FIELDS)}, "
                             f"got {fields!r}")
        out = {}
        for key, item in fields.items():
            if key not in PER_TEACHER_FIELDS:
                raise ValueError(f"teachers.{name}: unknown key {key!r}; a teacher's keys are {sorted(PER_TEACHER_FIELDS)}")
            out[key] = _typed(name, key, item)
        if bool(out.get("model")) == bool(out.get("server_url")):
            raise ValueError(f"teachers.{name}: set exactly one of 'model' (in-process) or 'server_url', got "
                             f"{ {k: out.get(k) for k in ('model', 'server_url')} }")
        if out.get("server_url") and out.get("temperature", 1.0) != 1.0:
            raise ValueError(f"teachers.{name}: temperature != 1 is only supported in-process; server "
                             "prompt_logprobs are at temperature 1")
        parsed[name] = out
    return parsed


def _parse_mapping_text(text: str):
    """A command-line / YAML string of ``teachers``: JSON first (its numbers, ``1e3`` included, are numbers), then a
    Python literal (the repr of a dict: ``None`` is None, not the string 'None'), then YAML (flow mappings)."""
    import ast
    import json

    import yaml

    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"teachers: cannot parse {text!r} as a JSON / Python-literal / YAML mapping: {err}") from err


# YAML 1.1 (yaml.safe_load, as TrlParser reads --config) reads ``1.5e2`` / ``1e3`` as strings: such a string is a number.
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _typed(name: str, key: str, item):
    where = f"teachers.{name}.{key}"
    if item is None and key not in ("model", "server_url"):
        return None
    if key in _STRING_FIELDS or key in ("model", "server_url"):
        if item is not None and not isinstance(item, str):
            raise ValueError(f"{where} must be a string, got {item!r}")
        return item
    if key in _INT_FIELDS:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{where} must be an integer, got {item!r}")
        return item
    if key in _FLOAT_FIELDS:
        if isinstance(item, str) and _NUMBER_TEXT.fullmatch(item.strip()):
            item = float(item)
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item <= 0:
            raise ValueError(f"{where} must be a positive number, got {item!r}")
        return float(item)
    if not isinstance(item, bool):  # allow_special_token_mismatch
        raise ValueError(f"{where} must be true or false, got {item!r}")
    return item


def check_teacher_routing(config) -> None:
    """The multi-teacher fields of a SCOPEConfig, together (``teachers`` already parsed)."""
    if config.teacher_routing not in ROUTINGS:
        raise ValueError(f"teacher_routing must be one of {ROUTINGS}, got {config.teacher_routing!r}")
    if config.teachers is None:
        if config.teacher_routing != "key":  # the default; any other routing only means something with teachers
            raise ValueError(f"teacher_routing={config.teacher_routing!r} needs teachers (several); with one teacher "
                             "(teacher_model / teacher_server_url) there is nothing to route")
        return
    if config.teacher_model or config.teacher_server_url:
        raise ValueError("set either teachers (several) or teacher_model / teacher_server_url (one teacher), not both")
    for name, fields in config.teachers.items():
        # A teacher without its own temperature takes the top-level teacher_temperature, which a server cannot apply.
        temperature = fields.get("temperature") or config.teacher_temperature
        if fields.get("server_url") and temperature != 1.0:
            raise ValueError(f"teachers.{name}: a server teacher scores at temperature 1 (server prompt_logprobs), but "
                             f"its teacher_temperature is {temperature} (from the top-level teacher_temperature; set "
                             f"teachers.{name}.temperature: 1 or teacher_temperature: 1)")
    if config.teacher_routing == "key" and not (isinstance(config.teacher_key, str) and config.teacher_key):
        raise ValueError(f"teacher_routing='key' needs teacher_key, the dataset column naming each prompt's teacher; "
                         f"got {config.teacher_key!r}")


def teacher_fields(config, name: str):
    """One teacher's fields as a namespace of the single-teacher ``teacher_*`` attributes (unset: the config's)."""
    values = {attr: getattr(config, attr) for attr in PER_TEACHER_FIELDS.values()}
    values["teacher_model"] = values["teacher_server_url"] = None
    for key, item in config.teachers[name].items():
        values[PER_TEACHER_FIELDS[key]] = item
    return types.SimpleNamespace(**values)


def check_dataset_routes(dataset, key: str, names, which: str = "training dataset") -> None:
    """Every row of ``dataset`` names a known teacher in column ``key`` (an error naming ``which``, the column and row).

    ``dataset``: one dataset or a mapping name -> dataset (the trainer's ``eval_dataset`` may be either).
    """
    if isinstance(dataset, dict):
        for part, data in dataset.items():
            check_dataset_routes(data, key, names, f"{which} {part!r}")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return  # an iterable dataset: checked per batch
    if key not in columns:
        raise ValueError(f"teacher_routing='key': the {which} has no column {key!r} (teacher_key) naming each "
                         f"prompt's teacher; its columns are {columns}; known teachers: {list(names)}")
    for row, value in enumerate(dataset[key]):
        if value not in names:
            raise ValueError(f"teacher_routing='key': row {row} of the {which} names teacher {value!r} in "
                             f"column {key!r}; known teachers: {list(names)}")


def row_routes(rows, key: str, names, row_numbers=None) -> list[str]:
    """The teacher named by each row (dicts of a generation batch; ``row_numbers``: their rows in that batch),
    with an error naming the column and the row."""
    routes = []
    for index, row in zip(range(len(rows)) if row_numbers is None else row_numbers, rows):
        if key not in row:
            raise ValueError(f"teacher_routing='key': row {index} of the generation batch (prompt {str(row.get('prompt'))[:80]!r}) "
                             f"has no column {key!r} (teacher_key); known teachers: {list(names)}")
        if row[key] not in names:
            raise ValueError(f"teacher_routing='key': row {index} of the generation batch (prompt "
                             f"{str(row.get('prompt'))[:80]!r}) names teacher {row[key]!r} in column {key!r}; known "
                             f"teachers: {list(names)}")
        routes.append(row[key])
    return routes


# ---------------------------------------------------------------------------------------------------- building


def build_teacher(trainer, fields, teacher_model=None):
    """One teacher from one teacher's fields (``fields``: the config itself, or :func:`teacher_fields`).

    ``teacher_model``: a loaded ``PreTrainedModel`` or a name overriding ``fields.teacher_model`` (the
    trainer's ``teacher_model=`` argument). The student/teacher tokenizer check, the stop-token map (the
    returned teacher is wrapped in :class:`~scope_opd.teachers.scorer.StopTokenMappedTeacher` when the stop
    tokens differ) and a server's context-length check are the single teacher's.
    """
    from transformers import AutoTokenizer, PreTrainedModel
    from trl.models import prepare_deepspeed, prepare_fsdp

    from . import InProcessTeacher, ServerTeacher, check_models_compatible, check_tokenizers_match, load_teacher_model
    from .scorer import StopTokenMappedTeacher
    from .tokenizer_check import stop_token_map

    args = trainer.args
    student_name = getattr(trainer.model.config, "_name_or_path", "student")
    if teacher_model is None and fields.teacher_model is None and fields.teacher_server_url is None:
        raise ValueError(
            f"algorithm={args.algorithm!r} needs a teacher: set teacher_model (hub id or path) or teacher_server_url"
        )
    teacher_name = (
        teacher_model if isinstance(teacher_model, str) else None
    ) or fields.teacher_model or fields.teacher_server_model or fields.teacher_server_url
    if isinstance(teacher_model, PreTrainedModel):
        teacher_name = getattr(teacher_model.config, "_name_or_path", "teacher")
    tokenizer_source = fields.teacher_tokenizer or (
        teacher_name if not isinstance(teacher_model, PreTrainedModel) else teacher_model.config._name_or_path
    )
    teacher_tokenizer = None
    if tokenizer_source and tokenizer_source != fields.teacher_server_url:
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except (OSError, ValueError) as err:
            if fields.teacher_server_url is None:
                raise ValueError(f"cannot load the teacher tokenizer from {tokenizer_source!r}: {err}") from err
    stop_tokens = {}
    if teacher_tokenizer is not None:
        check_tokenizers_match(
            trainer._tokenizer, teacher_tokenizer, student_name, teacher_name,
            allow_special_token_mismatch=fields.teacher_allow_special_token_mismatch,
        )
        stop_tokens = stop_token_map(trainer._tokenizer, teacher_tokenizer)
    else:
        warnings.warn(
            f"teacher tokenizer not available for {teacher_name!r}: the student/teacher tokenizer check is "
            "skipped; set teacher_tokenizer to a local path or hub id to enable it",
            stacklevel=3,
        )

    def mapped(teacher):  # student and teacher stop tokens differ: score the teacher's at the end
        return StopTokenMappedTeacher(teacher, stop_tokens) if stop_tokens else teacher

    if fields.teacher_server_url:
        server_teacher = ServerTeacher(
            fields.teacher_server_url,
            model=fields.teacher_server_model,
            api_key_env=fields.teacher_api_key_env,
            timeout_s=fields.teacher_timeout,
            max_retries=fields.teacher_max_retries,
            max_concurrency=fields.teacher_max_concurrency,
        )
        # --- teacher context-length check (ServerTeacher.check_context_length, owned by server_client.py) ---
        # Fails now, naming both numbers, if the server's max_model_len cannot hold a prompt +
        # max_completion_length + 1 (vLLM would refuse such rows mid-run); rows still too long fail when scored.
        server_teacher.check_context_length(args.max_completion_length, getattr(args, "max_prompt_length", None))
        # --- end teacher context-length check ---
        return mapped(server_teacher)

    if isinstance(teacher_model, PreTrainedModel):
        model = teacher_model
    else:
        # As TRL loads its reference model (device_map=None under DDP/DeepSpeed: zero.Init shards it under ZeRO-3).
        model = load_teacher_model(teacher_model or fields.teacher_model, dtype=fields.teacher_dtype,
                                   distributed_type=args.distributed_state.distributed_type)
    check_models_compatible(trainer.model.config, model.config, student_name, teacher_name)
    model.eval()
    model.requires_grad_(False)
    # Placed and wrapped the way TRL prepares its reference model, so ZeRO-3 / FSDP shard it.
    sharded = trainer._teacher_parameters_sharded()
    if trainer.is_deepspeed_enabled:
        model = prepare_deepspeed(model, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        model = prepare_fsdp(model, trainer.accelerator)
    else:
        model = trainer.accelerator.prepare_model(model, evaluation_mode=True)
    from .chunked_scorer import sampled_path_scorer

    # On CPU with a real vocabulary, the tiled scorer (less memory than TRL's fused head); else TRL's fused head.
    return mapped(sampled_path_scorer(InProcessTeacher(
        model,
        batch_size=fields.teacher_batch_size,
        device=trainer.accelerator.device,
        temperature=fields.teacher_temperature,
        # Sharded forwards are collectives: every rank runs as many as the busiest rank.
        synced_ranks=sharded and trainer.accelerator.num_processes > 1,
    )))


def build_teacher_pool(trainer, teachers=None) -> TeacherPool:
    """A :class:`TeacherPool` of ``args.teachers`` (``teachers``: ready scorers by name, overriding the config)."""
    args = trainer.args
    from .server_client import TeacherServerError

    names = list(args.teachers)
    unknown = [name for name in (teachers or {}) if name not in names]
    if unknown:
        raise ValueError(f"teacher= names {unknown}, not in teachers {names}: every scorer passed must stand in for "
                         "one of the configured teachers")
    built = {}
    for name in names:
        if teachers is not None and name in teachers:
            built[name] = teachers[name]
        else:
            try:
                built[name] = build_teacher(trainer, teacher_fields(args, name))
            except ValueError as err:
                raise ValueError(f"teachers.{name}: {err}") from err
            except TeacherServerError as err:  # e.g. the server is down at start-up: same type, naming the teacher
                raise TeacherServerError(f"teachers.{name}: {err}", url=err.url, rows=err.rows) from err
    return TeacherPool(built, routing=args.teacher_routing)


# ---------------------------------------------------------------------------------------------------- the pool


_ROUTE_COUNTERS = ("rows", "tokens", "logp_sum", "ppl_sum", "score_calls", "failures", "nan_rows")


class TeacherPool:
    """Named teachers behind one ``score``: the routed teacher's log-probs of each row.

    Args:
        teachers: ``{name: TeacherScorer}``, in config order (the tie order of ``min_perplexity``).
        routing: ``"key"`` (``score`` needs ``teacher_names``) or ``"min_perplexity"``.

    After each ``score`` call, :attr:`last_routes` holds the chosen teacher of each row (``None`` for a
    dropped non-finite row under ``min_perplexity``). :meth:`stats_delta` reports, per teacher,
    ``<name>/rows`` (rows it taught), ``tokens``, ``logp_sum`` / ``ppl_sum`` (over its finite taught rows,
    for the means), ``score_calls``, ``failures`` (calls that raised), ``nan_rows``, and the teacher's own
    counters (a server's ``requests``, ``retries``, ``failures``, ``nan_rows``) under ``<name>/server/``;
    :meth:`summarize_counters` turns the process-summed totals into ``token_frac``, ``mean_logp`` and
    ``mean_ppl``.
    """

    def __init__(self, teachers: dict, *, routing: str = "key"):
        if routing not in ROUTINGS:
            raise ValueError(f"teacher_routing must be one of {ROUTINGS}, got {routing!r}")
        if not teachers:
            raise ValueError("a teacher pool needs at least one teacher")
        self.teachers = dict(teachers)
        self.names = list(self.teachers)
        self.routing = routing
        self.last_routes: list[str | None] = []
        self._lock = threading.Lock()  # the overlap thread and the trainer may both score
        self._counts = {name: dict.fromkeys(_ROUTE_COUNTERS, 0.0) for name in self.names}

    def __repr__(self) -> str:
        return f"TeacherPool(routing={self.routing!r}, teachers={self.teachers!r})"

    # Attributes the trainer and the overlap read from a teacher.
    @property
    def synced_ranks(self) -> bool:
        return any(getattr(t, "synced_ranks", False) for t in self.teachers.values())

    @property
    def device(self):
        devices = [getattr(t, "device", None) for t in self.teachers.values()]
        return next((d for d in devices if d is not None), None)

    def check_names(self, teacher_names) -> None:
        for index, name in enumerate(teacher_names):
            if name not in self.teachers:
                raise ValueError(f"row {index}: unknown teacher {name!r}; known teachers: {self.names}")

    def _call(self, name: str, method: str, prompt_ids, completion_ids, **kwargs):
        teacher = self.teachers[name]
        with self._lock:
            self._counts[name]["score_calls"] += 1
        try:
            out = getattr(teacher, method)(prompt_ids, completion_ids, **kwargs)
        except BaseException:
            with self._lock:
                self._counts[name]["failures"] += 1
            raise  # never replaced by another teacher: the error is the step's, as with one teacher
        if len(out) != len(prompt_ids):
            raise RuntimeError(f"teacher {name!r} returned {len(out)} rows for {len(prompt_ids)} requested")
        return out

    def call_routed(self, method: str, prompt_ids, completion_ids, teacher_names, **kwargs) -> list:
        """``teacher.<method>(prompt_ids, completion_ids, **kwargs)`` with each row sent to its named teacher only.

        Any per-row teacher method (``score`` or another one returning one entry per row) routes this way; every
        teacher whose forwards are collectives (``synced_ranks``) is called even with no rows of its own.
        """
        if len(teacher_names) != len(prompt_ids):
            raise ValueError(f"{len(teacher_names)} teacher names for {len(prompt_ids)} rows")
        self.check_names(teacher_names)
        out: list = [None] * len(prompt_ids)
        for name in self.names:
            rows = [i for i, n in enumerate(teacher_names) if n == name]
            if not rows and not getattr(self.teachers[name], "synced_ranks", False):
                continue
            scored = self._call(name, method, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], **kwargs)
            for i, values in zip(rows, scored):
                out[i] = values
        return out

    def score(self, prompt_ids, completion_ids, teacher_names=None) -> list[torch.Tensor]:
        scored, taught = self.score_uncounted(prompt_ids, completion_ids, teacher_names)
        self.count_taught(taught)
        return scored

    def score_uncounted(self, prompt_ids, completion_ids, teacher_names=None) -> tuple[list[torch.Tensor], list]:
        """``score``'s log-probs and, per row, what :meth:`count_taught` counts for it, not counted yet.

        The overlap prefetch scores rows the step may not use (a row whose completion changed is scored again):
        it counts only the rows whose prefetched values the step takes. Calls and failures are counted here.
        """
        if self.routing == "key":
            if teacher_names is None:
                raise ValueError("teacher_routing='key': score needs each row's teacher name (teacher_names)")
            scored = self.call_routed("score", prompt_ids, completion_ids, teacher_names)
            routes = list(teacher_names)
            nonfinite = [not bool(torch.isfinite(v).all()) for v in scored]
            failed = [[] for _ in scored]  # key: a non-finite row counts in its own teacher's nan_rows (below)
        else:
            # min_perplexity: every teacher scores every row; the highest mean log-prob wins, first teacher on ties.
            per_teacher = {name: self._call(name, "score", prompt_ids, completion_ids) for name in self.names}
            scored, routes, nonfinite, failed = [], [], [], []
            for i in range(len(prompt_ids)):
                best, best_mean, bad, failed_on = None, None, None, []
                for name in self.names:
                    values = per_teacher[name][i]
                    if not bool(torch.isfinite(values).all()):
                        failed_on.append(name)
                        bad = bad or name
                        continue
                    mean = float(values.double().mean()) if values.numel() else 0.0
                    if best is None or mean > best_mean:  # strictly greater: ties stay with the earlier teacher
                        best, best_mean = name, mean
                chosen = bad or best  # a row non-finite for any teacher is that teacher's, and dropped as non-finite
                scored.append(per_teacher[chosen][i])
                routes.append(chosen)
                nonfinite.append(bad is not None)
                failed.append(failed_on)
        self.last_routes = [None if bad and self.routing == "min_perplexity" else r for r, bad in zip(routes, nonfinite)]
        return scored, list(zip(routes, scored, nonfinite, failed))

    def count_taught(self, taught) -> None:
        """Count rows from :meth:`score_uncounted`: ``rows`` / ``tokens`` / means for each finite taught row,
        ``nan_rows`` for each teacher a row was non-finite for."""
        with self._lock:
            for name, values, bad, failed_on in taught:
                counts = self._counts[name]
                for failed_name in failed_on:
                    self._counts[failed_name]["nan_rows"] += 1
                if bad:
                    if self.routing == "key":
                        counts["nan_rows"] += 1
                    continue
                n = values.numel()
                if n == 0:  # an empty completion teaches nothing (the trainer drops it)
                    continue
                mean = float(values.double().mean())
                counts["rows"] += 1
                counts["tokens"] += n
                counts["logp_sum"] += mean
                counts["ppl_sum"] += math.exp(-mean) if -mean < 700 else float("inf")

    def stats_delta(self) -> dict[str, float]:
        """Per-teacher counter increments since the previous call, keys ``<name>/<counter>``."""
        with self._lock:
            delta = {f"{name}/{key}": value for name, counts in self._counts.items() for key, value in counts.items()}
            self._counts = {name: dict.fromkeys(_ROUTE_COUNTERS, 0.0) for name in self.names}
        for name, teacher in self.teachers.items():
            own = getattr(teacher, "stats_delta", None)
            if callable(own):
                delta.update({f"{name}/server/{key}": float(value) for key, value in own().items()})
        return delta

    def summarize_counters(self, totals: dict[str, float]) -> dict[str, float]:
        """Process-summed :meth:`stats_delta` totals -> the logged ``<name>/...`` counters.

        ``token_frac``: the teacher's share of the taught (finite) rows' completion tokens; ``mean_logp`` /
        ``mean_ppl``: the mean over its taught rows of the row's mean token log-prob / of the row's perplexity
        ``exp(-mean log-prob)`` (NaN when it taught no row).
        """
        out = dict(totals)
        all_tokens = sum(totals.get(f"{name}/tokens", 0.0) for name in self.names)
        for name in self.names:
            rows, tokens = totals.get(f"{name}/rows", 0.0), totals.get(f"{name}/tokens", 0.0)
            out[f"{name}/token_frac"] = tokens / all_tokens if all_tokens else 0.0
            out[f"{name}/mean_logp"] = totals.get(f"{name}/logp_sum", 0.0) / rows if rows else float("nan")
            out[f"{name}/mean_ppl"] = totals.get(f"{name}/ppl_sum", 0.0) / rows if rows else float("nan")
            out[f"{name}/requests"] = totals.get(f"{name}/server/requests", totals.get(f"{name}/score_calls", 0.0))
            for key in ("logp_sum", "ppl_sum"):
                out.pop(f"{name}/{key}", None)
        return out

    def __getattr__(self, name):
        """Any other per-row teacher method (e.g. a top-k scorer): routed like ``score`` with ``teacher_names``."""
        if name.startswith("_") or name in ("teachers", "names", "routing"):
            raise AttributeError(name)
        if not all(callable(getattr(t, name, None)) for t in self.teachers.values()):
            raise AttributeError(f"not every teacher of the pool has {name!r}")

        def routed(prompt_ids, completion_ids, teacher_names=None, **kwargs):
            if teacher_names is None:
                if self.routing == "key" or len(self.last_routes) != len(prompt_ids) or None in self.last_routes:
                    raise ValueError(f"TeacherPool.{name}: pass teacher_names (one per row), or call score first on "
                                     "the same rows under min_perplexity")
                teacher_names = self.last_routes
            return self.call_routed(name, prompt_ids, completion_ids, teacher_names, **kwargs)

        return routed


def routing_kwargs(trainer, batch_rows, row_numbers) -> dict:
    """``{"teacher_names": [...]}`` for ``score`` of ``batch_rows[i] for i in row_numbers`` under key routing, else ``{}``.

    ``batch_rows``: this process's dataset rows of the generation batch (``None`` where unknown: an error).
    """
    pool = trainer.teacher
    if not isinstance(pool, TeacherPool) or pool.routing != "key":
        return {}
    if batch_rows is None:
        raise ValueError("teacher_routing='key' needs the generation batch's dataset rows to route each prompt "
                         f"(column {trainer.args.teacher_key!r})")
    rows = [batch_rows[i] for i in row_numbers]
    return {"teacher_names": row_routes(rows, trainer.args.teacher_key, pool.names, row_numbers)}
