"""`scope serve-teacher` attacked again after issue 18's hardening: each finding, reproduced on the real server.

"Within a bound" is a client timeout that fails the test, not a timing assertion.
"""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from scope_opd.teachers.serve import ServerLimits, start_server

ROW = [5, 6, 7, 8, 9, 10]
GOOD_BODY = {"prompt": ROW, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
# A well-behaved client's answer must come within this many seconds, attack or not (ServerTeacher retries ~7.5 s).
ANSWER_BOUND_S = 10


@pytest.fixture()
def server(tiny_pair_dir):
    limits = ServerLimits(max_connections=16, keep_alive_timeout_s=2.0, request_read_timeout_s=2.0, write_timeout_s=2.0,
                          max_body_bytes=2**20, max_request_tokens=4096, max_response_bytes=200_000)
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=4, limits=limits)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=120)


def _raw_post(server, body: bytes, answers: list) -> None:
    with socket.create_connection(server.server_address[:2], timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        answers.append(data)


def test_a_body_of_escaped_quotes_does_not_freeze_the_server(server):
    """An unterminated JSON string of escaped quotes made the value counter's regex quadratic, under the GIL.

    Before the fix, this 60 KB body held the GIL for ~30 s (2-core host; 4x the body: ~8 min): every route,
    /health included, stopped answering. Now it is a 400 in milliseconds and others are served meanwhile.
    """
    body = b'{"prompt": "' + b'\\"' * 30_000  # 60 KB, far under --max-request-bytes: invalid JSON, never terminated
    answers: list[bytes] = []
    attacker = threading.Thread(target=_raw_post, args=(server, body, answers), daemon=True)
    attacker.start()
    response = requests.post(server.url + "/v1/completions", json=GOOD_BODY, timeout=ANSWER_BOUND_S)
    assert response.status_code == 200, response.text
    assert requests.get(server.url + "/health", timeout=ANSWER_BOUND_S).status_code == 200
    attacker.join(timeout=ANSWER_BOUND_S)
    assert not attacker.is_alive(), "the escaped-quotes body was not answered within the bound"
    assert answers and answers[0].startswith(b"HTTP/1.1 400"), answers[:1]
    assert b"not valid JSON" in answers[0]
