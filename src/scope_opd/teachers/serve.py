"""``scope serve-teacher``: the prompt-scoring subset of vLLM's OpenAI-compatible server.

Serves a `transformers` teacher through :class:`InProcessTeacher` with the
standard library's ``ThreadingHTTPServer`` (no web framework needed for three
endpoints), so :class:`~scope_opd.teachers.ServerTeacher` can be tested on a
CPU and used without vLLM. For large teachers vLLM itself is the faster
server; both speak the same format.

Endpoints:

* ``POST /v1/completions`` with ``"prompt"`` a list of token ids or a list of
  such lists, ``"prompt_logprobs": k >= 0`` (or absent), ``"max_tokens"``,
  ``"model"``. Each choice carries vLLM's ``prompt_logprobs``: ``null`` for the
  first position, then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` with
  the actual token first and the top-``k`` after it; ``-inf`` is sent as
  ``-9999.0`` as vLLM does, NaN as JSON ``NaN``. **Nothing is generated**: the
  teacher only scores in SCOPE, so ``max_tokens`` is validated and then
  ignored, ``"text"`` is ``""`` and ``usage.completion_tokens`` is 0. Text
  prompts, ``stream``, ``echo``, ``n > 1`` and ``prompt_logprobs`` of -1 (full
  vocabulary) or above 20 (vLLM's default ``--max-logprobs``) get a 400; other
  sampling fields are accepted and have no effect.
* ``GET /v1/models``: the one served model.
* ``GET /health``: 200 once the model is loaded (no key needed, as in vLLM).

Bad input (non-integer or out-of-vocabulary ids, too-long prompts, bad JSON)
is answered with 400 in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; an unexpected failure is
a 500 with the same shape. The server never exits on a request.

Concurrent requests are scored together: one worker thread owns the model and
takes every row that arrived while the previous forward ran (up to
``--batch-size``) into the next one.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .in_process import InProcessTeacher, TokenScores, load_teacher_model
from .server_client import VLLM_NEG_INF_LOGPROB

__all__ = ["TeacherHTTPServer", "TeacherService", "configure_parser", "main", "start_server"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 2**20
# vLLM's default --max-logprobs.
MAX_PROMPT_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.status}}


class _ScoringWorker:
    """The one thread that runs the model; rows queued while it works form its next batch."""

    def __init__(self, teacher: InProcessTeacher) -> None:
        self.teacher = teacher
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="teacher-scoring", daemon=True)
        self._thread.start()

    def submit(self, sequence: list[int], top_k: int) -> Future:
        future: Future = Future()
        self._queue.put((sequence, top_k, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        # Rows still queued would leave their handler threads waiting forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2].set_exception(RuntimeError("teacher server is shutting down"))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.teacher.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._score(batch)

    def _score(self, batch) -> None:
        # Position 0 has no context: the "prompt" is the first token, the rest is scored.
        top_k = max(k for _, k, _ in batch)
        try:
            scores = self.teacher.score_tokens(
                [s[:1] for s, _, _ in batch], [s[1:] for s, _, _ in batch], top_k=top_k, with_ranks=True
            )
        except Exception as exc:  # the worker must outlive any batch
            logger.exception("teacher scoring failed for a batch of %d rows", len(batch))
            for _, _, future in batch:
                future.set_exception(exc)
            return
        for (_, _, future), row_scores in zip(batch, scores):
            future.set_result(row_scores)


class TeacherService:
    """Request validation and response building for the served teacher (no HTTP here).

    Args:
        teacher: the scorer that owns the model.
        model_name: the name ``/v1/models`` reports and ``"model"`` must match.
        tokenizer: optional, only used for ``decoded_token``; ``None`` sends ``null``.
        max_model_len: longest accepted prompt in tokens; ``None`` for no limit.
    """

    def __init__(self, teacher: InProcessTeacher, *, model_name: str, tokenizer=None, max_model_len: int | None = None) -> None:
        self.teacher = teacher
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._decoded: dict[int, str | None] = {}
        self._worker = _ScoringWorker(teacher)

    def close(self) -> None:
        self._worker.stop()

    def models(self) -> dict:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "scope-opd",
            "root": self.model_name,
        }
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [card]}

    def completions(self, request) -> dict:
        """Answer one ``/v1/completions`` body; raises :class:`RequestError` for a request we refuse."""
        sequences, top_k = self._validate(request)
        futures = [self._worker.submit(s, top_k) if top_k is not None else None for s in sequences]
        choices = []
        for index, (sequence, future) in enumerate(zip(sequences, futures)):
            prompt_logprobs = None if future is None else self._prompt_logprobs(sequence, future.result(), top_k)
            choices.append(
                {
                    "index": index,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": prompt_logprobs,
                }
            )
        prompt_tokens = sum(len(s) for s in sequences)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens},
        }

    def _validate(self, request) -> tuple[list[list[int]], int | None]:
        if not isinstance(request, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = request.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"The model `{model}` does not exist.", error_type="NotFoundError", param="model")
        for field in ("stream", "echo"):
            if request.get(field):
                raise RequestError(400, f"`{field}` is not supported by this scoring server", param=field)
        if request.get("n") not in (None, 1):
            raise RequestError(400, "only n = 1 is supported", param="n")
        max_tokens = request.get("max_tokens")
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 0):
            raise RequestError(400, f"`max_tokens` must be a non-negative integer, got {max_tokens!r}", param="max_tokens")
        top_k = request.get("prompt_logprobs")
        if top_k is not None:
            if not _is_int(top_k) or top_k < 0:
                raise RequestError(
                    400,
                    f"`prompt_logprobs` must be an integer >= 0 (full-vocabulary -1 is not supported), got {top_k!r}",
                    param="prompt_logprobs",
                )
            if top_k > MAX_PROMPT_LOGPROBS:
                raise RequestError(
                    400, f"`prompt_logprobs` must be at most {MAX_PROMPT_LOGPROBS}, got {top_k}", param="prompt_logprobs"
                )

        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            sequences = prompt
        elif isinstance(prompt, list) and prompt and not any(isinstance(t, (list, str)) for t in prompt):
            sequences = [prompt]
        else:
            raise RequestError(
                400,
                "`prompt` must be a non-empty list of token ids or a list of such lists (text prompts are not supported)",
                param="prompt",
            )
        vocab_size = self.teacher.vocab_size
        for i, sequence in enumerate(sequences):
            if not sequence:
                raise RequestError(400, f"prompt {i} is empty", param="prompt")
            bad = next((j for j, t in enumerate(sequence) if not _is_int(t) or not 0 <= t < vocab_size), None)
            if bad is not None:
                raise RequestError(
                    400, f"prompt {i} position {bad} holds {sequence[bad]!r}, not a token id in [0, {vocab_size})", param="prompt"
                )
            if self.max_model_len is not None and len(sequence) > self.max_model_len:
                raise RequestError(
                    400, f"prompt {i} has {len(sequence)} tokens, more than max_model_len {self.max_model_len}", param="prompt"
                )
        return sequences, top_k

    def _prompt_logprobs(self, sequence: list[int], scores: TokenScores, top_k: int) -> list:
        # Plain lists first: indexing tensors element by element is slow for 10k-token rows.
        logprobs, ranks = scores.logprobs.tolist(), scores.ranks.tolist()
        top_ids = scores.top_ids[:, :top_k].tolist() if top_k else None
        top_logprobs = scores.top_logprobs[:, :top_k].tolist() if top_k else None
        entries: list = [None]
        for position, token in enumerate(sequence[1:]):
            # The actual token first, then the top-k (once each: a dict), as vLLM orders them.
            entry = {str(token): self._logprob_entry(token, logprobs[position], ranks[position])}
            if top_k:
                for rank, (top_id, value) in enumerate(zip(top_ids[position], top_logprobs[position]), start=1):
                    entry.setdefault(str(top_id), self._logprob_entry(top_id, value, rank))
            entries.append(entry)
        return entries

    def _logprob_entry(self, token: int, logprob: float, rank: int) -> dict:
        # vLLM's clamp_prompt_logprobs: -inf is not JSON, -9999.0 stands in for it.
        logprob = VLLM_NEG_INF_LOGPROB if logprob == float("-inf") else logprob
        return {"logprob": logprob, "rank": rank, "decoded_token": self._decode(token)}

    def _decode(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Handler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    # Keep-alive, so ServerTeacher's sessions reuse their connections.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self._respond(lambda: self._route_get(path))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self._respond(lambda: self._route_post(path))

    def _route_get(self, path: str) -> dict:
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            self._check_api_key()
            return self.server.service.models()
        raise RequestError(404, f"no route for GET {path}", error_type="NotFoundError")

    def _route_post(self, path: str) -> dict:
        body = self._read_body()
        if path != "/v1/completions":
            raise RequestError(404, f"no route for POST {path}", error_type="NotFoundError")
        self._check_api_key()
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from None
        return self.server.service.completions(request)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            # The body is left unread, so this connection cannot carry another request.
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _check_api_key(self) -> None:
        expected = self.server.api_key
        if expected is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            raise RequestError(401, "invalid or missing API key", error_type="authentication_error")

    def _respond(self, route) -> None:
        try:
            status, body = 200, route()
        except RequestError as exc:
            status, body = exc.status, exc.body()
        except Exception:
            logger.exception("teacher server failed on %s %s", self.command, self.path)
            status, body = 500, RequestError(500, "internal server error", error_type="server_error").body()
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class TeacherHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to a :class:`TeacherService`; ``server_close`` also stops its worker."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: TeacherService, *, api_key: str | None = None) -> None:
        self.service = service
        self.api_key = api_key
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


def _api_key_from_env(api_key_env: str | None) -> str | None:
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        # Serving without the key the operator asked for would silently open the server.
        raise ValueError(f"--api-key-env {api_key_env} was given but that environment variable is empty or unset")
    return key


def build_server(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    dtype: str = "auto",
    device: str | None = None,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    api_key_env: str | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
) -> TeacherHTTPServer:
    """Load the teacher (and its tokenizer, if the checkpoint has one) and bind the server; not yet serving."""
    api_key = _api_key_from_env(api_key_env)
    model = load_teacher_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # decoded_token is cosmetic; scoring needs no tokenizer
        logger.warning("no tokenizer loaded from %s (%s); decoded_token will be null", model_path, exc)
        tokenizer = None
    if max_model_len is None:
        max_model_len = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    teacher = InProcessTeacher(model, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch)
    service = TeacherService(
        teacher, model_name=served_model_name or model_path, tokenizer=tokenizer, max_model_len=max_model_len
    )
    try:
        return TeacherHTTPServer((host, port), service, api_key=api_key)
    except BaseException:
        service.close()
        raise


def start_server(model_path: str, host: str = "127.0.0.1", port: int = 0, **kwargs) -> tuple[TeacherHTTPServer, threading.Thread]:
    """Build the server (see :func:`build_server` for ``kwargs``) and serve it on a daemon thread.

    ``port=0`` picks a free port; read it back from ``server.url``. Stop with
    ``server.shutdown(); server.server_close()``.
    """
    server = build_server(model_path, host, port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="teacher-http", daemon=True)
    thread.start()
    return server, thread


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help="teacher checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (printed at start)")
    parser.add_argument("--dtype", default="auto", help="'auto' (checkpoint dtype) or a torch dtype name such as bfloat16")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="cap on padded tokens per forward pass")
    parser.add_argument(
        "--api-key-env", default=None, metavar="ENV_VAR", help="require 'Authorization: Bearer $ENV_VAR' on /v1 routes"
    )
    parser.add_argument("--served-model-name", default=None, help="name for /v1/models and the 'model' field (default: --model)")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="longest accepted prompt (default: the model's max_position_embeddings)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the checkpoint")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(
            args.model,
            args.host,
            args.port,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
            max_tokens_per_batch=args.max_tokens_per_batch,
            api_key_env=args.api_key_env,
            served_model_name=args.served_model_name,
            max_model_len=args.max_model_len,
            trust_remote_code=args.trust_remote_code,
        )
    except (ValueError, OSError) as exc:
        print(f"scope serve-teacher: {exc}", flush=True)
        return 2

    def stop_on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # Parsed by tests and scripts that start the server with --port 0.
    print(f"scope serve-teacher: serving {server.service.model_name!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
