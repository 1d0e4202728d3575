"""HTTP/1.1 for ``scope serve-teacher``: connections, requests on the wire, and the limits on both.

How the server stays up under hostile or runaway clients lives here; what each route accepts and
answers (vLLM's API) lives in :mod:`scope_opd.teachers.serve_api`, and the command line in
:mod:`scope_opd.teachers.serve`.

Hostile load: the HTTP layer is an asyncio server (stdlib) with a listen backlog
of 1024, a connection cap kept below the process's descriptor limit (a new
connection at the cap evicts the oldest connection that has sat idle, has been
sending one request for over 1 s, or whose client has not taken its answer for
1 s), a keep-alive idle timeout and a deadline for each request's headers
and body, strict HTTP/1.1 header parsing (one ASCII ``Content-Length``, no
``Transfer-Encoding``), the route and the key checked before the body is read,
bare-LF line endings refused with a 400, caps on body bytes, JSON values, text
characters, prompt tokens and response bytes per request on every route
(413/400 before any scoring or tokenizing where the size is known; ``stream``
and a large ``n`` included), a budget for the large request bodies held at once,
and client disconnects logged at most once a minute. Request handling runs
on a bounded thread pool whose threads, when all are busy, go round robin to
the waiting client addresses (a lone client uses them all); one worker thread
owns the model and batches the rows that arrive together.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import math
import os
import re
import resource
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .serve_api import TeacherService

__all__ = ["RequestError", "ServerLimits", "TeacherHTTPServer", "response_too_large"]

# One logger for the whole server, whichever file a record comes from (operators filter on this name).
logger = logging.getLogger("scope_opd.teachers.serve")

# Bodies up to this size never wait for the buffered-body budget: at most max_connections x this.
SMALL_BODY_BYTES = 64 * 1024
# JSON values a body may hold beyond --max-request-tokens (the token ids): keys, flags and up to
# 1024 prompt lists (vLLM's cap on prompts per request), 4 x 1024 + 4096.
_JSON_VALUES_SLACK = 8192


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


def response_too_large(budget: int) -> RequestError:
    """The 413 for an answer over ``--max-response-bytes`` (every route)."""
    return RequestError(
        413, f"the answer is over this server's --max-response-bytes {budget}; send fewer tokens per request",
        error_type="PayloadTooLarge", param="prompt",
    )


_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
# Routes that answer without the key when one is set: a liveness probe carries no data.
_OPEN_ROUTES = frozenset({"/health"})
# A JSON string, escapes included: removed before counting the values a body holds. Written so that
# every match attempt succeeds (an unterminated string runs to the end of the body) and never backtracks
# (possessive runs): the earlier '"(?:[^"\\]|\\.)*"' failed on an unterminated string and was retried
# from each later quote, quadratic in a body of escaped quotes ('"\\"\\"...'), all under the GIL:
# a 60 KB body froze every route for ~30 s. This one is linear: ~0.6 s for 32 MiB.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)


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


class _FairExecutor:
    """Worker threads that take requests round robin among client addresses.

    Work-conserving: a lone client uses every thread (its throughput is the pool's). Requests queue
    per client address, and each thread that frees up takes the next one of the next address in
    turn, itself (no trip through the event loop): a client that queued a hundred requests delays
    another client's request by the requests already running, not by its whole queue.
    """

    def __init__(self, threads: int) -> None:
        self._ready = threading.Condition()
        self._waiting: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"teacher-http_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, client: str, function: Callable, *args) -> Future:
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("teacher server is shutting down")
            self._waiting.setdefault(client, collections.deque()).append((future, function, args))
            self._ready.notify()
        return future

    def shutdown(self) -> None:
        with self._ready:
            self._stopped = True
            for queue in self._waiting.values():
                for future, _, _ in queue:
                    future.cancel()
            self._waiting.clear()
            self._ready.notify_all()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                client, queue = self._waiting.popitem(last=False)
                future, function, args = queue.popleft()
                if queue:
                    self._waiting[client] = queue  # to the back of the round
            if not future.set_running_or_notify_cancel():
                continue  # the connection went away while it waited
            try:
                result = function(*args)
            except BaseException as exc:  # handed to the request's coroutine, which answers it
                future.set_exception(exc)
            else:
                future.set_result(result)


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
        self._pool = _FairExecutor(self.limits.worker_threads)
        self._connections: dict[_Connection, None] = {}  # insertion order: oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started, self._stopped = threading.Event(), threading.Event()
        self._log_disconnect = _RateLimitedLog("client connection dropped")
        self._log_loop_error = _RateLimitedLog("connection error")
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
        self._pool.shutdown()
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
                status, content_type, payload = await asyncio.wrap_future(
                    self._pool.submit(connection.client, handler, body))
                close = False
                if len(payload) > limits.max_response_bytes:  # every route: the completions path stops earlier
                    raise response_too_large(limits.max_response_bytes)
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
