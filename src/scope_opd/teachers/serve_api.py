"""vLLM's OpenAI-compatible API as ``scope serve-teacher`` serves it: what each route accepts and answers.

Serves a `transformers` teacher through :class:`InProcessTeacher`, so
:class:`~scope_opd.teachers.ServerTeacher` can be tested on a CPU and used
without vLLM. Every request it accepts is answered as vLLM (0.31/0.32) answers
it, and every request vLLM refuses it refuses with vLLM's status and error
body ``{"error": {"message", "type", "param", "code"}}``; requests that need a
generator it does not have get an honest 400 that says so. No HTTP here: the
connections and the limits on them are :mod:`scope_opd.teachers.serve_http`.

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
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from .in_process import InProcessTeacher, TokenScores
from .server_client import VLLM_NEG_INF_LOGPROB
from .serve_http import RequestError, ServerLimits, response_too_large

__all__ = ["MAX_PROMPTS_PER_REQUEST", "MAX_PROMPT_LOGPROBS", "NAN_MESSAGE", "TeacherService"]

# One logger for the whole server, whichever file a record comes from (operators filter on this name).
logger = logging.getLogger("scope_opd.teachers.serve")

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
        max_logprobs: the largest ``prompt_logprobs`` a request may ask for (vLLM's ``--max-logprobs``,
            default 20); more is refused with vLLM's message.
    """

    def __init__(
        self, teacher: InProcessTeacher, *, model_name: str, tokenizer=None, max_model_len: int | None = None,
        limits: ServerLimits | None = None, eos_token_ids: set[int] | None = None,
        max_logprobs: int = MAX_PROMPT_LOGPROBS,
    ) -> None:
        if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {max_logprobs!r}")
        self.max_logprobs = max_logprobs
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
            if top_k == -1 or top_k > self.max_logprobs:
                # vLLM reads -1 as the vocabulary size before comparing with --max-logprobs.
                requested = self.teacher.vocab_size if top_k == -1 else top_k
                hint = " (`prompt_logprobs` -1 asks for the full vocabulary)" if top_k == -1 else ""
                raise RequestError(
                    400,
                    f"Requested prompt logprobs of {requested}, which is greater than max allowed: "
                    f"{self.max_logprobs}{hint}",
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
        return response_too_large(budget)

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
