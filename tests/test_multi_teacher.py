"""Several teachers (scope_opd/teachers/routing.py): config parsing, key and min_perplexity routing, errors, counters.

References are independent of the code under test: each teacher's log-probs are recomputed here from the models
(a plain forward and log_softmax), the routing is decided here by hand, and eq. 5 is written again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers import InProcessTeacher
from scope_opd.teachers.routing import TeacherPool, parse_teachers
from scope_opd.trainer import SCOPEConfig
from test_trainer import PROMPTS, RecordingTrainer, has_digit_reward, make_args


def parse_train_config(config, *argv):
    """``scope train --config CONFIG ARGV...`` parsed as the CLI parses it (the real TrlParser), SCOPEConfig back."""
    from trl import ModelConfig, TrlParser

    from scope_opd.train_cli import TrainScriptArguments, null_means_none

    types = (TrainScriptArguments, SCOPEConfig, ModelConfig)
    parser = TrlParser(types)
    null_means_none(parser, types)
    return parser.parse_args_and_config(["--config", str(config), *argv])[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def three_teachers(tiny_pair_dir, char_tokenizer, tmp_path_factory):
    """tiny_pair_dir's student and teacher, plus a second teacher (another seed and width)."""
    from conftest import build_tiny_qwen2

    path = tmp_path_factory.mktemp("second_teacher") / "teacher_b"
    build_tiny_qwen2(char_tokenizer, hidden_size=40, seed=7).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return {"student": tiny_pair_dir["student"], "a": tiny_pair_dir["teacher"], "b": str(path)}


def forward_logps(model_dir, prompt, completion):
    """log p(completion token t | prompt, completion[:t]) by a plain forward: the reference for every teacher."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)].float()


def eq5_weights(group_ids, incorrect, teacher_mean, tau):
    """Paper eq. 5 with weight_normalization='sum': softmax over a group's incorrect rows of mean log-prob / tau."""
    out = torch.zeros(len(incorrect))
    for g in group_ids.unique():
        rows = ((group_ids == g) & incorrect).nonzero().flatten()
        if len(rows):
            values = torch.tensor([teacher_mean[i] / tau for i in rows.tolist()], dtype=torch.float64)
            out[rows] = torch.softmax(values, 0).float()
    return out


def rows_of(gen):
    mask = gen["completion_mask"].bool()
    prompts = [p[m.bool()].tolist() for p, m in zip(gen["prompt_ids"], gen["prompt_mask"])]
    completions = [c[m].tolist() for c, m in zip(gen["completion_ids"], mask)]
    return prompts, completions, mask


def incorrect_rows(gen, tokenizer):
    _, completions, _ = rows_of(gen)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return torch.tensor(has_digit_reward(None, texts)) != 1.0


# ---------------------------------------------------------------------------------------------------- config


def test_teachers_mapping_reaches_the_config_through_trl_parser(tmp_path):
    """YAML mapping in --config, a JSON string on the command line, a Python-repr string: all the same mapping."""
    config = tmp_path / "multi.yaml"
    config.write_text(
        "output_dir: out\nuse_cpu: true\n"
        "teachers:\n  math: {model: toy:teacher, dtype: float32}\n"
        "  code: {server_url: 'http://127.0.0.1:8000', tokenizer: some/tok, timeout: 30}\n"
        "teacher_routing: key\nteacher_key: source\n"
    )

    def parse(*argv):
        return parse_train_config(config, *argv)

    args = parse()
    assert args.teachers == {"math": {"model": "toy:teacher", "dtype": "float32"},
                             "code": {"server_url": "http://127.0.0.1:8000", "tokenizer": "some/tok", "timeout": 30.0}}
    assert list(args.teachers) == ["math", "code"]  # config order: the tie order of min_perplexity
    assert (args.teacher_routing, args.teacher_key) == ("key", "source")
    cli = parse("--teachers", json.dumps({"x": {"model": "/m/x"}, "y": {"model": "/m/y", "temperature": 0.5}}))
    assert cli.teachers == {"x": {"model": "/m/x"}, "y": {"model": "/m/y", "temperature": 0.5}}
    assert parse("--teachers", repr({"x": {"model": "/m/x"}})).teachers == {"x": {"model": "/m/x"}}
    assert parse("--teachers", "null").teachers is None
    # the config round-trips through JSON (TrainingArguments.to_json_string, saved with checkpoints)
    assert json.loads(args.to_json_string())["teachers"] == args.teachers


@pytest.mark.parametrize("teachers, extra, message", [
    ({"a": {"modle": "x"}}, {}, r"teachers\.a: unknown key 'modle'"),
    ({"a": {"model": "x", "server_url": "http://h"}}, {}, r"teachers\.a: set exactly one of 'model'"),
    ({"a": {"dtype": "float32"}}, {}, r"teachers\.a: set exactly one of 'model'"),
    ({"a": {"server_url": "http://h", "temperature": 0.7}}, {}, r"teachers\.a: temperature != 1"),
    ({"a": {"model": "x", "batch_size": "8"}}, {}, r"teachers\.a\.batch_size must be an integer"),
    ({"a": "x"}, {}, r"teachers\.a must be a mapping"),
    ({"a/b": {"model": "x"}}, {}, r"teacher name 'a/b'"),
    ({}, {}, r"non-empty mapping"),
    ("{a: [", {}, r"cannot parse"),
    ({"a": {"model": "x"}}, {"teacher_model": "y"}, r"either teachers \(several\) or teacher_model"),
    ({"a": {"model": "x"}}, {"teacher_server_url": "http://h"}, r"either teachers \(several\) or teacher_model"),
    ({"a": {"model": "x"}}, {"teacher_routing": "vote"}, r"teacher_routing must be one of"),
    # a server teacher without its own temperature takes the top-level one, which a server cannot apply
    ({"a": {"model": "x"}, "srv": {"server_url": "http://h"}}, {"teacher_temperature": 0.7},
     r"teachers\.srv: a server teacher scores at temperature 1.*teacher_temperature is 0\.7"),
    # a non-default routing with one teacher routes nothing: a config mistake, not a silent no-op
    (None, {"teacher_model": "y", "teacher_routing": "min_perplexity"}, r"teacher_routing='min_perplexity' needs teachers"),
])
def test_bad_teachers_settings_are_errors_naming_the_teacher_and_key(tmp_path, teachers, extra, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, teachers=teachers, **extra)


def test_a_server_teacher_with_its_own_temperature_1_is_accepted_under_a_tempered_top_level(tmp_path):
    from scope_opd.teachers.routing import teacher_fields

    args = make_args(tmp_path, teachers={"a": {"model": "x"}, "srv": {"server_url": "http://h", "temperature": 1}},
                     teacher_temperature=0.7)
    assert teacher_fields(args, "srv").teacher_temperature == 1.0  # what the server really applies
    assert teacher_fields(args, "a").teacher_temperature == 0.7  # the in-process teacher inherits the top level


def test_exponent_numbers_and_python_none_are_read_as_numbers_and_none(tmp_path):
    """YAML 1.1 reads 1.5e2 as a string (yaml.safe_load, as TrlParser reads --config); JSON 1e3 is a number; a
    Python repr's None is None. The top-level teacher_timeout: 1.5e2 is a number too: the same value either way."""
    config = tmp_path / "exp.yaml"
    config.write_text("output_dir: out\nuse_cpu: true\nteacher_timeout: 1.5e2\n"
                      "teachers:\n  a: {model: /m, timeout: 1.5e2, temperature: 5e-1}\n")

    def parse(*argv):
        return parse_train_config(config, *argv)

    args = parse()
    assert args.teacher_timeout == 150.0
    assert args.teachers == {"a": {"model": "/m", "timeout": 150.0, "temperature": 0.5}}
    assert parse("--teachers", '{"a": {"model": "/m", "timeout": 1e3}}').teachers == {"a": {"model": "/m", "timeout": 1000.0}}
    assert parse("--teachers", "{'a': {'model': '/m', 'tokenizer': None}}").teachers == {"a": {"model": "/m", "tokenizer": None}}
    with pytest.raises(ValueError, match=r"teachers\.a\.timeout must be a positive number, got 'soon'"):
        parse_teachers({"a": {"model": "/m", "timeout": "soon"}})


def test_parse_teachers_is_idempotent():
    parsed = parse_teachers({"a": {"model": "x", "timeout": 5}})
    assert parse_teachers(parsed) == parsed == {"a": {"model": "x", "timeout": 5.0}}


# ---------------------------------------------------------------------------------------------------- min_perplexity


def test_min_perplexity_distils_each_wrong_rollout_toward_its_lowest_perplexity_teacher(tmp_path, three_teachers):
    """Two in-process teachers: the trainer's teacher log-probs of each wrong row are the lowest-perplexity teacher's
    (recomputed here by a plain forward of both models), and eq. 5 uses that teacher's perplexity."""
    paths = three_teachers
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}},
                     teacher_routing="min_perplexity", weight_normalization="sum", tau=0.5, student_weighting="uniform")
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    trainer = RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward],
                               args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()
    (gen,) = trainer.generation_batches
    prompts, completions, mask = rows_of(gen)
    incorrect = incorrect_rows(gen, tokenizer)
    assert incorrect.sum() >= 2
    expected = torch.zeros(mask.shape)
    teacher_mean = torch.zeros(len(prompts))
    chosen = []
    for i in incorrect.nonzero().flatten().tolist():
        by_teacher = {name: forward_logps(paths[name], prompts[i], completions[i]) for name in ("a", "b")}
        means = {name: float(v.double().mean()) for name, v in by_teacher.items()}
        best = "a" if means["a"] >= means["b"] else "b"  # lowest perplexity; ties to the first in config order
        chosen.append(best)
        expected[i, : len(completions[i])] = by_teacher[best]
        teacher_mean[i] = means[best]
    torch.testing.assert_close(gen["teacher_per_token_logps"], expected, atol=2e-5, rtol=0)
    group_ids = torch.arange(len(prompts)) // args.num_generations
    torch.testing.assert_close(gen["scope_teacher_weights"], eq5_weights(group_ids, incorrect, teacher_mean, 0.5),
                               atol=1e-5, rtol=0)
    logged = trainer.state.log_history[0]
    for name in ("a", "b"):
        assert logged[f"teacher/{name}/rows"] == chosen.count(name)
        assert logged[f"teacher/{name}/score_calls"] == 1  # every teacher scored every wrong row, in one call
    routed_tokens = {name: sum(len(completions[i]) for i, c in zip(incorrect.nonzero().flatten().tolist(), chosen) if c == name)
                     for name in ("a", "b")}
    assert logged["teacher/a/token_frac"] == pytest.approx(routed_tokens["a"] / sum(routed_tokens.values()))
    if chosen.count("a"):
        rows_a = [teacher_mean[i].item() for i, c in zip(incorrect.nonzero().flatten().tolist(), chosen) if c == "a"]
        assert logged["teacher/a/mean_logp"] == pytest.approx(sum(rows_a) / len(rows_a), rel=1e-4)
        assert logged["teacher/a/mean_ppl"] == pytest.approx(sum(math.exp(-m) for m in rows_a) / len(rows_a), rel=1e-4)


class NaNOnRow:
    """A real in-process teacher that returns NaN log-probs for the rows whose completion starts with ``bad_first``."""

    def __init__(self, path, poisoned):
        self.inner = InProcessTeacher(AutoModelForCausalLM.from_pretrained(path))
        self.poisoned = poisoned

    def score(self, prompt_ids, completion_ids):
        out = self.inner.score(prompt_ids, completion_ids)
        return [torch.full_like(v, float("nan")) if self.poisoned(p, c) else v
                for p, c, v in zip(prompt_ids, completion_ids, out)]


def test_min_perplexity_never_hands_a_row_one_teacher_failed_on_to_another(tmp_path, three_teachers):
    """Teacher b returns NaN on some wrong rows: they are dropped (zero weight, out of the loss) and counted in
    b's nan_rows and scope/teacher_nonfinite_rows, even where teacher a scored them fine."""
    paths = three_teachers
    poisoned_prompt = None

    def poisoned(prompt, completion):
        return prompt == poisoned_prompt

    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}},
                     teacher_routing="min_perplexity", student_weighting="uniform")
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    poisoned_prompt = tokenizer(PROMPTS[0])["input_ids"]
    trainer = RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward],
                               args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                               teacher={"b": NaNOnRow(paths["b"], poisoned)})
    trainer.train()
    (gen,) = trainer.generation_batches
    prompts, completions, mask = rows_of(gen)
    incorrect = incorrect_rows(gen, tokenizer)
    hit = torch.tensor([p == poisoned_prompt and len(c) > 0 for p, c in zip(prompts, completions)]) & incorrect
    assert hit.sum() >= 1
    assert (gen["scope_loss_mask"][hit] == 0).all() and (gen["scope_teacher_weights"][hit] == 0).all()
    assert (gen["teacher_per_token_logps"][hit] == 0).all()
    logged = trainer.state.log_history[0]
    assert logged["teacher/b/nan_rows"] == hit.sum().item()
    assert logged["scope/teacher_nonfinite_rows"] == hit.sum().item()
    assert logged["teacher/a/nan_rows"] == 0
    nonempty = torch.tensor([len(c) > 0 for c in completions])
    assert logged["teacher/a/rows"] + logged["teacher/b/rows"] == (incorrect & ~hit & nonempty).sum().item()


# ---------------------------------------------------------------------------------------------------- key


class Counting:
    """A real teacher, recording which rows it was asked to score."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def score(self, prompt_ids, completion_ids):
        self.seen.extend(zip(map(tuple, prompt_ids), map(tuple, completion_ids)))
        return self.inner.score(prompt_ids, completion_ids)


def key_dataset(column="teacher", names=("a", "b", "b", "a")):
    return Dataset.from_dict({"prompt": PROMPTS, column: list(names)})


def test_key_routing_sends_each_wrong_row_only_to_the_teacher_its_column_names(tmp_path, three_teachers):
    paths = three_teachers
    counting = {name: Counting(InProcessTeacher(AutoModelForCausalLM.from_pretrained(paths[name]))) for name in ("a", "b")}
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}}, teacher_routing="key",
                     per_device_train_batch_size=16)  # all four prompts in the batch: both teachers have rows
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    trainer = RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward],
                               args=args, train_dataset=key_dataset(), processing_class=tokenizer, teacher=counting)
    trainer.train()
    (gen,) = trainer.generation_batches
    prompts, completions, mask = rows_of(gen)
    incorrect = incorrect_rows(gen, tokenizer)
    named = {tuple(tokenizer(p)["input_ids"]): n for p, n in zip(PROMPTS, ("a", "b", "b", "a"))}
    expected = torch.zeros(mask.shape)
    wanted = {"a": [], "b": []}
    for i in incorrect.nonzero().flatten().tolist():
        name = named[tuple(prompts[i])]
        if completions[i]:
            wanted[name].append((tuple(prompts[i]), tuple(completions[i])))
        expected[i, : len(completions[i])] = forward_logps(paths[name], prompts[i], completions[i])
    assert wanted["a"] and wanted["b"]
    for name in ("a", "b"):
        assert sorted(counting[name].seen) == sorted(wanted[name])
    torch.testing.assert_close(gen["teacher_per_token_logps"], expected, atol=2e-5, rtol=0)
    logged = trainer.state.log_history[0]
    assert logged["teacher/a/rows"] == len(wanted["a"]) and logged["teacher/b/rows"] == len(wanted["b"])


@pytest.mark.parametrize("dataset, message", [
    (key_dataset(column="source"), r"no column 'teacher' \(teacher_key\).*known teachers: \['a', 'b'\]"),
    (key_dataset(names=("a", "b", "c", "a")), r"row 2 of the training dataset names teacher 'c' in column 'teacher'; "
                                              r"known teachers: \['a', 'b'\]"),
])
def test_key_routing_refuses_a_dataset_without_the_column_or_with_an_unknown_teacher(tmp_path, three_teachers, dataset,
                                                                                       message):
    paths = three_teachers
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}})
    with pytest.raises(ValueError, match=message):
        RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward], args=args,
                         train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(paths["student"]))


@pytest.mark.parametrize("eval_dataset, message", [
    (Dataset.from_dict({"prompt": PROMPTS}), r"the evaluation dataset has no column 'teacher' \(teacher_key\)"),
    ({"held": key_dataset(), "other": key_dataset(names=("a", "b", "c", "a"))},
     r"row 2 of the evaluation dataset 'other' names teacher 'c' in column 'teacher'; known teachers: \['a', 'b'\]"),
])
def test_key_routing_refuses_an_evaluation_dataset_it_cannot_route_at_start_up(tmp_path, three_teachers, eval_dataset,
                                                                              message):
    """Evaluation scores with the teachers too: its dataset (or each of a dict of them) is checked before training."""
    paths = three_teachers
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}},
                     eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8)
    with pytest.raises(ValueError, match=message):
        RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward], args=args,
                         train_dataset=key_dataset(), eval_dataset=eval_dataset,
                         processing_class=AutoTokenizer.from_pretrained(paths["student"]))


def test_a_scorer_for_a_teacher_not_in_teachers_is_an_error_naming_it(tmp_path, three_teachers):
    paths = three_teachers
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]}, "b": {"model": paths["b"]}})
    scorer = InProcessTeacher(AutoModelForCausalLM.from_pretrained(paths["a"]))
    with pytest.raises(ValueError, match=r"teacher= names \['c'\], not in teachers \['a', 'b'\]"):
        RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward], args=args,
                         train_dataset=key_dataset(), processing_class=AutoTokenizer.from_pretrained(paths["student"]),
                         teacher={"a": scorer, "c": scorer})


def test_row_routes_error_names_the_batch_row_column_and_teachers():
    from scope_opd.teachers.routing import row_routes

    rows = [{"prompt": "p0", "teacher": "a"}, {"prompt": "p1"}]
    with pytest.raises(ValueError, match=r"row 7 of the generation batch \(prompt 'p1'\) has no column 'teacher'.*\['a', 'b'\]"):
        row_routes(rows, "teacher", ["a", "b"], [3, 7])
    pool = TeacherPool({"a": object(), "b": object()}, routing="key")
    with pytest.raises(ValueError, match="needs each row's teacher name"):
        pool.score([[1]], [[2]])


def test_a_failing_teacher_raises_and_is_counted_never_replaced():
    class Broken:
        def score(self, prompt_ids, completion_ids):
            raise RuntimeError("teacher b is down")

    class Fine:
        def score(self, prompt_ids, completion_ids):
            return [torch.zeros(len(c)) for c in completion_ids]

    for routing in ("key", "min_perplexity"):
        pool = TeacherPool({"a": Fine(), "b": Broken()}, routing=routing)
        names = {"teacher_names": ["a", "b"]} if routing == "key" else {}
        with pytest.raises(RuntimeError, match="teacher b is down"):
            pool.score([[1], [1]], [[2], [3]], **names)
        delta = pool.stats_delta()
        assert delta["b/failures"] == 1 and delta["a/failures"] == 0


# ---------------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def two_servers(three_teachers):
    from scope_opd.teachers.serve import start_server

    started = {name: start_server(three_teachers[name], "127.0.0.1", 0, dtype="float32", device="cpu", batch_size=4)
               for name in ("a", "b")}
    yield {name: server.url for name, (server, _) in started.items()}
    for server, thread in started.values():
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_server_teacher_down_at_start_up_is_named_by_its_teachers_key(tmp_path, three_teachers):
    """A real closed port: the start-up check's TeacherServerError keeps its type and URL and names teachers.<name>."""
    import socket

    from scope_opd.teachers.server_client import TeacherServerError

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    paths = three_teachers
    url = f"http://127.0.0.1:{port}/v1"
    args = make_args(tmp_path, teachers={"a": {"model": paths["a"]},
                                         "down": {"server_url": url, "tokenizer": paths["b"], "max_retries": 0, "timeout": 5}},
                     teacher_routing="min_perplexity")
    with pytest.raises(TeacherServerError, match=r"^teachers\.down: ") as caught:
        RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward], args=args,
                         train_dataset=key_dataset(), processing_class=AutoTokenizer.from_pretrained(paths["student"]))
    assert caught.value.url.startswith(url)


def test_key_routing_with_two_server_teachers(tmp_path, three_teachers, two_servers):
    """Two `scope serve-teacher` servers of different models: each got exactly the wrong rows its column names
    (one row per request: the request counts) and the trainer's log-probs are that server's model's."""
    paths = three_teachers
    teachers = {name: {"server_url": two_servers[name] + "/v1", "tokenizer": paths[name]} for name in ("a", "b")}
    args = make_args(tmp_path, teachers=teachers, teacher_routing="key", per_device_train_batch_size=16)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    trainer = RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward],
                               args=args, train_dataset=key_dataset(), processing_class=tokenizer)
    trainer.train()
    (gen,) = trainer.generation_batches
    prompts, completions, mask = rows_of(gen)
    incorrect = incorrect_rows(gen, tokenizer)
    named = {tuple(tokenizer(p)["input_ids"]): n for p, n in zip(PROMPTS, ("a", "b", "b", "a"))}
    expected = torch.zeros(mask.shape)
    count = {"a": 0, "b": 0}
    for i in incorrect.nonzero().flatten().tolist():
        name = named[tuple(prompts[i])]
        count[name] += bool(completions[i])
        expected[i, : len(completions[i])] = forward_logps(paths[name], prompts[i], completions[i])
    torch.testing.assert_close(gen["teacher_per_token_logps"], expected, atol=1e-4, rtol=0)
    logged = trainer.state.log_history[0]
    for name in ("a", "b"):
        # one scoring request per row, plus the start-up GET /v1/models of the context-length check
        assert logged[f"teacher/{name}/server/requests"] == count[name] + 1
        assert logged[f"teacher/{name}/requests"] == count[name] + 1
        assert logged[f"teacher/{name}/rows"] == count[name]
        assert logged[f"teacher/{name}/server/failures"] == 0


# ---------------------------------------------------------------------------------------------------- overlap, sampler


@pytest.mark.parametrize("routing", ["key", "min_perplexity"])
def test_overlap_and_sampler_logprobs_with_several_teachers_match_the_synchronous_step(tmp_path, three_teachers, routing):
    """teacher_overlap (rows prefetched while the batch generates) and student_logprob_source='sampler' give the same
    teacher log-probs and weights as the plain synchronous step, routed the same way."""
    paths = three_teachers
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    teachers = {"a": {"model": paths["a"]}, "b": {"model": paths["b"]}}
    results = {}
    for label, extra in {"sync": {}, "overlap": {"teacher_overlap": True, "student_logprob_source": "sampler"}}.items():
        args = make_args(tmp_path / label, teachers=teachers, teacher_routing=routing, **extra)
        trainer = RecordingTrainer(AutoModelForCausalLM.from_pretrained(paths["student"]), reward_funcs=[has_digit_reward],
                                   args=args, train_dataset=key_dataset(), processing_class=tokenizer)
        trainer.train()
        results[label] = (trainer.generation_batches[0], trainer.state.log_history[0])
    (sync, sync_log), (over, over_log) = results["sync"], results["overlap"]
    torch.testing.assert_close(over["completion_ids"], sync["completion_ids"])
    assert over_log["scope/teacher_prefetched_rows"] > 0  # the teachers really ran in the background
    assert over_log["scope/student_logp_from_sampler"] == 1.0
    torch.testing.assert_close(over["teacher_per_token_logps"], sync["teacher_per_token_logps"], atol=1e-5, rtol=0)
    torch.testing.assert_close(over["scope_teacher_weights"], sync["scope_teacher_weights"], atol=1e-5, rtol=0)
    torch.testing.assert_close(over["scope_student_weights"], sync["scope_student_weights"], atol=1e-4, rtol=0)
    for name in ("a", "b"):
        assert over_log[f"teacher/{name}/rows"] == sync_log[f"teacher/{name}/rows"]


# ---------------------------------------------------------------------------------------------------- 2 processes

DDP_SCRIPT = Path(__file__).parent / "dist_scripts" / "multi_teacher_ddp_step.py"


def test_per_teacher_counters_are_summed_over_two_processes(tmp_path, three_teachers):
    """torchrun --nproc_per_node 2 (gloo): the logged teacher/<name>/* counters are the sums of both processes' rows
    (each rank saves the rows its teachers scored), and token_frac is computed from the summed tokens."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(DDP_SCRIPT), three_teachers["student"], three_teachers["a"],
         three_teachers["b"], str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    logged = json.loads((out / "log_history.json").read_text())[0]
    tokens = {name: sum(len(c) for rank in seen for c in rank[name]) for name in ("a", "b")}
    for name in ("a", "b"):
        rows = sum(len(rank[name]) for rank in seen)
        assert rows > 0
        assert logged[f"teacher/{name}/rows"] == rows
        assert logged[f"teacher/{name}/score_calls"] == sum(1 for rank in seen if rank[name])
        assert logged[f"teacher/{name}/token_frac"] == pytest.approx(tokens[name] / sum(tokens.values()))


class Constant:
    """Returns fixed per-row log-probs: a teacher whose perplexity on each row is known by construction."""

    def __init__(self, per_row):
        self.per_row = per_row

    def score(self, prompt_ids, completion_ids):
        return [torch.full((len(c),), float(v)) for c, v in zip(completion_ids, self.per_row)]


def test_min_perplexity_picks_the_highest_mean_logprob_and_ties_go_to_the_first_listed_teacher():
    prompts, completions = [[1], [1], [1], [1]], [[2, 3], [4], [5, 6, 7], []]
    x = Constant([-1.0, -2.0, -0.5, 0.0])
    y = Constant([-0.5, -2.0, -3.0, 0.0])  # better on row 0, tied on row 1, worse on row 2
    for order in (("x", "y"), ("y", "x")):
        teachers = {"x": x, "y": y}
        pool = TeacherPool({name: teachers[name] for name in order}, routing="min_perplexity")
        scored = pool.score(prompts, completions)
        assert pool.last_routes[:3] == ["y", order[0], "x"]
        assert [v.tolist() for v in scored[:3]] == [[-0.5, -0.5], [-2.0], [-0.5] * 3]
        totals = pool.summarize_counters(pool.stats_delta())
        # the first listed teacher takes the tied row 1: x rows 1 and 2 / y rows 0 and 1
        assert totals[f"{order[0]}/rows"] == 2 and totals[f"{order[1]}/rows"] == 1
        assert totals["x/rows"] + totals["y/rows"] == 3  # the empty row 3 teaches nothing
        tokens = {"x": 1 + 3, "y": 2} if order[0] == "x" else {"x": 3, "y": 2 + 1}
        assert totals["x/token_frac"] == pytest.approx(tokens["x"] / 6)


@pytest.mark.parametrize("routing", ["key", "min_perplexity"])
def test_overlap_counts_only_the_prefetched_rows_the_step_uses(routing):
    """A real TeacherPrefetch over a TeacherPool: rows scored in the background but not taken by the step (row 2 is
    never asked for; row 1's completion changed and is scored again) are not counted; the used and late rows are."""
    from scope_opd.teachers.overlap import TeacherPrefetch

    pool = TeacherPool({"x": Constant([-1.0, -2.0, -3.0]), "y": Constant([-4.0, -5.0, -6.0])}, routing=routing)
    prefetch = TeacherPrefetch(pool)
    names = {"teacher_names": ["x", "x", "y"]} if routing == "key" else {}
    try:
        prefetch.submit([0, 1, 2], [[1], [1], [1]], [[2, 3], [4], [5, 6, 7]], **names)
        asked = {"teacher_names": ["x", "x"]} if routing == "key" else {}
        scored = prefetch.scores([0, 1], [[1], [1]], [[2, 3], [9, 9, 9]], **asked)
    finally:
        prefetch.close()
    assert (prefetch.prefetched_rows, prefetch.missed_rows) == (1, 1)
    # row 0 from the prefetch (x: -1 each, x wins min_perplexity), row 1 scored late ([9, 9, 9]: Constant row 0 is x's -1)
    assert [v.tolist() for v in scored] == [[-1.0, -1.0], [-1.0] * 3]
    totals = pool.summarize_counters(pool.stats_delta())
    assert totals["x/rows"] == 2 and totals["x/tokens"] == 2 + 3
    assert totals["y/rows"] == 0 and totals["y/tokens"] == 0  # row 2 (y's under key routing) was never used
    assert totals["x/token_frac"] == 1.0
