"""Training / benchmark data edge cases: line splitting, bad bytes, NaN golds, null fields, prompt length."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
import warnings

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.cli import main as scope_main
from scope_opd.data import drop_overlong_prompts, load_prompt_dataset
from scope_opd.evaluation.benchmarks import load_problems, read_rows
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

PROMPTS = ["Add 12+7.\n", "Add 30+45.\n", "Add 9+9.\n", "Add 61+22.\n"]
ANSWERS = ["19", "75", "18", "83"]


def write_jsonl(path, rows, *, ensure_ascii=False):
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- JSON Lines splitting


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])  # valid raw inside JSON strings
def test_jsonl_strings_with_characters_splitlines_breaks_on_load_intact(tmp_path, separator):
    rows = [{"prompt": f"first{separator}second", "answer": f"a{separator}b"}, {"prompt": "plain", "answer": "2"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)  # the raw character, not a \\u escape
    assert separator in (tmp_path / "train.jsonl").read_text(encoding="utf-8")
    dataset = load_prompt_dataset(path)
    assert dataset["prompt"] == [r["prompt"] for r in rows] and dataset["answer"] == [r["answer"] for r in rows]
    problems = load_problems(path, prompt_field="prompt", verifier="exact", instruction="").problems
    assert [p.prompt for p in problems] == [r["prompt"] for r in rows]


def test_jsonl_is_streamed_not_read_whole(tmp_path):
    line = json.dumps({"prompt": "x" * 2000, "answer": "1"}) + "\n"
    path = tmp_path / "big.jsonl"
    path.write_text(line * 5000)  # 10 MB
    size = path.stat().st_size
    _, rows = read_rows(str(path))
    tracemalloc.start()
    count = sum(1 for _ in rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 5000
    assert peak < size / 20, f"reading a {size} byte file peaked at {peak} bytes of Python allocations"


# ---------------------------------------------------------------------------- bad bytes


def test_non_utf8_bytes_are_an_error_naming_file_and_line(tmp_path):
    good = json.dumps({"prompt": "Add 1+1.", "answer": "2"}).encode()
    bad = b'{"prompt": "caf\xe9 au lait", "answer": "3"}'
    plain = tmp_path / "latin1.jsonl"
    plain.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{plain}: line 3: not UTF-8 (byte b'\\xe9' at column 16)")):
        load_prompt_dataset(str(plain))
    packed = tmp_path / "latin1.jsonl.gz"
    packed.write_bytes(gzip.compress(good + b"\n" + bad + b"\n"))
    with pytest.raises(ValueError, match=re.escape(f"{packed}: line 2: not UTF-8")):
        load_prompt_dataset(str(packed))
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[" + good + b",\n" + bad + b"]")
    with pytest.raises(ValueError, match=re.escape(f"{array}: line 2: not UTF-8")):
        load_problems(str(array), prompt_field="prompt")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Add 1+1.", "answer": "2"}).encode() + b"\n")
    assert load_prompt_dataset(str(path))["prompt"] == ["Add 1+1."]


# ---------------------------------------------------------------------------- NaN golds, null fields


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_golds_in_parquet_are_rejected_not_turned_into_strings(tmp_path, bad):
    path = tmp_path / "train.parquet"
    Dataset.from_dict({"question": ["Add 1+1.", "Add 2+2."], "gold": [2.0, bad]}).to_parquet(str(path))
    message = re.escape(f"{path}: row 1: field 'gold' is {bad!r}, not a usable gold answer")
    with pytest.raises(ValueError, match=message):
        load_prompt_dataset(str(path), prompt_field="question", answer_field="gold")
    with pytest.raises(ValueError, match=message):
        load_problems(str(path), prompt_field="question", answer_field="gold")


def test_nan_inside_a_test_case_gold_and_as_a_json_literal_is_rejected(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "p", "answer": "1"}\n{"prompt": "q", "answer": NaN}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: field 'answer' is nan")):
        load_prompt_dataset(str(path))
    path.write_text('{"prompt": "p", "answer": {"inputs": [[1]], "outputs": [Infinity]}}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: field 'answer' is inf")):
        load_prompt_dataset(str(path))


def test_null_prompt_or_answer_is_reported_as_null_not_missing(tmp_path):
    path = tmp_path / "train.parquet"
    Dataset.from_dict({"question": ["Add 1+1.", None], "gold": ["2", "4"]}).to_parquet(str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 1: field 'question' is null")):
        load_prompt_dataset(str(path), prompt_field="question", answer_field="gold")
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "1"}, {"prompt": None, "answer": None}])
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}: line 2: field 'prompt', 'answer' is null")):
        load_prompt_dataset(jsonl)
    with pytest.raises(ValueError, match=re.escape(f"line 2: field 'prompt', 'answer' is null")):
        load_problems(jsonl, prompt_field="prompt")


# ---------------------------------------------------------------------------- prompt length


def trainer_args(tmp_path, **overrides) -> SCOPEConfig:
    base = dict(output_dir=str(tmp_path / "out"), algorithm="grpo", per_device_train_batch_size=4, num_generations=2,
                max_completion_length=8, max_steps=1, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    base.update(overrides)
    return SCOPEConfig(**base)


def exact(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_prompt_length_rule_agrees_with_trls_own_tokenisation_at_the_boundary(tmp_path, tiny_pair_dir):
    # The tiny student has 512 positions; with 8 completion tokens a prompt may have 504.
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    fits, too_long = "1" * 504, "1" * 505
    dataset = Dataset.from_dict({"prompt": [fits, too_long, *PROMPTS], "answer": ["", "", *ANSWERS]})
    with pytest.warns(UserWarning, match=re.escape(
            "dropped 1 of 6 training prompts longer than 504 tokens (512 positions - max_completion_length 8): "
            "rows 1 (505 tokens)")):
        trainer = SCOPETrainer(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]), reward_funcs=[exact],
                               args=trainer_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    assert trainer.train_dataset["prompt"] == [fits, *PROMPTS]
    # What TRL generates from is exactly what the rule measured.
    prompt_ids, _, _ = trainer._tokenize_prompts([fits, too_long])
    assert [len(ids) for ids in prompt_ids] == [504, 505]


def test_huge_prompt_is_dropped_by_the_python_api_and_training_runs(tmp_path, tiny_pair_dir):
    # 200,000 characters (the reported crash had 1,000,000: the rule does not depend on the size,
    # and the char tokenizer takes ~6 s on a million).
    huge = "7" * 200_000
    dataset = Dataset.from_dict({"prompt": [*PROMPTS[:2], huge, *PROMPTS[2:]], "answer": [*ANSWERS[:2], "1", *ANSWERS[2:]]})
    with pytest.warns(UserWarning, match=r"dropped 1 of 5 training prompts .* rows 2 \(200000 characters, not tokenized\)"):
        # processing_class=None: the rule loads the student's tokenizer, as TRL does.
        trainer = SCOPETrainer(tiny_pair_dir["student"], reward_funcs=[exact], args=trainer_args(tmp_path),
                               train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 1


def test_prompt_length_errors_name_the_numbers(tmp_path, tiny_pair_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    dataset = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    model = tiny_pair_dir["student"]
    args, no_room = trainer_args(tmp_path), trainer_args(tmp_path, max_completion_length=512)
    with pytest.raises(ValueError, match=re.escape("every one of the 4 training prompts is longer than 5 tokens "
                                                   "(max_prompt_tokens); the shortest has 9")):
        drop_overlong_prompts(dataset, model=model, processing_class=tokenizer, args=args, max_prompt_tokens=5)
    with pytest.raises(ValueError, match=re.escape("max_completion_length=512 leaves no room for a prompt in the "
                                                   "student's 512 positions")):
        drop_overlong_prompts(dataset, model=model, processing_class=tokenizer, args=no_room)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to drop: no warning
        kept = drop_overlong_prompts(dataset, model=model, processing_class=tokenizer, args=args, max_prompt_tokens=11)
    assert len(kept) == 4


def test_scope_train_cli_drops_an_overlong_prompt_with_a_warning_naming_the_row(tmp_path, tiny_pair_dir):
    import yaml

    rows = [{"question": q, "gold": a} for q, a in zip(PROMPTS, ANSWERS)]
    rows.insert(1, {"question": "9" * 100_000, "gold": "0"})
    config = {"model_name_or_path": tiny_pair_dir["student"], "dataset_name": write_jsonl(tmp_path / "t.jsonl", rows),
              "prompt_field": "question", "answer_field": "gold", "verifier": "exact", "algorithm": "grpo",
              "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, "max_steps": 1,
              "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no",
              "output_dir": str(tmp_path / "out"), "max_prompt_tokens": 64}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match=re.escape("dropped 1 of 5 training prompts longer than 64 tokens "
                                                   "(max_prompt_tokens): rows 1 (100000 characters, not tokenized)")):
        assert scope_main(["train", "--config", str(tmp_path / "c.yaml")]) == 0



# ---------------------------------------------------------------------------- hostile rows (issue 18, item 9)


def test_jsonl_line_nested_100k_deep_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: JSON nested too deeply")):
        load_prompt_dataset(str(path))


def test_json_array_nested_100k_deep_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(ValueError, match=re.escape(f"{path}: JSON nested too deeply")):
        load_prompt_dataset(str(path))


def test_parquet_struct_holding_a_datetime_is_an_error_naming_file_and_row(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dates.parquet"
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [{"due": None, "n": 1}, {"due": when, "n": 2}]}), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 1: field 'answer' holds a value that is not JSON")):
        load_prompt_dataset(str(path))


def test_a_huge_prompt_line_is_dropped_naming_its_row_without_tokenizing_it(tmp_path, tiny_pair_dir):
    """The issue's 100 MB line took 6 GB in the tokenizer and aborted; 8 MB here took ~3 GB before the fix."""
    import subprocess
    import sys

    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        for prompt, answer in zip(PROMPTS, ANSWERS):
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        f.write(json.dumps({"prompt": "ab c" * 2_000_000, "answer": "1"}) + "\n")  # 8 MB
    code = (
        "import sys, warnings\n"
        "from types import SimpleNamespace\n"
        "from transformers import AutoTokenizer\n"
        "from scope_opd.data import drop_overlong_prompts, load_prompt_dataset\n"
        f"dataset = load_prompt_dataset({str(path)!r})\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    kept = drop_overlong_prompts(dataset, model={tiny_pair_dir['student']!r}, processing_class="
        f"AutoTokenizer.from_pretrained({tiny_pair_dir['student']!r}), args=SimpleNamespace(max_completion_length=8))\n"
        "print(len(kept), [str(w.message) for w in caught])\n"
        # VmHWM, this process's own peak: ru_maxrss would include the peak of the pytest process that started it
        # (Linux carries it over the exec), gigabytes once a worker has run the real-model tests
        "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:')) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kept_line, peak_mb = done.stdout.strip().splitlines()[-2:]
    assert kept_line.startswith("4 ") and "rows 4 (8000000 characters, not tokenized)" in kept_line
    assert int(peak_mb) < 1500, f"peak resident memory {peak_mb} MB"  # the 8 MB row costs its characters, no more
