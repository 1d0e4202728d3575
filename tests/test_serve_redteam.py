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


# -- ServerTeacher against a hostile endpoint -----------------------------------------------------------

import gzip  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from scope_opd.teachers.server_client import ServerTeacher, TeacherServerError  # noqa: E402


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _answer(self, status: int, payload: bytes, *headers: tuple[str, str]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # noqa: N802
        self._answer(404, b'{"detail": "Not Found"}')

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        mode = self.server.mode
        if mode == "redirect-bomb" and self.path == "/v1/completions":
            # A redirect whose own body is a gzip bomb: requests decodes a redirect's body whole to follow it.
            self._answer(307, self.server.bomb, ("Location", "/elsewhere/v1/completions"), ("Content-Encoding", "gzip"))
        elif mode == "deep":
            self._answer(200, b"[" * 200_000 + b"]" * 200_000, ("Content-Type", "application/json"))
        else:
            self._answer(200, b'{"choices": []}', ("Content-Type", "application/json"))


@pytest.fixture()
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    server.paths, server.mode = [], None
    server.bomb = gzip.compress(b" " * (16 * 2**20), compresslevel=9)  # 16 KiB on the wire, 16 MiB decoded
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _teacher(server, **overrides) -> ServerTeacher:
    options = dict(timeout_s=10, max_retries=1, backoff_s=0.0, max_concurrency=1, max_response_bytes=2**20)
    options.update(overrides)
    return ServerTeacher(f"http://127.0.0.1:{server.server_address[1]}", **options)


def test_server_teacher_does_not_follow_redirects_or_decode_their_bodies(hostile):
    """A 3xx is a refusal naming the server: requests followed it after decoding the redirect's body whole,
    past max_response_bytes (a gzip bomb there was decoded in full), and re-sent the rows to the Location."""
    hostile.mode = "redirect-bomb"
    with pytest.raises(TeacherServerError, match=r"127\.0\.0\.1.*(redirect|HTTP 307)"):
        _teacher(hostile).score([[5, 6]], [[7]])
    assert not any(path.startswith("/elsewhere") for path in hostile.paths), hostile.paths


def test_server_teacher_names_an_answer_nested_too_deeply(hostile):
    """400 KB of '[[[...]]]' raised a bare RecursionError out of score(); now a TeacherServerError naming the server."""
    hostile.mode = "deep"
    with pytest.raises(TeacherServerError, match=r"127\.0\.0\.1"):
        _teacher(hostile).score([[5, 6]], [[7]])
