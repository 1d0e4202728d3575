"""``scope serve-teacher``: a faithful subset of vLLM's OpenAI-compatible server, for scoring.

Three files, by question:

* what a route accepts and answers (``/v1/completions``, ``/v1/models``, ``/tokenize``,
  ``/detokenize``, ``/version``, ``/health``), as vLLM does: :mod:`scope_opd.teachers.serve_api`;
* how connections, requests and answers are bounded (timeouts, caps, eviction, the API key,
  the worker pool): :mod:`scope_opd.teachers.serve_http`;
* the command line and loading the teacher: this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from .in_process import InProcessTeacher, load_teacher_model
from .serve_api import MAX_PROMPT_LOGPROBS, NAN_MESSAGE, TeacherService
from .serve_http import SMALL_BODY_BYTES, RequestError, ServerLimits, TeacherHTTPServer

__all__ = ["NAN_MESSAGE", "RequestError", "ServerLimits", "TeacherHTTPServer", "TeacherService", "configure_parser",
           "main", "start_server"]

# One logger for the whole server, whichever file a record comes from (operators filter on this name).
logger = logging.getLogger("scope_opd.teachers.serve")


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
    max_logprobs: int = MAX_PROMPT_LOGPROBS,
) -> TeacherHTTPServer:
    """Load the teacher (and its tokenizer, if the checkpoint has one) and bind the server; not yet serving."""
    if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be an integer >= 0, got {max_logprobs!r}")
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
        limits=limits, eos_token_ids=eos_token_ids, max_logprobs=max_logprobs,
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
    parser.add_argument("--max-logprobs", type=int, default=MAX_PROMPT_LOGPROBS,
                        help=f"largest prompt_logprobs a request may ask for, like vLLM's --max-logprobs (default "
                             f"{MAX_PROMPT_LOGPROBS}); opd_loss='topk_*' needs teacher_top_k <= this")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the checkpoint")
    limits = parser.add_argument_group("limits against hostile or runaway clients")
    limits.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections (kept below ulimit -n); at the cap the oldest idle one (or one whose client "
                        "does not read its answer) is closed")
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
            max_logprobs=args.max_logprobs,
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
