"""Teacher scoring (paper sec. 2, step 3): log pi_T of each sampled token, prompt excluded.

In process, over our HTTP server, and through a vLLM-format client; all on CPU
with the tiny checkpoints from conftest, servers bound to 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch

from scope_opd.teachers import (
    InProcessTeacher,
    ServerTeacher,
    TeacherScorer,
    TeacherServerError,
    check_models_compatible,
    check_tokenizers_match,
    load_teacher_model,
)
from scope_opd.teachers.tokenizer_check import TokenizerMismatchWarning

# Row 1 has a one-token prompt, row 2 an empty completion, row 3 the longest completion.
PROMPT_LENGTHS = [5, 1, 9, 3, 7, 4]
COMPLETION_LENGTHS = [4, 6, 0, 11, 1, 8]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_model(tiny_pair_dir):
    return load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ragged_rows(char_tokenizer):
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, len(char_tokenizer), (n,), generator=generator).tolist()  # noqa: E731
    return [draw(n) for n in PROMPT_LENGTHS], [draw(n) for n in COMPLETION_LENGTHS]


def full_vocab_reference(model, prompts, completions, temperature=1.0) -> list[torch.Tensor]:
    """The naive definition: one unpadded forward per row, full [T, V] log_softmax, gather."""
    out = []
    for prompt, completion in zip(prompts, completions):
        if not completion:
            out.append(torch.empty(0))
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        log_probs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]
        out.append(log_probs.gather(1, torch.tensor(completion)[:, None]).squeeze(1))
    return out


def assert_rows_close(actual, expected, atol):
    assert len(actual) == len(expected)
    for row, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == torch.float32 and a.device.type == "cpu", row
        assert a.shape == e.shape, f"row {row}: {tuple(a.shape)} vs {tuple(e.shape)}"
        torch.testing.assert_close(a, e.float(), atol=atol, rtol=0, msg=f"row {row}")


# -- in process -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, max_tokens_per_batch, logsumexp_chunk_size",
    [
        (8, None, None),  # all rows in one forward, one logsumexp slice
        (1, None, None),  # one row per forward
        (2, None, 3),  # chunk and slice boundaries fall inside rows
        (3, 12, 1),  # token cap below the longest rows: those get a forward of their own
    ],
)
def test_in_process_matches_full_vocab_log_softmax_on_ragged_rows(
    teacher_model, ragged_rows, batch_size, max_tokens_per_batch, logsumexp_chunk_size
):
    prompts, completions = ragged_rows
    teacher = InProcessTeacher(
        teacher_model, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, logsumexp_chunk_size=logsumexp_chunk_size
    )
    assert_rows_close(teacher.score(prompts, completions), full_vocab_reference(teacher_model, prompts, completions), atol=1e-5)


@pytest.mark.parametrize("selection", ["mask", "trailing", "all"])
def test_every_logits_selection_path_gives_the_same_scores(teacher_model, ragged_rows, selection):
    """Boolean logits_to_keep (transformers >= 5), trailing int (older/remote models), full logits."""
    prompts, completions = ragged_rows
    teacher = InProcessTeacher(teacher_model, batch_size=4, fused=False)  # the logits path (the fused one: test_teacher_fused.py)
    assert teacher._logits_selection == "mask"  # what Qwen2 in transformers 5 supports
    teacher._logits_selection = selection
    assert_rows_close(teacher.score(prompts, completions), full_vocab_reference(teacher_model, prompts, completions), atol=1e-5)


class IgnoresLogitsToKeep(torch.nn.Module):
    """A causal LM that accepts ``logits_to_keep`` and returns all logits anyway (some remote-code models do)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_model_that_ignores_logits_to_keep_is_still_scored_right(teacher_model, ragged_rows, caplog):
    prompts, completions = ragged_rows
    teacher = InProcessTeacher(IgnoresLogitsToKeep(teacher_model), batch_size=4)
    assert teacher._logits_selection == "trailing"  # its module has no slice_logits_to_keep
    teacher._logits_selection = "mask"  # as if it had: the shape check must catch it
    with caplog.at_level(logging.WARNING):
        scores = teacher.score(prompts, completions)
    assert "ignored a boolean logits_to_keep" in caplog.text and teacher._logits_selection == "trailing"
    assert_rows_close(scores, full_vocab_reference(teacher_model, prompts, completions), atol=1e-5)


def test_teacher_temperature_divides_the_logits_before_normalising(teacher_model, ragged_rows):
    prompts, completions = ragged_rows
    scores = InProcessTeacher(teacher_model, temperature=0.7, logsumexp_chunk_size=4).score(prompts, completions)
    assert_rows_close(scores, full_vocab_reference(teacher_model, prompts, completions, temperature=0.7), atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        InProcessTeacher(teacher_model, temperature=0.0)


def test_synced_ranks_run_as_many_forwards_as_the_busiest_rank(teacher_model, ragged_rows, monkeypatch):
    """A ZeRO-3/FSDP teacher hangs unless every rank joins every forward (another rank here needs 2 more)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: tensor.add_(2))
    prompts, completions = ragged_rows
    forwards = []
    hook = teacher_model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        scores = InProcessTeacher(teacher_model, batch_size=2, synced_ranks=True).score(prompts, completions)
    finally:
        hook.remove()
    assert len(forwards) == 3 + 2  # 5 non-empty rows in pairs, then 2 one-token forwards
    assert_rows_close(scores, full_vocab_reference(teacher_model, prompts, completions), atol=1e-5)


def test_only_completion_positions_reach_the_lm_head(teacher_model, ragged_rows):
    prompts, completions = ragged_rows
    projected = []
    hook = teacher_model.lm_head.register_forward_hook(lambda module, args, output: projected.append(output.shape[:-1].numel()))
    try:
        InProcessTeacher(teacher_model, batch_size=8, fused=False).score(prompts, completions)  # the logits path
    finally:
        hook.remove()
    assert sum(projected) == sum(COMPLETION_LENGTHS)


def test_empty_completions_give_empty_tensors_without_a_forward(teacher_model):
    calls = []
    hook = teacher_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        scores = InProcessTeacher(teacher_model).score([[5, 6], [7]], [[], []])
    finally:
        hook.remove()
    assert calls == []
    assert [s.shape for s in scores] == [(0,), (0,)] and all(s.dtype == torch.float32 for s in scores)
    assert InProcessTeacher(teacher_model).score([], []) == []


def test_bf16_teacher_takes_logsumexp_in_float32(tiny_pair_dir, ragged_rows):
    """bf16 logits, float32 normalisation: equal to log_softmax of the upcast logits, not of bf16 ones."""
    model = load_teacher_model(tiny_pair_dir["teacher"], dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    prompts, completions = ragged_rows
    scores = InProcessTeacher(model, batch_size=1).score(prompts, completions)
    assert_rows_close(scores, full_vocab_reference(model, prompts, completions), atol=1e-5)


def test_non_finite_teacher_logprobs_are_passed_through_not_clamped(char_tokenizer):
    from conftest import build_tiny_qwen2

    model = build_tiny_qwen2(char_tokenizer, hidden_size=16, layers=1)
    with torch.no_grad():
        model.lm_head.weight[10] = float("nan")  # tied: token 10's logit is NaN everywhere
    scores = InProcessTeacher(model).score([[5, 6]], [[7, 8, 9]])
    assert scores[0].shape == (3,) and torch.isnan(scores[0]).all()


def test_bad_rows_are_refused_with_the_row_named(teacher_model):
    teacher = InProcessTeacher(teacher_model)
    with pytest.raises(ValueError, match=r"row 1 has token ids outside the teacher's vocabulary \[0, 99\)"):
        teacher.score([[5], [5]], [[6], [6, 99]])
    with pytest.raises(ValueError, match="row 0 has a completion but an empty prompt"):
        teacher.score([[]], [[6]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        teacher.score([[5], [5]], [[6]])


def test_load_teacher_model_is_frozen_eval_and_checks_dtype(teacher_model, tiny_pair_dir):
    assert not teacher_model.training
    assert not any(p.requires_grad for p in teacher_model.parameters())
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        load_teacher_model(tiny_pair_dir["teacher"], dtype="bf17", device="cpu")


def test_both_scorers_satisfy_the_protocol(teacher_model):
    assert isinstance(InProcessTeacher(teacher_model), TeacherScorer)
    assert isinstance(ServerTeacher("http://127.0.0.1:1"), TeacherScorer)


# -- tokenizer / model compatibility -------------------------------------------------------------


def test_same_tokenizer_passes_without_warnings(char_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizers_match(char_tokenizer, copy.deepcopy(char_tokenizer), "tiny-student", "tiny-teacher")


def test_vocabulary_mismatch_is_an_error_naming_both_models(char_tokenizer):
    from scope_opd.toy.tokenizer import CHARACTERS, build_char_tokenizer

    shifted = build_char_tokenizer(CHARACTERS[1:] + CHARACTERS[:1])  # same tokens, other ids
    with pytest.raises(
        ValueError, match=r"'tiny-student' and teacher 'other-teacher' have different vocabularies \(\d+ tokens differ"
    ) as info:
        check_tokenizers_match(char_tokenizer, shifted, "tiny-student", "other-teacher")
    assert "student id 3, teacher id" in str(info.value)  # an example, with both ids


def test_eos_mismatch_is_an_error_unless_explicitly_allowed(char_tokenizer):
    """Same vocabulary, other stop token: Qwen3-1.7B-Base (<|endoftext|>) vs Qwen3-8B (<|im_end|>)."""
    teacher_tokenizer = copy.deepcopy(char_tokenizer)
    teacher_tokenizer.eos_token = "<|unk|>"
    with pytest.raises(
        ValueError, match=r"'tiny-student' and teacher 'tiny-teacher' disagree on special tokens \(eos_token_id 1 vs 2\)"
    ):
        check_tokenizers_match(char_tokenizer, teacher_tokenizer, "tiny-student", "tiny-teacher")
    with pytest.warns(TokenizerMismatchWarning, match="eos_token_id 1 vs 2"):
        check_tokenizers_match(
            char_tokenizer, teacher_tokenizer, "tiny-student", "tiny-teacher", allow_special_token_mismatch=True
        )


def test_chat_template_on_one_side_only_is_a_warning(char_tokenizer):
    teacher_tokenizer = copy.deepcopy(char_tokenizer)
    teacher_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.warns(TokenizerMismatchWarning, match="only 'tiny-teacher' has a chat template, 'tiny-student' has none"):
        check_tokenizers_match(char_tokenizer, teacher_tokenizer, "tiny-student", "tiny-teacher")


def test_padded_teacher_embeddings_are_fine_but_a_larger_student_table_is_not():
    from transformers import Qwen2Config

    student, teacher = Qwen2Config(vocab_size=151936), Qwen2Config(vocab_size=152064)  # Qwen2.5-1.5B vs -7B
    check_models_compatible(student, teacher, "qwen-1.5b", "qwen-7b")
    with pytest.raises(
        ValueError, match=r"student 'qwen-7b' can emit token ids up to 152063 .* teacher 'qwen-1.5b' has only 151936"
    ):
        check_models_compatible(teacher, student, "qwen-7b", "qwen-1.5b")


# -- our server, and the client against it ---------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_server(tiny_pair_dir):
    from scope_opd.teachers.serve import start_server

    server, thread = start_server(tiny_pair_dir["teacher"], "127.0.0.1", 0, dtype="float32", device="cpu", batch_size=4)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("rows_per_request", [1, 3])
def test_server_returns_the_in_process_logprobs(teacher_server, teacher_model, ragged_rows, rows_per_request):
    prompts, completions = ragged_rows
    client = ServerTeacher(teacher_server.url + "/v1", rows_per_request=rows_per_request, max_concurrency=4)
    expected = InProcessTeacher(teacher_model).score(prompts, completions)
    assert_rows_close(client.score(prompts, completions), expected, atol=1e-4)
    n_scored = sum(1 for c in completions if c)  # the empty completion is never sent
    assert client.counters() == {"requests": math.ceil(n_scored / rows_per_request), "retries": 0, "failures": 0,
                                 "nan_rows": 0}


def test_server_speaks_vllm_prompt_logprobs_format(teacher_server):
    sequence = [5, 6, 7, 8]
    response = requests.post(
        teacher_server.url + "/v1/completions",
        json={"prompt": sequence, "prompt_logprobs": 2, "max_tokens": 1, "temperature": 0},
        timeout=10,
    )
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(sequence) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        actual = entry[str(sequence[position])]
        assert set(actual) == {"logprob", "rank", "decoded_token"} and actual["rank"] >= 1
        assert len(entry) in (2, 3)  # the actual token, then the top 2 (which may include it)
        assert {1, 2} <= {e["rank"] for e in entry.values()}
    assert response.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5, "prompt_tokens_details": None}
    models = requests.get(teacher_server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == 512


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"prompt": {"text": "the answer is"}}).encode(), "`prompt` must be token ids"),
        (json.dumps({"prompt": [5, 6.5]}).encode(), "position 1 holds 6.5"),
        (json.dumps({"prompt": [5, True]}).encode(), "position 1 holds True"),
        (json.dumps({"prompt": [[5, 6], [5, 99]]}).encode(), r"prompt 1 position 1 holds 99, not a token id in \[0, 99\)"),
        (json.dumps({"prompt": [[5, 6], []]}).encode(), "prompt 1 is empty"),
        (json.dumps({"prompt": [5] * 513}).encode(), "maximum context length is 512 tokens.* contains 513 input tokens"),
        (json.dumps({"prompt": [5, 6], "prompt_logprobs": -1}).encode(), "prompt_logprobs"),
        (json.dumps({"prompt": [5, 6], "max_tokens": "many"}).encode(), "max_tokens"),
        (json.dumps({"prompt": [5, 6], "stream": True, "prompt_logprobs": 1}).encode(), "not available when `stream=True`"),
        (json.dumps({"prompt": [5, 6], "max_tokens": 0}).encode(), "max_tokens must be at least 1, got 0"),
    ],
)
def test_malformed_requests_get_400_in_openai_error_shape(teacher_server, body, message):
    response = requests.post(
        teacher_server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert re.search(message, error["message"]), error["message"]
    assert requests.get(teacher_server.url + "/health", timeout=10).status_code == 200  # still serving


def test_unknown_model_name_is_404_like_vllm(teacher_server):
    response = requests.post(teacher_server.url + "/v1/completions", json={"prompt": [5, 6], "model": "gpt-5"}, timeout=10)
    assert response.status_code == 404 and "gpt-5" in response.json()["error"]["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_raises_a_clear_error_quickly():
    url = f"http://127.0.0.1:{_free_port()}"  # bound then released: nothing listens there
    client = ServerTeacher(url, timeout_s=1, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(
        TeacherServerError, match=rf"teacher server {url}/v1/completions failed for rows \[0\] after 3 attempts"
    ) as info:
        client.score([[5, 6]], [[7]])
    assert time.monotonic() - start < 5
    assert info.value.url == f"{url}/v1/completions" and info.value.rows == [0]
    assert client.counters() == {"requests": 3, "retries": 2, "failures": 1, "nan_rows": 0}


def test_serve_teacher_cli_with_api_key(tiny_pair_dir, teacher_model, ragged_rows, monkeypatch, tmp_path):
    """`scope serve-teacher` as a subprocess: wrong key refused, right key (from the env) scores."""
    server_env = dict(os.environ, SCOPE_TEST_SERVER_KEY="s3rver-key-123", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", tiny_pair_dir["teacher"]]
    command += [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--api-key-env",
        "SCOPE_TEST_SERVER_KEY",
    ]
    stderr_path = tmp_path / "server.stderr"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, env=server_env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()
        assert "serving" in line, stderr_path.read_text()
        url = line.rsplit(" on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(url + "/health", timeout=10).status_code == 200  # open, as in vLLM
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401

        monkeypatch.setenv("SCOPE_TEST_CLIENT_KEY", "wrong-key-456")
        wrong = ServerTeacher(url, api_key_env="SCOPE_TEST_CLIENT_KEY", max_retries=3, backoff_s=0.01)
        with pytest.raises(TeacherServerError, match="HTTP 401") as info:
            wrong.score([[5, 6]], [[7]])
        assert "wrong-key-456" not in str(info.value)
        # a refused key is not retried
        assert wrong.counters() == {"requests": 1, "retries": 0, "failures": 1, "nan_rows": 0}

        monkeypatch.setenv("SCOPE_TEST_CLIENT_KEY", "s3rver-key-123")
        prompts, completions = ragged_rows
        scores = ServerTeacher(url, api_key_env="SCOPE_TEST_CLIENT_KEY").score(prompts, completions)
        assert_rows_close(scores, InProcessTeacher(teacher_model).score(prompts, completions), atol=1e-4)
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0  # interpreter teardown takes ~10 s on a busy 2-core machine


def test_server_refuses_to_start_open_when_its_key_variable_is_unset(tiny_pair_dir, monkeypatch):
    from scope_opd.teachers.serve import start_server

    monkeypatch.delenv("SCOPE_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="SCOPE_TEST_UNSET_KEY was given but that environment variable is empty or unset"):
        start_server(tiny_pair_dir["teacher"], api_key_env="SCOPE_TEST_UNSET_KEY")


# -- the client against a scripted server: retries, strict validation, vLLM's non-finite values ----------


class ScriptedServer:
    """A loopback HTTP server answering POSTs with queued (status, body) pairs; records what it got."""

    def __init__(self, replies, models_reply=(404, {"detail": "Not Found"})):
        self.replies = list(replies)
        self.models_reply = models_reply  # the answer to GET /v1/models
        self.received = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                scripted.received.append((self.path, dict(self.headers), None))
                status, reply = scripted.models_reply
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                scripted.received.append((self.path, dict(self.headers), json.loads(body)))
                status, reply = scripted.replies.pop(0) if len(scripted.replies) > 1 else scripted.replies[0]
                payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(*replies, models_reply=(404, {"detail": "Not Found"})):
        servers.append(ScriptedServer(replies, models_reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def vllm_reply(sequences, logprobs_of=lambda position, token: -0.5):
    """A completions response shaped like vLLM's for token-id prompts with prompt_logprobs=0."""
    choices = []
    for index, sequence in enumerate(sequences):
        entries = [None] + [
            {str(token): {"logprob": logprobs_of(position, token), "rank": 1, "decoded_token": "x"}}
            for position, token in enumerate(sequence)
            if position
        ]
        choices.append({"index": index, "text": "!", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries})
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "teacher", "choices": choices}


def test_client_sends_the_vllm_scoring_request(scripted, monkeypatch):
    monkeypatch.setenv("SCOPE_TEST_KEY", "sk-secret-789")
    server = scripted((200, vllm_reply([[5, 6, 7, 8]])))
    scores = ServerTeacher(server.url, model="teacher", api_key_env="SCOPE_TEST_KEY").score([[5, 6]], [[7, 8]])
    assert scores[0].tolist() == [-0.5, -0.5]
    path, headers, body = server.received[0]
    assert path == "/v1/completions"
    assert body == {"prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0, "model": "teacher"}
    assert headers["Authorization"] == "Bearer sk-secret-789"


def test_vllm_non_finite_logprobs_pass_through(scripted):
    """vLLM sends -inf as -9999.0; Python servers may send -Infinity or NaN. None is an error here."""
    values = {2: -9999.0, 3: float("-inf"), 4: float("nan")}
    server = scripted((200, vllm_reply([[5, 6, 7, 8, 9]], lambda position, token: values.get(position, -1.0))))
    scores = ServerTeacher(server.url).score([[5]], [[6, 7, 8, 9]])[0]
    assert scores[0] == -1.0 and scores[1] == -math.inf and scores[2] == -math.inf and math.isnan(scores[3])


@pytest.mark.parametrize(
    "bad_reply, reason",
    [
        ({"choices": []}, "expected 1 choices"),
        (vllm_reply([[5, 6, 7]]), "prompt_logprobs has 3 entries for 4 tokens"),  # one position short
        (vllm_reply([[5, 6, 9, 8]]), "position 2 lacks the actual token 7"),  # scored another token
        (b"<html>bad gateway</html>", "malformed response"),
    ],
)
def test_malformed_responses_are_retried_then_raise(scripted, bad_reply, reason, caplog):
    server = scripted((200, bad_reply))
    client = ServerTeacher(server.url, max_retries=2, backoff_s=0.01)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(
            TeacherServerError, match=rf"{server.url}/v1/completions failed for rows \[0\] after 3 attempts: .*{reason}"
        ),
    ):
        client.score([[5, 6]], [[7, 8]])
    assert client.counters() == {"requests": 3, "retries": 2, "failures": 1, "nan_rows": 0}
    assert "retrying" in caplog.text


def test_server_errors_are_retried_and_the_key_never_leaks(scripted, monkeypatch, caplog):
    monkeypatch.setenv("SCOPE_TEST_KEY", "sk-never-print-me")
    server = scripted((503, {"error": "warming up"}), (200, vllm_reply([[5, 6, 7]])))
    client = ServerTeacher(server.url, api_key_env="SCOPE_TEST_KEY", backoff_s=0.01)
    with caplog.at_level(logging.DEBUG):
        assert client.score([[5, 6]], [[7]])[0].tolist() == [-0.5]
    assert client.counters() == {"requests": 2, "retries": 1, "failures": 0, "nan_rows": 0}
    assert client.stats_delta() == {"requests": 2, "retries": 1, "failures": 0, "nan_rows": 0}
    assert client.stats_delta() == {"requests": 0, "retries": 0, "failures": 0, "nan_rows": 0}  # per-step increments
    assert "HTTP 503" in caplog.text
    for text in (caplog.text, repr(client), str(client), str(vars(client))):
        assert "sk-never-print-me" not in text


# -- what real vLLM does differently (tests/test_vllm_real.py shows each against the real server) -------------


def vllm_error(message: str, status: int = 400) -> tuple[int, dict]:
    """vLLM's error answer (``ErrorResponse``)."""
    return status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}


VLLM_NAN_400 = vllm_error("Out of range float values are not JSON compliant: nan")


def test_vllm_nan_refusal_is_split_row_by_row_and_only_the_nan_row_comes_back_all_nan(scripted, caplog):
    """vLLM fails a whole request whose answer would hold a NaN; the client asks row by row to find it."""
    rows = [[5, 6, 7], [5, 8, 9], [5, 6, 9]]
    server = scripted(VLLM_NAN_400, (200, vllm_reply([rows[0]])), VLLM_NAN_400, (200, vllm_reply([rows[2]])))
    client = ServerTeacher(server.url, rows_per_request=3)
    with caplog.at_level(logging.WARNING):
        scores = client.score([r[:1] for r in rows], [r[1:] for r in rows])
    assert scores[0].tolist() == [-0.5, -0.5] and scores[2].tolist() == [-0.5, -0.5]
    assert scores[1].shape == (2,) and scores[1].isnan().all()
    assert [body["prompt"] for _, _, body in server.received] == [rows, rows[0], rows[1], rows[2]]
    assert client.counters() == {"requests": 4, "retries": 0, "failures": 0, "nan_rows": 1}
    assert "refused to send row 1's log-probs (they hold a NaN)" in caplog.text


def test_vllm_nan_refusal_of_a_single_row_request_is_not_resent(scripted):
    server = scripted(VLLM_NAN_400)
    client = ServerTeacher(server.url)
    assert client.score([[5]], [[6, 7, 8]])[0].isnan().all()
    assert client.counters() == {"requests": 1, "retries": 0, "failures": 0, "nan_rows": 1}


def test_other_http_400s_are_not_retried_or_split(scripted):
    server = scripted(vllm_error("prompt_logprobs must be between 0 and 20"))
    client = ServerTeacher(server.url, rows_per_request=2)
    with pytest.raises(TeacherServerError, match=r"rejected the request for rows \[0, 1\]: HTTP 400: .*prompt_logprobs"):
        client.score([[5], [5]], [[6], [7]])
    assert client.counters() == {"requests": 1, "retries": 0, "failures": 1, "nan_rows": 0}


def test_vllm_full_context_400_becomes_an_error_naming_the_row_and_its_length(scripted):
    """vLLM's message for a sequence of exactly max_model_len tokens speaks of max_tokens, not of length."""
    server = scripted(vllm_error("max_tokens must be at least 1, got 0."))
    client = ServerTeacher(server.url, rows_per_request=2)
    with pytest.raises(
        TeacherServerError,
        match=r"row 1 has 6 tokens \(prompt 2 \+ completion 4\), too long for the server's max_model_len: "
        r"vLLM needs tokens \+ 1 <= max_model_len.*HTTP 400: .*max_tokens must be at least 1",
    ):
        client.score([[5], [5, 6]], [[7], [7, 8, 9, 10]])
    assert client.counters()["requests"] == 1


@pytest.mark.parametrize("mode_value", [2.25, 0.01])
def test_logprobs_above_zero_are_refused_naming_the_logprobs_mode_flag(scripted, mode_value):
    """--logprobs-mode raw_logits puts logits where log-probs belong; they must not be trained on."""
    server = scripted((200, vllm_reply([[5, 6, 7, 8]], lambda position, token: mode_value if position == 3 else -8.0)))
    client = ServerTeacher(server.url, max_retries=3)
    with pytest.raises(TeacherServerError, match=rf"row 0 position 3: log-prob {mode_value} is above 0.*--logprobs-mode raw_logits"):
        client.score([[5, 6]], [[7, 8]])
    assert client.counters() == {"requests": 1, "retries": 0, "failures": 1, "nan_rows": 0}  # retrying cannot fix it


def test_float_rounding_just_above_zero_is_still_a_logprob(scripted):
    server = scripted((200, vllm_reply([[5, 6, 7]], lambda position, token: 2e-7)))
    assert ServerTeacher(server.url).score([[5]], [[6, 7]])[0].tolist() == pytest.approx([2e-7, 2e-7])


def test_rows_per_request_is_capped_at_vllms_1024_prompts():
    assert ServerTeacher("http://127.0.0.1:1", rows_per_request=1024).rows_per_request == 1024
    with pytest.raises(ValueError, match=r"rows_per_request=1025 is more than vLLM accepts in one request \(1024 prompts\)"):
        ServerTeacher("http://127.0.0.1:1", rows_per_request=1025)


def vllm_models(max_model_len, model_id="teacher"):
    """vLLM's /v1/models answer (``ModelCard`` has max_model_len)."""
    card = {"id": model_id, "object": "model", "owned_by": "vllm", "root": "/models/t", "max_model_len": max_model_len}
    return 200, {"object": "list", "data": [card]}


def test_context_length_check_passes_at_the_limit_and_then_refuses_longer_rows_before_sending(scripted, monkeypatch):
    monkeypatch.setenv("SCOPE_TEST_KEY", "sk-models-key")
    server = scripted((200, vllm_reply([[5, 6, 7]])), models_reply=vllm_models(8))
    client = ServerTeacher(server.url, api_key_env="SCOPE_TEST_KEY")
    assert client.check_context_length(5, max_prompt_length=2) == 8 and client.max_model_len == 8  # 2 + 5 + 1 = 8
    path, headers, _ = server.received[0]
    assert path == "/v1/models" and headers["Authorization"] == "Bearer sk-models-key"
    assert client.score([[5]], [[6, 7]])[0].tolist() == [-0.5, -0.5]
    with pytest.raises(TeacherServerError, match=r"row 1 has 8 tokens \(prompt 3 \+ completion 5\), too long for the "
                       r"server's max_model_len 8"):
        client.score([[5], [5, 6, 7]], [[6], [8, 9, 10, 11, 12]])
    assert len(server.received) == 2  # the too-long batch was never sent


def test_context_length_check_names_both_numbers(scripted):
    server = scripted((200, {}), models_reply=vllm_models(8, "qwen-teacher"))
    client = ServerTeacher(server.url, model="qwen-teacher")
    with pytest.raises(ValueError, match=r"'qwen-teacher' with max_model_len 8, but scoring needs 10 tokens: "
                       r"max_prompt_length 4 \+ max_completion_length 5 \+ 1 .*--max-model-len 10 or more"):
        client.check_context_length(5, max_prompt_length=4)
    assert client.max_model_len is None


def test_context_length_check_without_a_prompt_limit_counts_a_one_token_prompt(scripted):
    """TRL 1.16 does not truncate prompts: only the completion budget can be checked up front."""
    server = scripted((200, {}), models_reply=vllm_models(8))
    client = ServerTeacher(server.url)
    assert client.check_context_length(6) == 8  # 1 + 6 + 1
    with pytest.raises(ValueError, match=r"max_model_len 8, but scoring needs 9 tokens: a 1-token prompt \(prompts are "
                       r"not truncated\) \+ max_completion_length 7 \+ 1"):
        client.check_context_length(7)


@pytest.mark.parametrize("models_reply", [(404, {"detail": "Not Found"}), (501, {}), (200, {"data": []}),
                                          (200, {"object": "list", "data": [{"id": "t", "object": "model"}]})])
def test_context_length_check_on_a_server_without_a_model_card_warns_and_skips(scripted, caplog, models_reply):
    server = scripted((200, {}), models_reply=models_reply)
    client = ServerTeacher(server.url, backoff_s=0.01)
    with caplog.at_level(logging.WARNING):
        assert client.check_context_length(10**6) is None
    assert "the context-length check is skipped" in caplog.text and client.max_model_len is None
    assert client.counters() == {"requests": 1, "retries": 0, "failures": 0, "nan_rows": 0}  # not retried


def test_context_length_check_for_a_model_the_server_does_not_serve(scripted):
    server = scripted((200, {}), models_reply=vllm_models(8, "qwen-teacher"))
    with pytest.raises(ValueError, match=r"does not serve model 'other'; it serves \['qwen-teacher'\]"):
        ServerTeacher(server.url, model="other").check_context_length(4)
