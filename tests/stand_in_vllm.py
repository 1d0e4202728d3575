"""A stand-in for a ``trl vllm-serve`` server, and TRL's server-mode client wired to it (no vLLM, no GPU).

The server answers ``/v1/models`` and ``/v1/completions`` the way TRL's ``VLLMClient`` reads them; every
completion is derived from its own prompt (its last ``max_tokens`` token ids), so a completion paired with
the wrong prompt is visible. The client and generation backend are TRL's own classes: only their
construction differs (vLLM's import check, the NCCL weight-sync channel and the weight push are skipped,
since the stand-in holds no weights). ``VLLMGeneration.generate`` - gather, ``all_prompts[::G]``,
``n = G``, broadcast, per-process slice - and ``VLLMClient.generate`` run unchanged.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration


def completion_of(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The stand-in's completion of a prompt: its last ``max_tokens`` token ids."""
    return list(prompt_ids[-max_tokens:])


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send({"data": [{"id": "stand-in"}]})

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        choices = []
        for prompt in request["prompt"]:
            ids = completion_of(prompt, request["max_tokens"])
            logprobs = {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-1.0] * len(ids),
                        "top_logprobs": [None] * len(ids)}
            choices += [{"prompt_token_ids": prompt, "token_ids": ids, "logprobs": logprobs}] * request["n"]
        self._send({"choices": choices})


def start_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class StandInClient(VLLMClient):
    """TRL's ``VLLMClient`` without vLLM's import check and weight-sync channel; ``generate`` is TRL's."""

    def __init__(self, base_url: str):  # noqa: D107 - VLLMClient.__init__ refuses to run without vLLM installed
        self.session = requests.Session()
        self.base_url = base_url
        self.communicator = None
        self._updating_weights = False
        self.model = self._get(f"{self.base_url}/v1/models")["data"][0]["id"]


class StandInServerGeneration(VLLMGeneration):
    """TRL's ``VLLMGeneration`` in server mode, talking to the stand-in; ``generate`` is TRL's."""

    def _init_vllm(self):
        if self.mode != "server":
            raise ValueError("the stand-in only replaces server mode")
        if self.accelerator.is_main_process:
            self.vllm_client = StandInClient(self.server_base_url)

    def sync_weights(self):
        pass  # the stand-in holds no weights
