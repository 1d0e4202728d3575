"""`scope train --config FILE.yaml [--key value ...]`: TRL's parser conventions, SCOPE's trainer.

The YAML file and the command line fill three dataclasses, as in TRL's example scripts:
``TrainScriptArguments`` (data, resume), ``SCOPEConfig`` (training, SCOPE, teacher) and
TRL's ``ModelConfig`` (student model). Command-line values override the file.

Model and teacher names are hub ids or local paths; ``toy:student`` / ``toy:teacher`` and
``dataset_name: toy`` select the CPU toy task and models (built and cached when missing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

TOY_PREFIX = "toy:"


@dataclass
class TrainScriptArguments:
    dataset_name: str = field(
        default="toy",
        metadata={"help": "HF dataset id, a local .jsonl/.json/.parquet file or folder, or 'toy' (CPU toy task)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_format: str = field(
        default="plain",
        metadata={
            "help": "'plain': rows with prompt_field and answer_field; 'taco': TACO rows (question, starter_code, "
            "input_output) made into prompts with a stated instruction and code-verifier tests, malformed rows dropped "
            "and reported (scope_opd.data.load_taco_dataset)."
        },
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Column with the prompt (text or chat messages)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    chat_prompt: bool = field(
        default=False,
        metadata={"help": "Wrap plain-text prompts as one user message so the tokenizer's chat template applies."},
    )
    instruction: str = field(
        default="", metadata={"help": "Text appended to every prompt (e.g. the boxed-answer instruction)."}
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Drop training prompts longer than this many tokens (paper: 4096); prompts that leave less than "
            "max_completion_length of the student's positions are always dropped (scope_opd.data.drop_overlong_prompts)."
        },
    )
    toy_train_size: int = field(default=2000, metadata={"help": "Toy task: number of training problems."})
    toy_quick: bool = field(default=False, metadata={"help": "Toy task: use the small quick-build toy models."})
    resume: bool = field(
        default=False,
        metadata={"help": "Resume from the newest complete, verified checkpoint in output_dir (if any)."},
    )
    resume_allow_incomplete: bool = field(
        default=False,
        metadata={"help": "With --resume: accept a checkpoint lacking optimizer/scheduler/RNG state (they start fresh)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train afresh in a non-empty output_dir, deleting its previous run's checkpoints."},
    )


def resolve_model_name(name: str | None, *, quick: bool = False, seed: int = 0) -> str | None:
    """Map ``toy:student`` / ``toy:teacher`` to the cached toy checkpoints (built when missing)."""
    if name is None or not name.startswith(TOY_PREFIX):
        return name
    from .toy.models import ensure_toy_models

    role = name[len(TOY_PREFIX):]
    paths = ensure_toy_models(seed=seed, quick=quick)
    if role not in ("student", "teacher"):
        raise ValueError(f"unknown toy model {name!r}: use toy:student or toy:teacher")
    return str(getattr(paths, role))


def load_train_dataset(script_args: TrainScriptArguments, answer_field: str, seed: int):
    if script_args.dataset_name == "toy":
        from .toy.task import toy_dataset

        dataset = toy_dataset("train", script_args.toy_train_size, seed=seed)
    elif script_args.dataset_format == "taco":
        from .data import load_taco_dataset

        dataset = load_taco_dataset(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            config=script_args.dataset_config,
            answer_field=answer_field,
        )
    elif script_args.dataset_format != "plain":
        raise ValueError(f"dataset_format must be 'plain' or 'taco', got {script_args.dataset_format!r}")
    else:
        from .data import load_prompt_dataset

        dataset = load_prompt_dataset(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            config=script_args.dataset_config,
            prompt_field=script_args.prompt_field,
            answer_field=answer_field,
        )
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    return format_prompts(dataset, script_args.instruction, script_args.chat_prompt)


def format_prompts(dataset, instruction: str, chat_prompt: bool):
    """Append the instruction to each prompt and optionally make it a chat message."""

    def fmt(row):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            text = f"{prompt.rstrip()}\n{instruction}" if instruction else prompt
            return {"prompt": [{"role": "user", "content": text}] if chat_prompt else text}
        if instruction:  # conversational: extend the last user message
            last = dict(prompt[-1], content=f"{prompt[-1]['content'].rstrip()}\n{instruction}")
            return {"prompt": [*prompt[:-1], last]}
        return {"prompt": prompt}

    if not instruction and not chat_prompt:
        return dataset
    return dataset.map(fmt, desc="formatting prompts")


NULL_STRINGS = ("null", "none")


def _optional_fields(dataclass_types) -> dict[str, bool]:
    """``{field name: whether "none" is one of its own values}`` for every field whose type admits None."""
    import dataclasses
    import types
    import typing

    optional = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)  # the annotations: HfArgumentParser narrows Field.type in place
        for f in dataclasses.fields(dtype):
            hint = hints.get(f.name)
            if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
                # e.g. TrainingArguments.report_to, whose documented value 'none' means "no integrations"
                help_text = str(f.metadata.get("help", ""))
                optional[f.name] = f.default == "none" or "'none'" in help_text or '"none"' in help_text
    return optional


def null_means_none(parser, dataclass_types) -> None:
    """``--key null`` / ``--key none`` on the command line give None for every optional field, as YAML's null does.

    HfArgumentParser types an ``X | None`` field as ``X``, so "null" arrived as the string "null" (and
    ``--teacher_model null`` then failed next to ``--teacher_server_url``). A field that documents the
    string 'none' as one of its values (``report_to``) keeps "none"; "null" is None for it too.
    """
    optional = _optional_fields(dataclass_types)
    for action in parser._actions:
        if action.dest not in optional or action.nargs in ("+", "*"):
            continue
        nulls = ("null",) if optional[action.dest] else NULL_STRINGS
        convert = action.type

        def typed(value, convert=convert, nulls=nulls):
            if isinstance(value, str) and value.strip().lower() in nulls:
                return None
            return convert(value) if convert is not None else value

        action.type = typed
        if action.choices is not None and None not in action.choices:
            action.choices = [*action.choices, None]


def run_cli(argv: list[str], prog: str = "scope train", check_only: bool = False) -> int:
    """Parse ``argv`` (``--config`` file first, the command line over it) and train.

    ``check_only`` (``scope --check train ...``): stop once the arguments and the config have been parsed
    and validated (every ``SCOPEConfig`` / ``GRPOConfig`` check), without loading models or data.
    """
    from trl import ModelConfig, TrlParser

    from .trainer import SCOPEConfig

    dataclass_types = (TrainScriptArguments, SCOPEConfig, ModelConfig)
    parser = TrlParser(dataclass_types, prog=prog, description=__doc__)
    null_means_none(parser, dataclass_types)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if check_only:
        print(f"{prog}: arguments OK (algorithm={training_args.algorithm}, model={model_args.model_name_or_path}, "
              f"teacher={_teacher_summary(training_args)}, "
              f"output_dir={training_args.output_dir})")
        return 0
    return train(script_args, training_args, model_args)


def _teacher_summary(training_args) -> str | None:
    if training_args.teachers:
        return f"{sorted(training_args.teachers)} routed by {training_args.teacher_routing}"
    return training_args.teacher_model or training_args.teacher_server_url


def train(script_args, training_args, model_args) -> int:
    """One job in ``output_dir``: locked against a second run, refused if it holds another run's files."""
    import contextlib

    from .checkpointing import output_dir_lock, prepare_output_dir, select_resume_checkpoint

    output_dir = training_args.output_dir
    main_process = training_args.should_save
    with output_dir_lock(output_dir) if main_process else contextlib.nullcontext():
        if main_process or not script_args.overwrite_output_dir:  # only the main process deletes
            prepare_output_dir(output_dir, resume=script_args.resume, overwrite=script_args.overwrite_output_dir)
        resume_from = None
        if script_args.resume:
            resume_from = select_resume_checkpoint(output_dir, allow_incomplete=script_args.resume_allow_incomplete)
            print(f"scope train: resuming from {resume_from}" if resume_from else "scope train: no checkpoint yet, starting fresh")
        return _train_in_output_dir(script_args, training_args, model_args, resume_from)


def _train_in_output_dir(script_args, training_args, model_args, resume_from: str | None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_name = resolve_model_name(model_args.model_name_or_path, quick=script_args.toy_quick)
    if student_name is None:
        raise ValueError("model_name_or_path is required (a hub id, a local path, or toy:student)")
    training_args.teacher_model = resolve_model_name(training_args.teacher_model, quick=script_args.toy_quick)
    for fields in (training_args.teachers or {}).values():  # toy:teacher inside teachers: too
        for key in ("model", "tokenizer"):
            if fields.get(key):
                fields[key] = resolve_model_name(fields[key], quick=script_args.toy_quick)
    train_dataset = load_train_dataset(script_args, training_args.answer_field, training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(
        student_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    from .data import drop_overlong_prompts

    train_dataset = drop_overlong_prompts(
        train_dataset, model=student_name, processing_class=tokenizer, args=training_args,
        max_prompt_tokens=script_args.max_prompt_tokens,
    )
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(__import__("torch"), model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        student_name,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=model_args.attn_implementation,
    )
    allow_incomplete = script_args.resume_allow_incomplete
    if training_args.algorithm == "kd":
        from .kd import build_kd_trainer

        kd_trainer = build_kd_trainer(model, tokenizer, train_dataset, training_args, resume_from_checkpoint=resume_from)
        kd_trainer.train(resume_from_checkpoint=resume_from, allow_incomplete_checkpoint=allow_incomplete)
        kd_trainer.save_model(training_args.output_dir)
        return 0

    from trl import get_peft_config

    from .trainer import SCOPETrainer

    trainer = SCOPETrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=resume_from, allow_incomplete_checkpoint=allow_incomplete)
    trainer.save_model(training_args.output_dir)  # atomic: staged, then renamed into place, manifest last
    return 0
