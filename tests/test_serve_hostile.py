"""`scope serve-teacher` under hostile load: each attack from the issue, reproduced and contained.

The server runs in process with small limits (a connection cap of 16, 1 s timeouts) so every
attack is cheap to mount on loopback; one test runs the real CLI under a low descriptor limit.
"Within a bound" below is a client timeout that fails the test, not a timing assertion.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scope_opd.teachers.serve import ServerLimits, start_server

ROW = [5, 6, 7, 8, 9, 10]
GOOD_BODY = {"prompt": ROW, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
# A well-behaved client's answer must come within this many seconds, attack or not.
ANSWER_BOUND_S = 10


def _limits(**overrides) -> ServerLimits:
    values = dict(
        max_connections=16, keep_alive_timeout_s=2.0, request_read_timeout_s=1.0, write_timeout_s=2.0,
        max_body_bytes=2**20, max_request_tokens=4096, max_response_bytes=200_000,
    )
    values.update(overrides)
    return ServerLimits(**values)


@pytest.fixture(scope="module")
def server(tiny_pair_dir):
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=4, limits=_limits())
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def keyed_server(tiny_pair_dir, monkeypatch_module):
    monkeypatch_module.setenv("SCOPE_TEST_HOSTILE_KEY", "k3y")
    server, thread = start_server(
        tiny_pair_dir["teacher"], dtype="float32", device="cpu", api_key_env="SCOPE_TEST_HOSTILE_KEY", limits=_limits()
    )
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def well_behaved_answer(url: str) -> dict:
    """One request on a fresh connection, as a new client makes it; fails the test past the bound."""
    with requests.Session() as session:
        response = session.post(url + "/v1/completions", json=GOOD_BODY, timeout=ANSWER_BOUND_S)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"][0]["prompt_logprobs"]) == len(ROW)
    return response.json()


def address(server) -> tuple[str, int]:
    return server.server_address[:2]


def raw_exchange(server, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (the test fails on a hang via the timeout)."""
    with socket.create_connection(address(server), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def error_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


# -- connections ----------------------------------------------------------------------------------


def test_idle_connections_beyond_the_cap_do_not_starve_a_well_behaved_client(server):
    evicted_before = server.counters["evicted"]
    idle = [socket.create_connection(address(server), timeout=5) for _ in range(3 * server.max_connections)]
    time.sleep(0.3)  # the attacker's connections now count as idle (a fresh client's never do)
    try:
        for _ in range(5):
            well_behaved_answer(server.url)
    finally:
        for s in idle:
            s.close()
    # The server was full of the attacker's connections: the first answer needed one of them closed.
    assert server.counters["evicted"] - evicted_before >= 1


def test_idle_connection_is_closed_after_the_keep_alive_timeout(server):
    with socket.create_connection(address(server), timeout=5) as s:
        start = time.monotonic()
        assert s.recv(1) == b""  # closed by the server, silently (an idle close is normal)
        assert time.monotonic() - start < 4.5  # the 2 s keep-alive timeout, inside the 5 s socket timeout


def test_slowloris_connections_are_cut_at_the_request_deadline_and_others_are_served(server):
    slow = [socket.create_connection(address(server), timeout=5) for _ in range(server.max_connections - 2)]
    stop = threading.Event()

    def trickle():
        header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
        for i in range(len(header)):
            if stop.wait(0.2):
                return
            for s in slow:
                try:
                    s.send(header[i : i + 1])
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            well_behaved_answer(server.url)
        # Each slow request got 1 s for its headers: a 408 and the close, or (evicted to make room
        # for a newcomer once it had been sending for over 1 s) an abortive close.
        for s in slow:
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                continue
            assert answer == b"" or status_of(answer) == 408
    finally:
        stop.set()
        thread.join()
        for s in slow:
            s.close()


def test_descriptor_exhaustion_by_idle_connections_leaves_the_cli_server_answering(tiny_pair_dir, tmp_path):
    """The issue's attack: idle connections up to the fd limit made the old server spin and time out."""
    nofile = 160

    def low_descriptor_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    command = [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", tiny_pair_dir["teacher"], "--host",
               "127.0.0.1", "--port", "0", "--dtype", "float32", "--device", "cpu"]
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   preexec_fn=low_descriptor_limit)
    idle = []
    try:
        line = process.stdout.readline()
        assert "serving" in line, log.read_text()[-2000:]
        url = line.rsplit(" on ", 1)[1].strip()
        host, port = url.removeprefix("http://").split(":")
        for _ in range(2 * nofile):
            try:
                idle.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        assert len(idle) == 2 * nofile  # the backlog took them all; none was refused
        time.sleep(0.3)  # held, not just opened: now they count as idle
        for _ in range(3):
            well_behaved_answer(url)
        assert "lowered to" in log.read_text()  # the cap was set below the descriptor limit, and said so
    finally:
        for s in idle:
            s.close()
        process.terminate()
        process.wait(timeout=60)


def test_a_burst_of_200_concurrent_requests_is_answered_in_full(tiny_pair_dir):
    """The old backlog of 5 reset 80 of 200; now the 1024-deep backlog holds them until accepted."""
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=8)
    barrier = threading.Barrier(200)

    def one(_):
        with requests.Session() as session:
            barrier.wait(timeout=30)
            return session.post(server.url + "/v1/completions", json=GOOD_BODY, timeout=120).status_code

    try:
        with ThreadPoolExecutor(200) as pool:
            statuses = list(pool.map(one, range(200)))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert statuses == [200] * 200


def test_connections_over_the_cap_with_none_idle_get_a_503_not_a_reset(server):
    busy = [socket.create_connection(address(server), timeout=5) for _ in range(server.max_connections)]
    try:
        for s in busy:  # every slot holds a request being sent: none may be closed for a newcomer yet
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        raw = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) in (200, 503)
        if status_of(raw) == 503:
            assert "too many connections" in error_body(raw)["error"]["message"]
    finally:
        for s in busy:
            s.close()


# -- sizes ------------------------------------------------------------------------------------------


def test_a_request_whose_answer_exceeds_the_response_cap_is_refused_before_scoring(server):
    # 8 rows of 500 tokens with the top 20: at least 8 * 499 * 21 * 50 bytes, far over 200 kB.
    body = {"prompt": [[5] * 500] * 8, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 20}
    response = requests.post(server.url + "/v1/completions", json=body, timeout=ANSWER_BOUND_S)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "--max-response-bytes 200000" in error["message"] and error["code"] == 413


def test_an_answer_that_grows_past_the_cap_while_serialised_is_a_413_not_a_truncated_answer(server):
    row = [5 + i % 40 for i in range(400)]
    body = {"prompt": [row] * 3, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    lower_bound = 3 * 399 * 3 * 50  # what the pre-check can know: under the 200 kB cap, so scoring runs
    assert lower_bound < server.limits.max_response_bytes
    one_row = requests.post(server.url + "/v1/completions", json={**body, "prompt": [row]}, timeout=60)
    assert one_row.status_code == 200 and 3 * len(one_row.content) > server.limits.max_response_bytes
    response = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 413 and "--max-response-bytes" in response.json()["error"]["message"]


def test_too_many_tokens_in_one_request_is_a_400_naming_the_cap(server):
    body = {"prompt": [[5] * 400] * 11, "max_tokens": 0, "echo": True}
    response = requests.post(server.url + "/v1/completions", json=body, timeout=ANSWER_BOUND_S)
    assert response.status_code == 400
    assert "4400 prompt tokens, more than this server's --max-request-tokens 4096" in response.json()["error"]["message"]


def test_a_body_over_the_cap_is_refused_from_its_headers_alone(server):
    raw = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
    assert status_of(raw) == 413 and "--max-request-bytes" in error_body(raw)["error"]["message"]


# -- authentication and routes before the body -------------------------------------------------------


def test_a_wrong_key_is_refused_before_the_body_is_read(keyed_server):
    # Only the headers are sent; a server that read the body first would wait for 256 MB and time out.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 268435455\r\n\r\n"
    raw = raw_exchange(keyed_server, head)
    assert status_of(raw) == 401 and error_body(raw) == {"error": "Unauthorized"}  # vLLM's body
    assert b"connection: close" in raw.lower()
    missing = raw_exchange(keyed_server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(missing) == 401
    headers = {"Authorization": "Bearer k3y"}
    assert requests.post(keyed_server.url + "/v1/completions", json=GOOD_BODY, headers=headers, timeout=30).status_code == 200
    assert requests.get(keyed_server.url + "/health", timeout=5).status_code == 200  # open, as in vLLM


def test_an_unknown_route_is_refused_before_the_body_is_read(server):
    raw = raw_exchange(server, b"POST /v1/chat/whatever HTTP/1.1\r\nHost: x\r\nContent-Length: 268435455\r\n\r\n")
    assert status_of(raw) == 404
    assert error_body(raw) == {"detail": "Not Found"}  # starlette's body, as vLLM sends it
    wrong_method = raw_exchange(server, b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(wrong_method) == 405


# -- malformed requests: each a 400 (or 411/431), never a 500 or a hang --------------------------------


def _post(body: bytes, *extra_headers: bytes) -> bytes:
    headers = b"".join(h + b"\r\n" for h in extra_headers)
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


@pytest.mark.parametrize(
    "raw_request, status, message",
    [
        (_post(b"[" * 5_000 + b"]" * 5_000, b"Content-Length: 10000"), 400, "nested too deeply"),
        (_post(b"[" * 100_000 + b"]" * 100_000, b"Content-Length: 200000"), 400, "JSON values, more than this server parses"),
        (_post(b"{}", "Content-Length: ²".encode()), 400, "malformed Content-Length"),
        (_post(b"{}", b"Content-Length: 2", b"Content-Length: 2"), 400, "duplicate content-length"),
        (_post(b"{}", b"Content-Length: 2", b"Content-Length: 3"), 400, "duplicate content-length"),
        (_post(b"{}", b"Content-Length: -2"), 400, "malformed Content-Length"),
        (_post(b"{}", b"Content-Length: 0x2"), 400, "malformed Content-Length"),
        (_post(b"2\r\n{}\r\n0\r\n\r\n", b"Transfer-Encoding: chunked"), 411, "Transfer-Encoding"),
        (_post(b"{}"), 411, "Content-Length header is required"),
        (_post(b"\xff\xfe", b"Content-Length: 2"), 400, "not valid JSON"),
        (_post(b"{}", b"Content-Length : 2"), 400, "malformed header line"),
        (_post(b"{}", b"Content-Length: 2", b" folded"), 400, "malformed header line"),
        (_post(b"{}", b"X-Pad: " + b"a" * 70_000, b"Content-Length: 2"), 431, "over 65536 bytes"),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "missing Host"),
        (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
        (b"GET /health HTTP/1.1\nHost: x\n\n", 400, "bare LF"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\nContent-Length: 2\r\n\r\n{}", 400, "bare LF"),
    ],
    ids=["json-5k-deep", "json-100k-deep", "content-length-superscript-2", "two-equal-content-lengths", "two-content-lengths",
         "negative-content-length", "hex-content-length", "chunked", "no-content-length", "not-utf8", "space-before-colon",
         "folded-header", "70kB-header", "no-host", "garbage-request-line", "bare-lf", "bare-lf-in-a-header"],
)
def test_malformed_http_gets_a_clean_error_and_the_connection_closes(server, raw_request, status, message):
    raw = raw_exchange(server, raw_request)  # the read ends: the server closed the connection
    assert status_of(raw) == status
    error = error_body(raw)["error"]
    assert message.lower() in error["message"].lower() and error["code"] == status
    well_behaved_answer(server.url)


def test_dropped_clients_are_logged_at_most_once_a_minute(server, caplog):
    body = json.dumps({"prompt": [[5] * 300] * 4, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}).encode()
    caplog.set_level(logging.DEBUG, logger="scope_opd.teachers.serve")
    # On a loaded machine the 20 connections can all be open at once, past this server's
    # max_connections=16: the ones over the cap are refused (or evict a stale one) instead of being
    # read, which is the cap doing its job. Every dropped client must be accounted for, one way or the other.
    outcomes = ("disconnects", "refused_at_cap", "evicted")
    before = {name: server.counters[name] for name in outcomes}

    def accounted() -> int:
        return sum(server.counters[name] - before[name] for name in outcomes)

    for _ in range(20):
        with socket.create_connection(address(server), timeout=5) as s:
            s.sendall(_post(body, f"Content-Length: {len(body) + 10}".encode()))  # 10 bytes short, then gone
    deadline = time.monotonic() + 60  # generous: the loop ends as soon as all 20 are seen (a loaded CI machine)
    while accounted() < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accounted() == 20, {name: server.counters[name] - before[name] for name in outcomes}
    assert server.counters["disconnects"] - before["disconnects"] >= 16  # at least the cap's worth were read and dropped
    records = [r for r in caplog.records if r.name == "scope_opd.teachers.serve"]
    assert len(records) <= 1 and not any(r.exc_info for r in records)  # no traceback flood
    well_behaved_answer(server.url)


def test_accepted_connections_send_without_nagle_delay(server):
    # A response goes out as two writes (head, body); with Nagle on, the body waits for the client's
    # delayed ACK of the head (up to 40 ms a request: measured 45 ms per keep-alive GET before).
    with socket.create_connection(address(server), timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\n")  # a request in progress keeps the connection registered
        deadline = time.monotonic() + 10
        while not server._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        sockets = [c.writer.get_extra_info("socket") for c in list(server._connections)]
        assert sockets, "the server never registered the connection"
        assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in sockets)



# -- round 3: keyed routes, caps on every route, fair shares, stuck writers, body budget -------------------


@pytest.mark.parametrize("method, path", [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"),
                                          ("GET", "/v1/models"), ("POST", "/v1/completions")])
def test_with_a_key_set_every_route_but_health_needs_it_before_the_body_is_read(keyed_server, method, path):
    # The headers promise 256 MB: a route that read the body before the key would wait, then time out.
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 268435455\r\n\r\n".encode()
    raw = raw_exchange(keyed_server, head)
    assert status_of(raw) == 401 and error_body(raw) == {"error": "Unauthorized"}
    headers = {"Authorization": "Bearer k3y"}
    if path == "/tokenize":
        answer = requests.post(keyed_server.url + path, json={"prompt": "ab"}, headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.json()["count"] >= 2


def test_text_over_the_token_cap_is_refused_before_tokenizing_on_every_text_route(server):
    text = "ab " * 2000  # 6000 characters > --max-request-tokens 4096 of this server
    for path, body in [("/tokenize", {"prompt": text}),
                       ("/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True}),
                       ("/v1/completions", {"prompt": ["ab", text], "max_tokens": 0, "echo": True})]:
        response = requests.post(server.url + path, json=body, timeout=ANSWER_BOUND_S)
        assert response.status_code == 400, (path, response.text[:300])
        assert "characters of text, more than this server's --max-request-tokens 4096" in response.json()["error"]["message"]
    response = requests.post(server.url + "/detokenize", json={"tokens": [5] * 5000}, timeout=ANSWER_BOUND_S)
    assert response.status_code == 400 and "--max-request-tokens 4096" in response.json()["error"]["message"]


def test_a_huge_n_is_refused_before_the_answer_is_built_streamed_or_not(server):
    for stream in (True, False):
        body = {"prompt": ROW, "max_tokens": 0, "echo": True, "n": 10**6, "stream": stream}
        response = requests.post(server.url + "/v1/completions", json=body, timeout=ANSWER_BOUND_S)
        assert response.status_code == 413, response.text[:300]
        assert "1000000 choices" in response.json()["error"]["message"]
    well_behaved_answer(server.url)


def test_json_values_are_counted_before_they_are_parsed(server):
    # 3 bytes of '{},' become a ~70-byte dict: about 350k of them fit the 1 MiB body cap of this server.
    body = b"[" + b"{}," * 340_000 + b"{}]"
    raw = raw_exchange(server, _post(body, f"Content-Length: {len(body)}".encode()))
    assert status_of(raw) == 400 and "JSON values, more than this server parses" in error_body(raw)["error"]["message"]
    # Brackets and commas inside strings are text, not values: a long text prompt is not refused for them.
    text = "[{,}]" * 80
    response = requests.post(server.url + "/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True},
                             timeout=ANSWER_BOUND_S)
    assert response.status_code == 200, response.text[:300]


ROOMY = dict(max_connections=8, worker_threads=2, request_read_timeout_s=20.0, write_timeout_s=60.0,
             max_request_tokens=2**20, max_body_bytes=4 * 2**20, max_buffered_body_bytes=6 * 2**20,
             max_response_bytes=3 * 2**20)


@pytest.fixture(scope="module")
def roomy_server(tiny_pair_dir):
    """Defaults where the attack needs them (large texts, bodies, answers), a small pool and cap."""
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=8,
                                  limits=_limits(**ROOMY))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_tokenize_obeys_the_response_cap(roomy_server):
    # 400k characters: under the 1 Mi token cap, but tokens plus token strings are ~4 MB > the 3 MiB cap.
    response = requests.post(roomy_server.url + "/tokenize", json={"prompt": "a" * 400_000, "return_token_strs": True},
                             timeout=60)
    assert response.status_code == 413 and "--max-response-bytes" in response.json()["error"]["message"]


def test_one_client_address_cannot_queue_its_work_ahead_of_another_clients(roomy_server):
    """Six slow /tokenize requests from 127.0.0.2 must not queue a scoring request from 127.0.0.1 behind them all."""
    host, port = address(roomy_server)
    body = json.dumps({"prompt": "ab c" * 100_000}).encode()  # 400k characters: a fraction of a second each
    finished: list[str] = []
    lock = threading.Lock()

    def attacker(i: int) -> None:
        with socket.create_connection((host, port), timeout=120, source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            while s.recv(1 << 16):
                pass
        with lock:
            finished.append(f"attacker {i}")

    attackers = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(6)]
    for thread in attackers:
        thread.start()
    time.sleep(0.5)  # the attacker's six are read: two hold the pool's two threads, four wait
    # The order of answers is the test, not their time: a generous bound for a starved CI machine.
    response = requests.post(roomy_server.url + "/v1/completions", json=GOOD_BODY, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"][0]["prompt_logprobs"]) == len(ROW)
    with lock:
        before_ours = list(finished)
    for thread in attackers:
        thread.join(timeout=120)
    # A FIFO pool runs ours after the attacker's queued four, i.e. after at least 5 of its requests have
    # finished; round robin gives ours the first thread that frees up (after 1, or 2 finishing together).
    assert len(before_ours) <= 3, before_ours
    assert len(finished) == 6


@pytest.fixture(scope="module")
def small_cap_server(tiny_pair_dir):
    """A cap of 4 connections and answers up to 16 MiB: room for answers larger than loopback buffers (~3 MB)."""
    server, thread = start_server(tiny_pair_dir["teacher"], dtype="float32", device="cpu", batch_size=8,
                                  limits=_limits(**{**ROOMY, "max_connections": 4, "max_response_bytes": 16 * 2**20}))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _stuck_reader(server) -> socket.socket:
    """A client that asks for a ~9 MB answer and never reads it (a 4 KiB receive window; loopback buffers ~3 MB)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(address(server))
    body = json.dumps({"prompt": [[5 + i % 40 for i in range(300)]] * 20, "max_tokens": 1, "temperature": 0,
                       "prompt_logprobs": 20}).encode()
    s.sendall(_post(body, f"Content-Length: {len(body)}".encode()))
    return s


def test_clients_that_never_read_their_answers_cannot_lock_out_a_server_teacher(small_cap_server):
    from scope_opd.teachers import ServerTeacher

    roomy_server = small_cap_server
    stuck = [_stuck_reader(roomy_server) for _ in range(roomy_server.max_connections)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until every answer is built and waiting on its reader
            states = [c.state for c in list(roomy_server._connections)]
            if len(states) == len(stuck) and all(state == "writing" for state in states):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the stuck readers' answers were never built: {states}")
        # ServerTeacher's default retries span ~7.5 s; it must be answered inside them.
        teacher = ServerTeacher(roomy_server.url, api_key_env=None, timeout_s=20)
        [logprobs] = teacher.score([ROW[:3]], [ROW[3:]])
        assert logprobs.shape == (3,)
        assert roomy_server.counters["evicted"] >= 1
    finally:
        for s in stuck:
            s.close()


def test_large_bodies_held_at_once_are_bounded_and_small_ones_still_pass(roomy_server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3500000\r\n\r\n"
    first = socket.create_connection(address(roomy_server), timeout=30)
    try:
        first.sendall(head + b"[" * 1000)  # 3.5 MB promised, never finished: held against the 6 MiB budget
        deadline = time.monotonic() + 30
        while roomy_server._body_budget.held == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        raw = raw_exchange(roomy_server, head + b"[" * 1000)  # would make 7 MB: refused before its body is read
        assert status_of(raw) == 503
        assert "--max-buffered-request-bytes 6291456" in error_body(raw)["error"]["message"]
        well_behaved_answer(roomy_server.url)  # a small body is never held back by the budget
    finally:
        first.close()
