"""``scope serve-teacher``: a faithful subset of vLLM's OpenAI-compatible server, for scoring.

Serves a `transformers` teacher through :class:`InProcessTeacher`, so
:class:`~scope_opd.teachers.ServerTeacher` can be tested on a CPU and used
without vLLM. Every request it accepts is answered as vLLM (0.31/0.32) answers
it, and every request vLLM refuses it refuses with vLLM's status and error
body ``{"error": {"message", "type", "param", "code"}}``; requests that need a
generator it does not have get an honest 400 that says so.

Endpoints (every route but ``/health`` needs ``Authorization: Bearer KEY`` when
``--api-key-env`` is set; a wrong key is vLLM's ``401 {"error": "Unauthorized"}``):

* ``POST /v1/completions``: ``"prompt"`` token ids, a list of such lists, a string
  or a list of strings (tokenized with ``add_special_tokens``, default true), at
  most 1024 prompts; ``prompt_logprobs`` ``k`` in [0, 20] (integral floats such
  as ``2.0`` accepted); ``echo``; ``n``; ``stream`` (SSE chunks, as vLLM:
  ``prompt_logprobs`` above 0 are refused with ``stream``); ``return_token_ids``.
  ``prompt_logprobs`` entries are vLLM's: ``null`` first, then
  ``{"<id>": {"logprob", "rank", "decoded_token"}}``, the actual token first,
  ``-inf`` sent as ``-9999.0``. A request in which any returned log-prob would
  be NaN is refused as vLLM refuses it: HTTP 400 "Out of range float values are
  not JSON compliant".
  **Generation** is at most one greedy token: ``max_tokens`` 0 with ``echo`` (no
  generation), or an effective ``max_tokens`` of 1 (``min(max_tokens,
  max_model_len - prompt length)``, as vLLM computes it) with ``temperature`` 0;
  the token is the teacher's argmax, ``finish_reason`` ``"stop"`` on eos, else
  ``"length"``. Longer or sampled generation, ``logprobs``, ``logit_bias``,
  penalties, ``stop``, ``min_tokens``, ``suffix`` and beam search get a 400 that
  names the field. A prompt of exactly ``max_model_len`` tokens leaves no room
  for a token: 400 "max_tokens must be at least 1, got 0", as vLLM.
* ``GET /v1/models``: the model card, with ``max_model_len``.
* ``POST /tokenize`` (``{"prompt": str, "add_special_tokens", "return_token_strs"}``)
  and ``POST /detokenize`` (``{"tokens": [ids]}``), ``GET /version``: open in vLLM,
  keyed here (vLLM's key guards only ``/v1``; an open ``/tokenize`` lets anyone
  without the key spend the server's memory). ``GET /health`` (200, empty body): open.

Hostile load: the HTTP layer is an asyncio server (stdlib) with a listen backlog
of 1024, a connection cap kept below the process's descriptor limit (a new
connection at the cap evicts the oldest connection that has no request in
progress), a keep-alive idle timeout and a deadline for each request's headers
and body, strict HTTP/1.1 header parsing (one ASCII ``Content-Length``, no
``Transfer-Encoding``), the route and the key checked before the body is read,
bare-LF line endings refused with a 400, caps on body bytes, JSON values, text
characters, prompt tokens and response bytes per request on every route
(413/400 before any scoring or tokenizing where the size is known; ``stream``
and a large ``n`` included), a budget for the large request bodies held at once,
a connection whose client does not read its answer evictable after 1 s at the
cap, and client disconnects logged at most once a minute. Request handling runs
on a bounded thread pool whose threads, when all are busy, go round robin to
the waiting client addresses (a lone client uses them all); one worker thread
owns the model and batches the rows that arrive together.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import hmac
import importlib.metadata
import json
import logging
import math
import os
import queue
import re
import resource
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from .in_process import InProcessTeacher, TokenScores, load_teacher_model
from .server_client import VLLM_NEG_INF_LOGPROB

__all__ = ["ServerLimits", "TeacherHTTPServer", "TeacherService", "configure_parser", "main", "start_server"]

logger = logging.getLogger(__name__)

# vLLM's defaults: --max-logprobs, VLLM_MAX_COMPLETION_PROMPTS, CompletionRequest.max_tokens.
MAX_PROMPT_LOGPROBS = 20
MAX_PROMPTS_PER_REQUEST = 1024
VLLM_DEFAULT_MAX_TOKENS = 16
# Python's own message for NaN under allow_nan=False; vLLM's 400 body carries the same text
# (starlette serialises with allow_nan=False and vLLM maps the ValueError to a 400).
try:
    json.dumps(float("nan"), allow_nan=False)
except ValueError as _nan_error:
    NAN_MESSAGE = str(_nan_error)
# Fewest bytes one prompt_logprobs entry can take ('"0": {"logprob": 0.0, "rank": 1, "decoded_token": null}'):
# entries x this bounds a response from below before anything is scored.
_MIN_ENTRY_BYTES = 50
# Fewest bytes one choice takes, streamed or not ('{"index": 0, "text": "", "logprobs": null, ...}' is over
# 140): choices x this bounds an answer from below, so a huge `n` is refused before anything is built.
_MIN_CHOICE_BYTES = 100
# Bodies up to this size never wait for the buffered-body budget: at most max_connections x this.
SMALL_BODY_BYTES = 64 * 1024
# JSON values a body may hold beyond --max-request-tokens (the token ids): keys, flags, prompt lists.
_JSON_VALUES_SLACK = 4 * MAX_PROMPTS_PER_REQUEST + 4096
# Fields that change which token greedy decoding picks, or how its text ends, with their no-op values.
_GENERATION_FIELDS = {
    "logprobs": (None,),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "logprob_token_ids": (None, []),
    "min_tokens": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "stop": (None, [], ""),
    "stop_token_ids": (None, []),
    "suffix": (None, ""),
    "use_beam_search": (None, False),
    "response_format": (None,),
    "structured_outputs": (None,),
}


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one client from starving the others (``scope serve-teacher --help`` names each).

    Attributes:
        max_connections: open connections at once; clamped below ``RLIMIT_NOFILE``.
        backlog: the listen queue (the kernel caps it at ``net.core.somaxconn``).
        keep_alive_timeout_s: how long a connection may sit with no request
            started (5 s: uvicorn's and so vLLM's default).
        request_read_timeout_s: from a request's first byte to its last.
        write_timeout_s: to hand a response to a client that is reading it.
        max_header_bytes, max_headers: request line plus headers.
        max_body_bytes: a request body.
        max_request_tokens: prompt tokens in one request.
        max_response_bytes: one response body (413 when it would be larger).
        worker_threads: requests parsed and answered at once; when all are busy,
            a freed thread goes to the next waiting client address in turn.
        max_buffered_body_bytes: request bodies over :data:`SMALL_BODY_BYTES`
            held at once (read, parsed or being answered), all clients together;
            a request that would pass it gets a 503 before its body is read.
    """

    max_connections: int = 1024
    backlog: int = 1024
    keep_alive_timeout_s: float = 5.0
    request_read_timeout_s: float = 30.0
    write_timeout_s: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 32 * 2**20
    max_request_tokens: int = 2**20
    max_response_bytes: int = 64 * 2**20
    worker_threads: int = 8
    max_buffered_body_bytes: int = 128 * 2**20


class RequestError(Exception):
    """A request the server refuses: its HTTP status and vLLM's error body."""

    def __init__(
        self, status: int, message: str, *, error_type: str = "BadRequestError", param: str | None = None,
        body: dict | None = None, close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param
        self._body = body
        # The rest of the request is unread (or unreadable): the connection cannot carry another one.
        self.close = close

    def body(self) -> dict:
        if self._body is not None:
            return self._body
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.status}}


def _http_error(status: HTTPStatus, message: str | None = None, *, close: bool = False) -> RequestError:
    """An HTTP-level refusal: the reason phrase as ``type``; a bare 404/405 is starlette's ``{"detail"}``, as vLLM."""
    body = {"detail": status.phrase} if message is None else None
    return RequestError(status.value, message or status.phrase, error_type=status.phrase, body=body, close=close)


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


@dataclass
class _Completion:
    """One validated ``/v1/completions`` request."""

    prompts: list[list[int]]
    prompt_texts: list[str] | None
    top_k: int | None  # prompt_logprobs; None: not returned
    generate: bool  # one greedy token after each prompt
    n: int
    echo: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    skip_special_tokens: bool
    ignore_eos: bool


class TeacherService:
    """Request validation and response building for the served teacher (no HTTP here).

    Args:
        teacher: the scorer that owns the model.
        model_name: the name ``/v1/models`` reports and ``"model"`` must match.
        tokenizer: for text prompts, ``echo``, ``decoded_token`` and generated text;
            ``None`` behaves like vLLM's ``--skip-tokenizer-init`` (null/empty text).
        max_model_len: longest context in tokens; ``None`` for no limit.
        limits: the per-request caps of :class:`ServerLimits`.
        eos_token_ids: tokens that end a generation (``finish_reason`` "stop").
    """

    def __init__(
        self, teacher: InProcessTeacher, *, model_name: str, tokenizer=None, max_model_len: int | None = None,
        limits: ServerLimits | None = None, eos_token_ids: set[int] | None = None,
    ) -> None:
        self.teacher = teacher
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.limits = limits or ServerLimits()
        self.eos_token_ids = set(eos_token_ids or ())
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.created = int(time.time())
        self._decoded: dict[int, str | None] = {}
        self._worker = _ScoringWorker(teacher)

    def close(self) -> None:
        self._worker.stop()

    # -- small endpoints ---------------------------------------------------------------------------

    def models(self) -> dict:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "scope-opd",
            "root": self.model_name,
            "parent": None,
        }
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [card]}

    @staticmethod
    def version() -> dict:
        try:
            version = importlib.metadata.version("scope-opd")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {"version": version, "server": "scope serve-teacher"}

    def tokenize(self, request) -> dict:
        request = self._object(request)
        self._check_model(request)
        if "messages" in request:
            raise RequestError(400, "chat `messages` are not supported by /tokenize here; send `prompt`", param="messages")
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(400, f"`prompt` must be a string, got {type(prompt).__name__}", param="prompt")
        tokenizer = self._need_tokenizer("/tokenize")
        add_special = self._bool(request, "add_special_tokens", True)
        self._check_text_length([prompt])
        tokens = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
        self._check_token_count(len(tokens))
        response = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": None}
        if self._bool(request, "return_token_strs", False):
            response["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return response

    def detokenize(self, request) -> dict:
        request = self._object(request)
        self._check_model(request)
        tokens = request.get("tokens")
        if not isinstance(tokens, list):
            raise RequestError(400, "`tokens` must be a list of token ids", param="tokens")
        self._check_token_count(len(tokens), param="tokens")
        self._check_ids(tokens, "tokens")
        return {"prompt": self._need_tokenizer("/detokenize").decode(tokens)}

    # -- completions -------------------------------------------------------------------------------

    def completions(self, request) -> tuple[str, bytes]:
        """Answer one ``/v1/completions`` body: ``(content_type, payload)``; raises :class:`RequestError`."""
        completion = self._validate(request)
        need_scores = completion.generate or (completion.top_k is not None and not completion.stream)
        scores: list[TokenScores | None] = [None] * len(completion.prompts)
        if need_scores:
            top_k = max(completion.top_k or 0, 1 if completion.generate else 0)
            # A trailing placeholder token makes the scorer return the distribution after the
            # prompt: its top-1 is the greedy token (the placeholder's own score is dropped).
            futures = [
                self._worker.submit(prompt + [0] if completion.generate else prompt, top_k)
                for prompt in completion.prompts
            ]
            scores = [future.result() for future in futures]
            self._refuse_nan(completion, scores)
        if completion.stream:
            return "text/event-stream", self._stream_body(completion, scores)
        return "application/json", self._json_body(completion, scores)

    def _validate(self, request) -> _Completion:
        request = self._object(request)
        limits = self.limits
        # Types first (vLLM's pydantic model and its "before" validators), then the model, then lengths.
        echo = self._bool(request, "echo", False)
        stream = self._bool(request, "stream", False)
        n = request.get("n", 1)
        if not _is_int(n):
            raise RequestError(400, f"`n` must be an integer, got {n!r}", param="n")
        max_tokens = request.get("max_tokens")
        if max_tokens is None:
            max_tokens = VLLM_DEFAULT_MAX_TOKENS
        elif not _is_int(max_tokens):
            raise RequestError(400, f"`max_tokens` must be an integer, got {max_tokens!r}", param="max_tokens")
        top_k = self._integral(request, "prompt_logprobs")
        if request.get("stream_options") and not stream:
            raise RequestError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        if top_k is not None:
            if stream and (top_k > 0 or top_k == -1):
                raise RequestError(400, "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
            if top_k < 0 and top_k != -1:
                raise RequestError(400, "`prompt_logprobs` must be a positive value or -1.", param="prompt_logprobs")
            if top_k == -1 or top_k > MAX_PROMPT_LOGPROBS:
                # vLLM reads -1 as the vocabulary size before comparing with --max-logprobs.
                requested = self.teacher.vocab_size if top_k == -1 else top_k
                hint = " (`prompt_logprobs` -1 asks for the full vocabulary)" if top_k == -1 else ""
                raise RequestError(
                    400,
                    f"Requested prompt logprobs of {requested}, which is greater than max allowed: "
                    f"{MAX_PROMPT_LOGPROBS}{hint}",
                    param="prompt_logprobs",
                )
        prompts, prompt_texts = self._prompts(request)
        self._check_model(request)
        if n < 1:
            raise RequestError(400, f"n must be at least 1, got {n}.", param="n")
        temperature = request.get("temperature")
        greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature < 1e-5
        if greedy and n > 1:
            raise RequestError(400, f"n must be 1 when using greedy sampling, got {n}.")

        self._check_token_count(sum(len(p) for p in prompts))
        for i, prompt in enumerate(prompts):
            if self.max_model_len is not None and len(prompt) > self.max_model_len:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                    f"{i} contains {len(prompt)} input tokens, which exceeds this limit even without any output "
                    "tokens. Please reduce the length of the input prompt.",
                    param="input_tokens",
                )

        # vLLM's get_max_tokens: the budget is what is left of the context, then SamplingParams
        # refuses a budget under 1 unless echo asks for the prompt alone (max_tokens 0).
        generate = not (echo and max_tokens == 0)
        if not generate and self.max_model_len is not None:
            # vLLM still schedules one (discarded) token for echo with max_tokens 0.
            for prompt in prompts:
                if len(prompt) == self.max_model_len:
                    raise RequestError(
                        400,
                        f"The decoder prompt (length {len(prompt)}) plus the number of requested output tokens (at "
                        f"least 1) is longer than the maximum model length of {self.max_model_len}. Make sure that "
                        "`max_model_len` is no smaller than the number of text tokens (prompt + requested output tokens).",
                    )
        if generate:
            for prompt in prompts:
                budget = max_tokens if self.max_model_len is None else min(max_tokens, self.max_model_len - len(prompt))
                if budget < 1:
                    raise RequestError(400, f"max_tokens must be at least 1, got {budget}.", param="max_tokens")
                if budget > 1:
                    raise RequestError(
                        400,
                        f"scope serve-teacher scores prompts and generates at most one greedy token: max_tokens "
                        f"{max_tokens} would generate {budget} (send max_tokens 1 with temperature 0, or max_tokens 0 "
                        "with echo)",
                        param="max_tokens",
                    )
            if not greedy:
                raise RequestError(
                    400,
                    f"scope serve-teacher generates only the greedy token: temperature must be 0, got {temperature!r} "
                    "(or send max_tokens 0 with echo to generate nothing)",
                    param="temperature",
                )
        for field, neutral in _GENERATION_FIELDS.items():
            if request.get(field) not in neutral:
                raise RequestError(
                    400, f"`{field}` is not supported by scope serve-teacher (it scores; see its docs)", param=field
                )
        if echo and self.tokenizer is None and prompt_texts is None:
            raise RequestError(400, "`echo` needs the teacher's tokenizer, which this server has not loaded", param="echo")

        completion = _Completion(
            prompts=prompts, prompt_texts=prompt_texts, top_k=top_k, generate=generate, n=n, echo=echo, stream=stream,
            include_usage=bool(isinstance(request.get("stream_options"), dict)
                               and request["stream_options"].get("include_usage")),
            return_token_ids=self._bool(request, "return_token_ids", False),
            skip_special_tokens=self._bool(request, "skip_special_tokens", True),
            ignore_eos=self._bool(request, "ignore_eos", False),
        )
        self._check_response_size(completion)
        return completion

    def _check_token_count(self, count: int, param: str = "prompt") -> None:
        if count > self.limits.max_request_tokens:
            raise RequestError(
                400,
                f"the request holds {count} {'prompt ' if param == 'prompt' else ''}tokens, more than this server's "
                f"--max-request-tokens {self.limits.max_request_tokens}; split it into smaller requests",
                param=param,
            )

    def _check_text_length(self, texts: list[str]) -> None:
        """Refuse text before tokenizing it: a tokenizer's memory grows with the characters, not the tokens kept."""
        characters = sum(len(t) for t in texts)
        if characters > self.limits.max_request_tokens:
            raise RequestError(
                400,
                f"the request holds {characters} characters of text, more than this server's --max-request-tokens "
                f"{self.limits.max_request_tokens} (text is refused before tokenizing it); send token ids or split "
                "it into smaller requests",
                param="prompt",
            )

    def _check_response_size(self, completion: _Completion) -> None:
        choices = len(completion.prompts) * completion.n
        entries = 0
        if completion.top_k is not None and not completion.stream:
            entries = sum(max(len(p) - 1, 0) for p in completion.prompts) * completion.n
        lower_bound = entries * (1 + (completion.top_k or 0)) * _MIN_ENTRY_BYTES + choices * _MIN_CHOICE_BYTES
        if lower_bound > self.limits.max_response_bytes:
            raise RequestError(
                413,
                f"the answer would be over {lower_bound} bytes ({choices} choices, {entries} prompt positions x "
                f"{1 + (completion.top_k or 0)} log-probs), more than this server's --max-response-bytes "
                f"{self.limits.max_response_bytes}; send fewer tokens or a smaller n or prompt_logprobs per request",
                error_type="PayloadTooLarge",
                param="prompt",
            )

    def _prompts(self, request) -> tuple[list[list[int]], list[str] | None]:
        prompt = request.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise RequestError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        texts = None
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            texts = prompt
        if texts is not None:
            if len(texts) > MAX_PROMPTS_PER_REQUEST:
                raise self._too_many_prompts(len(texts))
            tokenizer = self._need_tokenizer("text prompts")
            self._check_text_length(texts)
            add_special = self._bool(request, "add_special_tokens", True)
            sequences = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
        elif isinstance(prompt, list) and all(isinstance(p, list) for p in prompt):
            if len(prompt) > MAX_PROMPTS_PER_REQUEST:
                raise self._too_many_prompts(len(prompt))
            sequences = prompt
        elif isinstance(prompt, list) and not any(isinstance(t, (list, str, dict)) for t in prompt):
            sequences = [prompt]
        else:
            raise RequestError(
                400, "`prompt` must be token ids, a list of token-id lists, a string or a list of strings", param="prompt"
            )
        for i, sequence in enumerate(sequences):
            if not sequence:
                raise RequestError(400, f"prompt {i} is empty", param="prompt")
            self._check_ids(sequence, "prompt", i)
        return sequences, texts

    @staticmethod
    def _too_many_prompts(count: int) -> RequestError:
        return RequestError(
            400,
            f"prompt list length {count} exceeds the maximum allowed count of {MAX_PROMPTS_PER_REQUEST}.",
            param="prompt",
        )

    def _check_ids(self, sequence: list, param: str, row: int | None = None) -> None:
        vocab_size = self.teacher.vocab_size
        bad = next((j for j, t in enumerate(sequence) if not _is_int(t) or not 0 <= t < vocab_size), None)
        if bad is not None:
            where = f"prompt {row} position {bad}" if row is not None else f"{param} position {bad}"
            raise RequestError(400, f"{where} holds {sequence[bad]!r}, not a token id in [0, {vocab_size})", param=param)

    def _check_model(self, request: dict) -> None:
        model = request.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"The model `{model}` does not exist.", error_type="NotFoundError", param="model")

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise RequestError(400, f"{what} need the teacher's tokenizer, which this server has not loaded")
        return self.tokenizer

    @staticmethod
    def _object(request) -> dict:
        if not isinstance(request, dict):
            raise RequestError(400, "request body must be a JSON object")
        return request

    @staticmethod
    def _bool(request: dict, field: str, default: bool) -> bool:
        value = request.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise RequestError(400, f"`{field}` must be a boolean, got {value!r}", param=field)
        return value

    @staticmethod
    def _integral(request: dict, field: str) -> int | None:
        """An int field as pydantic reads it: integral floats (2.0) pass, 2.5 and strings do not."""
        value = request.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, f"`{field}` must be an integer.", param=field)
        if isinstance(value, float):
            if not value.is_integer():  # pydantic's error, as vLLM's validation handler renders it
                raise RequestError(
                    400,
                    f"1 validation error:\n  {{'type': 'int_from_float', 'loc': 'body.{field}', 'msg': 'Input should be "
                    f"a valid integer, got a number with a fractional part', 'input': {value!r}}}",
                    error_type="Bad Request",
                    param=f"body.{field}",
                )
            value = int(value)
        return value

    # -- answers -----------------------------------------------------------------------------------

    def _refuse_nan(self, completion: _Completion, scores: list[TokenScores]) -> None:
        """vLLM fails the whole request when a returned log-prob is NaN (JSON has no NaN)."""
        k = completion.top_k or 0
        for row_scores in scores:
            logprobs = row_scores.logprobs[:-1] if completion.generate else row_scores.logprobs
            returned = [logprobs] if completion.top_k is not None and not completion.stream else []
            if k and row_scores.top_logprobs is not None:
                returned.append(row_scores.top_logprobs[: len(logprobs), :k])
            if any(bool(t.isnan().any()) or bool((t == math.inf).any()) for t in returned if t.numel()):
                raise RequestError(400, NAN_MESSAGE)

    def _choices(self, completion: _Completion, scores: list[TokenScores | None]):
        """Yield ``(prompt index, choice index, text, finish_reason, token_ids, completion_tokens)``."""
        for i, prompt in enumerate(completion.prompts):
            generated: list[int] = []
            finish_reason = "length"
            if completion.generate:
                token = int(scores[i].top_ids[-1, 0])
                generated = [token]
                if token in self.eos_token_ids and not completion.ignore_eos:
                    finish_reason = "stop"
            text = ""
            if self.tokenizer is not None and generated:
                text = self.tokenizer.decode(generated, skip_special_tokens=completion.skip_special_tokens)
            if completion.echo:
                prompt_text = completion.prompt_texts[i] if completion.prompt_texts else self.tokenizer.decode(prompt)
                text = prompt_text + text
            for j in range(completion.n):
                yield i, i * completion.n + j, text, finish_reason, generated, len(generated)

    def _usage(self, completion: _Completion) -> dict:
        prompt_tokens = sum(len(p) for p in completion.prompts)
        # vLLM counts the token it decodes and discards for echo with max_tokens 0 too.
        completion_tokens = len(completion.prompts) * completion.n
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens, "prompt_tokens_details": None}

    def _json_body(self, completion: _Completion, scores: list[TokenScores | None]) -> bytes:
        # Serialised choice by choice with a running byte count: an answer over the cap is refused
        # once it passes the cap, never built whole in memory first.
        budget = self.limits.max_response_bytes
        pieces: list[bytes] = []
        size = 0
        prompt_logprobs_json: dict[int, bytes] = {}
        for i, index, text, finish_reason, generated, _ in self._choices(completion, scores):
            choice = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": generated if completion.return_token_ids else None,
                "prompt_logprobs": None,
                "prompt_token_ids": completion.prompts[i] if completion.return_token_ids else None,
            }
            head = json.dumps(choice, allow_nan=False).encode()
            if completion.top_k is not None:
                if i not in prompt_logprobs_json:
                    prompt_logprobs_json[i] = self._prompt_logprobs_json(
                        completion.prompts[i], scores[i], completion.top_k, budget - size, drop_last=completion.generate
                    )
                head = head.replace(b'"prompt_logprobs": null', b'"prompt_logprobs": ' + prompt_logprobs_json[i], 1)
            size += len(head) + 2
            if size > budget:
                raise self._too_large(budget)
            pieces.append(head)
        envelope = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self._usage(completion),
        }
        before, after = json.dumps(envelope).encode().split(b'"choices": []', 1)
        return b"".join([before, b'"choices": [', b", ".join(pieces), b"]", after])

    def _prompt_logprobs_json(self, sequence: list[int], scores: TokenScores, top_k: int, budget: int, *, drop_last: bool) -> bytes:
        # Plain lists first: indexing tensors element by element is slow for 10k-token rows.
        positions = len(sequence) - 1
        logprobs, ranks = scores.logprobs[:positions].tolist(), scores.ranks[:positions].tolist()
        top_ids = scores.top_ids[:positions, :top_k].tolist() if top_k else None
        top_logprobs = scores.top_logprobs[:positions, :top_k].tolist() if top_k else None
        pieces = [b"[null"]
        size = len(pieces[0])
        for position, token in enumerate(sequence[1:]):
            # The actual token first, then the top-k (once each: a dict), as vLLM orders them.
            entry = {str(token): self._logprob_entry(token, logprobs[position], ranks[position])}
            if top_k:
                for rank, (top_id, value) in enumerate(zip(top_ids[position], top_logprobs[position]), start=1):
                    entry.setdefault(str(top_id), self._logprob_entry(top_id, value, rank))
            piece = json.dumps(entry, allow_nan=False).encode()
            size += len(piece) + 2
            if size > budget:
                raise self._too_large(self.limits.max_response_bytes)
            pieces.append(piece)
        return b", ".join(pieces) + b"]"

    def _stream_body(self, completion: _Completion, scores: list[TokenScores | None]) -> bytes:
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = []
        for i, index, text, finish_reason, generated, _ in self._choices(completion, scores):
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
            if completion.return_token_ids:
                choice.update(prompt_token_ids=completion.prompts[i], token_ids=generated)
            chunk = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                     "choices": [choice], "usage": None}
            events.append(chunk)
        if completion.include_usage:
            events.append({"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                           "choices": [], "usage": self._usage(completion)})
        body = b"".join(b"data: " + json.dumps(e, allow_nan=False).encode() + b"\n\n" for e in events)
        body += b"data: [DONE]\n\n"
        if len(body) > self.limits.max_response_bytes:
            raise self._too_large(self.limits.max_response_bytes)
        return body

    @staticmethod
    def _too_large(budget: int) -> RequestError:
        return RequestError(
            413, f"the answer is over this server's --max-response-bytes {budget}; send fewer tokens per request",
            error_type="PayloadTooLarge", param="prompt",
        )

    def _logprob_entry(self, token: int, logprob: float, rank: int) -> dict:
        # vLLM's clamp_prompt_logprobs: -inf is not JSON, -9999.0 stands in for it.
        logprob = VLLM_NEG_INF_LOGPROB if logprob == -math.inf else logprob
        return {"logprob": logprob, "rank": rank, "decoded_token": self._decode(token)}

    def _decode(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# == HTTP =============================================================================================

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
# Routes that answer without the key when one is set: a liveness probe carries no data.
_OPEN_ROUTES = frozenset({"/health"})
# A JSON string, escapes included: removed before counting the values a body holds.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


@dataclass
class _Request:
    method: str
    path: str
    keep_alive: bool
    headers: dict[bytes, bytes]


async def _read_head(first: bytes, reader: asyncio.StreamReader, limits: ServerLimits) -> list[bytes]:
    """The request line and header lines, each ended by CRLF; a bare LF is a 400 at once, not a wait for CRLFCRLF."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            line = b""
            size = limits.max_header_bytes + 1
        size += len(line)
        if size > limits.max_header_bytes:
            raise _http_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                              f"request line and headers over {limits.max_header_bytes} bytes", close=True)
        if first:
            line, first = first + line, b""
        if not line.endswith(b"\r\n"):
            raise _http_error(HTTPStatus.BAD_REQUEST, "bare LF line ending: lines must end with CRLF", close=True)
        if line == b"\r\n":
            return lines
        lines.append(line[:-2])
        if len(lines) - 1 > limits.max_headers:
            raise _http_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {limits.max_headers} headers",
                              close=True)


def _parse_head(lines: list[bytes], limits: ServerLimits) -> _Request:
    """Strict HTTP/1.1 request line and headers (RFC 9112): anything ambiguous is a 400."""
    if not lines:
        raise _http_error(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _http_error(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
    method, target, minor = match.group(1).decode(), match.group(2).decode(), match.group(3)
    if len(lines) - 1 > limits.max_headers:
        raise _http_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {limits.max_headers} headers", close=True)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:  # also obsolete line folding, a space before the colon, control bytes
            raise _http_error(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}", close=True)
        name, value = header.group(1).lower(), header.group(2)
        if name in headers:
            if name in (b"content-length", b"host", b"authorization", b"transfer-encoding"):
                raise _http_error(HTTPStatus.BAD_REQUEST, f"duplicate {name.decode()} header", close=True)
            headers[name] += b", " + value
        else:
            headers[name] = value
    if minor == b"1" and b"host" not in headers:
        raise _http_error(HTTPStatus.BAD_REQUEST, "missing Host header", close=True)
    connection = {t.strip() for t in headers.get(b"connection", b"").lower().split(b",")}
    keep_alive = b"close" not in connection if minor == b"1" else b"keep-alive" in connection
    return _Request(method, target.split("?", 1)[0], keep_alive, headers)


def _content_length(request: _Request) -> int:
    if b"transfer-encoding" in request.headers:
        raise _http_error(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding bodies are not accepted; send Content-Length",
                          close=True)
    value = request.headers.get(b"content-length")
    if value is None:
        if request.method == "POST":
            raise _http_error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required", close=True)
        return 0
    if _CONTENT_LENGTH.fullmatch(value) is None:  # ASCII digits only: '²'.isdigit() is True, int('²') fails
        raise _http_error(HTTPStatus.BAD_REQUEST, f"malformed Content-Length {value[:40]!r}", close=True)
    return int(value)


class _RateLimitedLog:
    """At most one record per ``interval_s`` for a noisy event, with the count of those not logged."""

    def __init__(self, message: str, interval_s: float = 60.0) -> None:
        self.message, self.interval_s = message, interval_s
        self._last, self._suppressed = -math.inf, 0
        self._lock = threading.Lock()

    def __call__(self, detail: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        logger.warning("%s (%s; %d more in the last %.0f s not logged)", self.message, detail, suppressed, self.interval_s)


class _Connection:
    __slots__ = ("writer", "state", "since", "client")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else str(peer)
        self.set("idle")

    def set(self, state: str) -> None:
        self.state = state  # idle | reading | busy | writing | evicted
        self.since = time.monotonic()

    def evictable(self, now: float) -> bool:
        # A new client sends its request within milliseconds of connecting: only connections that have
        # sat idle, have been sending one request for a while (slowloris), or whose client has not taken
        # its answer for a while (it does not read) make room for others.
        return now - self.since >= _EVICTABLE_AFTER_S.get(self.state, math.inf)


# Seconds in a state after which a connection may be closed for a newcomer at the cap. A client that
# does not read its answer is evicted after 1 s, well inside ServerTeacher's ~7.5 s of retries.
_EVICTABLE_AFTER_S = {"idle": 0.25, "reading": 1.0, "writing": 1.0}


class _FairPool:
    """The worker pool's threads handed out round robin among client addresses (loop thread only).

    Work-conserving: a lone client uses every thread (its throughput is the pool's). When threads are
    all busy, waiting requests queue per client address, and each thread that frees up goes to the
    next address in turn: a client that queued a hundred requests delays another client's request by
    at most the requests already running, never by its whole queue.
    """

    def __init__(self, pool: ThreadPoolExecutor, threads: int) -> None:
        self._pool, self._free = pool, threads
        self._waiting: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    async def run(self, client: str, function: Callable, *args):
        await self._acquire(client)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
        finally:
            self._release()

    async def _acquire(self, client: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, collections.deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a thread as the connection went away: pass it on
            else:
                queue = self._waiting.get(client)
                if queue is not None and turn in queue:
                    queue.remove(turn)
                    if not queue:
                        del self._waiting[client]
            raise

    def _release(self) -> None:
        while self._waiting:
            client, queue = self._waiting.popitem(last=False)
            turn = queue.popleft()
            if queue:
                self._waiting[client] = queue  # to the back of the round
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class _BodyBudget:
    """Bytes of large request bodies held at once (loop thread only, so no lock)."""

    def __init__(self, total: int) -> None:
        self.total, self.held = total, 0

    def reserve(self, length: int) -> int:
        """The bytes reserved for a body of ``length`` (0 for a small one); raises a 503 when over budget."""
        if length <= SMALL_BODY_BYTES:
            return 0
        if self.held + length > self.total:
            raise RequestError(
                503, f"the server holds {self.held} bytes of large request bodies; one of {length} bytes would pass its "
                f"--max-buffered-request-bytes {self.total}: retry shortly", error_type="ServiceUnavailable", close=True,
            )
        self.held += length
        return length

    def release(self, reserved: int) -> None:
        self.held -= reserved
_ACCEPT_BATCH = 8


def _disable_nagle(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY on an accepted connection: asyncio sets it only on sockets created with proto IPPROTO_TCP.

    Accepted sockets have proto 0, so Python 3.11's asyncio leaves Nagle on; the response's head and
    body then go out as two writes, the second held until the client ACKs the first, which clients
    delay by up to 40 ms: measured 45 ms per keep-alive request on loopback, whatever the work.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the client already left; the first read reports it
            pass


class TeacherHTTPServer:
    """The asyncio HTTP/1.1 server around a :class:`TeacherService`; binds at construction.

    ``serve_forever()`` runs it in the calling thread; ``shutdown()`` (from any
    thread) stops it; ``server_close()`` releases the socket and the model worker.
    """

    def __init__(self, address: tuple[str, int], service: TeacherService, *, api_key: str | None = None,
                 limits: ServerLimits | None = None) -> None:
        self.service = service
        self.limits = limits or service.limits
        self._api_key_hash = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_connections = _connection_cap(self.limits.max_connections)
        self._socket = socket.create_server(address, backlog=self.limits.backlog)
        self.server_address = self._socket.getsockname()
        self._pool = ThreadPoolExecutor(self.limits.worker_threads, thread_name_prefix="teacher-http")
        self._connections: dict[_Connection, None] = {}  # insertion order: oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started, self._stopped = threading.Event(), threading.Event()
        self._log_disconnect = _RateLimitedLog("client connection dropped")
        self._log_loop_error = _RateLimitedLog("connection error")
        self._fair_pool = _FairPool(self._pool, self.limits.worker_threads)
        self._body_budget = _BodyBudget(self.limits.max_buffered_body_bytes)
        self.counters = {"evicted": 0, "refused_at_cap": 0, "timed_out": 0, "disconnects": 0, "over_body_budget": 0}
        self._routes: dict[str, dict[str, Callable]] = {
            "/health": {"GET": lambda body: (200, "application/json", b"")},
            "/version": {"GET": lambda body: self._json(self.service.version())},
            "/v1/models": {"GET": lambda body: self._json(self.service.models())},
            "/v1/completions": {"POST": lambda body: (200, *self.service.completions(self._load_json(body)))},
            "/tokenize": {"POST": lambda body: self._json(self.service.tokenize(self._load_json(body)))},
            "/detokenize": {"POST": lambda body: self._json(self.service.detokenize(self._load_json(body)))},
        }

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @staticmethod
    def _json(body: dict) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(body, allow_nan=False).encode()

    def _load_json(self, body: bytes):
        """Parse a body whose parsed size is bounded: at most --max-request-tokens plus a slack of JSON values.

        A value costs up to ~70 bytes once parsed (an empty dict) for 3 bytes of JSON ('{},'), so a body's
        values are counted (separators and containers outside strings) before ``json.loads`` builds them.
        """
        outside_strings = _JSON_STRING.sub(b'""', body)
        values = outside_strings.count(b",") + outside_strings.count(b"[") + outside_strings.count(b"{")
        allowed = self.limits.max_request_tokens + _JSON_VALUES_SLACK
        if values > allowed:
            raise RequestError(
                400, f"request body holds about {values} JSON values, more than this server parses ({allowed}: "
                f"--max-request-tokens {self.limits.max_request_tokens} plus {_JSON_VALUES_SLACK})",
            )
        del outside_strings
        return _load_json(body)

    # -- lifecycle ---------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(lambda _, context: self._log_loop_error(str(context.get("message"))))
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving and wait until ``serve_forever`` has returned (safe from signal handlers too)."""
        self.request_shutdown()
        if self._started.is_set():
            self._stopped.wait(timeout=30)

    def request_shutdown(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def server_close(self) -> None:
        self._socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.service.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        # asyncio accepts up to `backlog` connections per wake-up before any handler runs: a small
        # batch keeps a reconnect storm from overshooting the cap into EMFILE (and asyncio's 1 s
        # accept pause), while the kernel queue stays `limits.backlog` deep.
        server = await asyncio.start_server(
            self._handle, sock=self._socket, backlog=_ACCEPT_BATCH, limit=self.limits.max_header_bytes
        )
        self._socket.listen(self.limits.backlog)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.writer.transport.abort()
            await asyncio.sleep(0)

    # -- one connection ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _disable_nagle(writer)
        connection = _Connection(writer)
        if len(self._connections) >= self.max_connections and not self._evict_one():
            # Every connection has a request in progress: refuse this one now rather than queue it.
            self.counters["refused_at_cap"] += 1
            try:
                await self._send_error(connection, _http_error(HTTPStatus.SERVICE_UNAVAILABLE,
                                                               "too many connections; retry shortly", close=True))
            except ConnectionError:  # the client left before its refusal: nothing to tell it
                pass
            writer.transport.abort()
            return
        self._connections[connection] = None
        try:
            while await self._one_request(connection, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if connection.state in ("reading", "busy", "writing"):
                self.counters["disconnects"] += 1
                self._log_disconnect(f"{type(exc).__name__} while {connection.state}")
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.pop(connection, None)
            writer.close()

    def _evict_one(self) -> bool:
        """Close the oldest connection with no request being answered; False when there is none."""
        now = time.monotonic()
        for connection in self._connections:
            if connection.evictable(now):
                connection.set("evicted")
                self._connections.pop(connection)
                connection.writer.transport.abort()
                self.counters["evicted"] += 1
                return True
        return False

    async def _one_request(self, connection: _Connection, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Read, answer and write one request; True when the connection may carry another."""
        limits = self.limits
        connection.set("idle")
        try:
            first = await asyncio.wait_for(reader.readexactly(1), limits.keep_alive_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False  # idle too long, or the client closed between requests: both normal
        connection.set("reading")
        deadline = time.monotonic() + limits.request_read_timeout_s
        reserved = 0
        try:
            try:
                lines = await asyncio.wait_for(_read_head(first, reader, limits), limits.request_read_timeout_s)
                request = _parse_head(lines, limits)
                handler = self._route(request)
                length = _content_length(request)
                if length > limits.max_body_bytes:
                    raise RequestError(413, f"request body of {length} bytes is over this server's --max-request-bytes "
                                       f"{limits.max_body_bytes}", error_type="PayloadTooLarge", close=True)
                try:
                    reserved = self._body_budget.reserve(length)
                except RequestError:
                    self.counters["over_body_budget"] += 1
                    raise
                body = b""
                if length:
                    body = await asyncio.wait_for(reader.readexactly(length), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                self.counters["timed_out"] += 1
                await self._send_error(connection, _http_error(HTTPStatus.REQUEST_TIMEOUT, "request not received in time",
                                                               close=True))
                return False
            except RequestError as exc:
                await self._send_error(connection, exc)
                return False  # what follows on this connection cannot be trusted to be a request boundary

            connection.set("busy")
            try:
                status, content_type, payload = await self._fair_pool.run(connection.client, handler, body)
                close = False
                if len(payload) > limits.max_response_bytes:  # every route: the completions path stops earlier
                    raise TeacherService._too_large(limits.max_response_bytes)
            except RequestError as exc:
                status, content_type, payload, close = exc.status, "application/json", json.dumps(exc.body()).encode(), exc.close
            except Exception:
                logger.exception("teacher server failed on %s %s", request.method, request.path)
                error = RequestError(500, "internal server error", error_type="InternalServerError")
                status, content_type, payload, close = 500, "application/json", json.dumps(error.body()).encode(), False
            del body
        finally:
            self._body_budget.release(reserved)
        keep_alive = request.keep_alive and not close
        await self._send(connection, status, content_type, payload, keep_alive)
        return keep_alive

    def _route(self, request: _Request) -> Callable:
        methods = self._routes.get(request.path)
        if methods is None:
            raise _http_error(HTTPStatus.NOT_FOUND, close=_has_body(request))
        if request.method not in methods:
            raise _http_error(HTTPStatus.METHOD_NOT_ALLOWED, close=_has_body(request))
        if self._api_key_hash is not None and request.path not in _OPEN_ROUTES:
            scheme, _, token = request.headers.get(b"authorization", b"").partition(b" ")
            given = hashlib.sha256(token).digest()
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self._api_key_hash):
                raise RequestError(401, "Unauthorized", body={"error": "Unauthorized"}, close=_has_body(request))
        return methods[request.method]

    async def _send_error(self, connection: _Connection, error: RequestError) -> None:
        await self._send(connection, error.status, "application/json", json.dumps(error.body()).encode(), keep_alive=False)

    async def _send(self, connection: _Connection, status: int, content_type: str, payload: bytes,
                    keep_alive: bool) -> None:
        writer = connection.writer
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(payload)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode()
        writer.write(head)
        writer.write(payload)
        # Until the client has taken the answer (beyond the socket buffers) the connection may be evicted.
        connection.set("writing")
        try:
            await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)
        except asyncio.TimeoutError:
            self.counters["timed_out"] += 1
            writer.transport.abort()
            raise ConnectionAbortedError("client did not read the answer in time") from None


def _has_body(request: _Request) -> bool:
    return request.headers.get(b"content-length", b"0") not in (b"0",) or b"transfer-encoding" in request.headers


def _load_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None


def _connection_cap(requested: int) -> int:
    """Keep open connections below the descriptor limit, so ``accept`` never fails for want of one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Descriptors the process needs besides connections (model files, pipes, logging), and the
    # sockets accepted but not yet seen by a handler (asyncio takes a few loop turns from accept to
    # handler, an accept batch each turn; measured up to ~60 with batches of 16).
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 32
    reserve = open_now + 8 * _ACCEPT_BATCH + 32
    cap = min(requested, max(soft - reserve, 1)) if soft != resource.RLIM_INFINITY else requested
    if cap < requested:
        logger.warning("--max-connections %d lowered to %d: the descriptor limit (ulimit -n) is %d", requested, cap, soft)
    return cap


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
    limits: ServerLimits | None = None,
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
    position_limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_model_len is None:
        max_model_len = position_limit
    elif max_model_len < 1 or (position_limit is not None and max_model_len > position_limit):
        raise ValueError(f"--max-model-len {max_model_len} must be in [1, {position_limit}] (the model's "
                         "max_position_embeddings)")
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_token_ids = set(generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else [])
    teacher = InProcessTeacher(model, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch)
    service = TeacherService(
        teacher, model_name=served_model_name or model_path, tokenizer=tokenizer, max_model_len=max_model_len,
        limits=limits, eos_token_ids=eos_token_ids,
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
    server._started.wait(timeout=30)
    return server, thread


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = ServerLimits()
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help="teacher checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (printed at start)")
    parser.add_argument("--dtype", default="auto", help="'auto' (checkpoint dtype) or a torch dtype name such as bfloat16")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="cap on padded tokens per forward pass")
    parser.add_argument(
        "--api-key-env", default=None, metavar="ENV_VAR", help="require 'Authorization: Bearer $ENV_VAR' on every route but /health"
    )
    parser.add_argument("--served-model-name", default=None, help="name for /v1/models and the 'model' field (default: --model)")
    parser.add_argument(
        "--max-model-len", type=int, default=None,
        help="context length in tokens, as vLLM's (default: the model's max_position_embeddings)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the checkpoint")
    limits = parser.add_argument_group("limits against hostile or runaway clients")
    limits.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections (kept below ulimit -n); at the cap the oldest idle one is closed")
    limits.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout_s,
                        help="seconds a connection may wait for its next request")
    limits.add_argument("--request-timeout", type=float, default=defaults.request_read_timeout_s,
                        help="seconds from a request's first byte to its last")
    limits.add_argument("--max-request-bytes", type=int, default=defaults.max_body_bytes, help="request body cap")
    limits.add_argument("--max-request-tokens", type=int, default=defaults.max_request_tokens,
                        help="prompt tokens per request; also the characters of text a request may hold")
    limits.add_argument("--max-buffered-request-bytes", type=int, default=defaults.max_buffered_body_bytes,
                        help=f"request bodies over {SMALL_BODY_BYTES // 1024} KiB held at once, all clients together "
                        "(503 above it)")
    limits.add_argument("--max-response-bytes", type=int, default=defaults.max_response_bytes,
                        help="response body cap (413 above it)")


def _limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_connections=args.max_connections,
        keep_alive_timeout_s=args.keep_alive_timeout,
        request_read_timeout_s=args.request_timeout,
        max_body_bytes=args.max_request_bytes,
        max_request_tokens=args.max_request_tokens,
        max_response_bytes=args.max_response_bytes,
        max_buffered_body_bytes=args.max_buffered_request_bytes,
    )


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
            limits=_limits_from_args(args),
        )
    except (ValueError, OSError) as exc:
        print(f"scope serve-teacher: {exc}", flush=True)
        return 2

    signal.signal(signal.SIGTERM, lambda signum, frame: server.request_shutdown())
    # Parsed by tests and scripts that start the server with --port 0.
    print(f"scope serve-teacher: serving {server.service.model_name!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
