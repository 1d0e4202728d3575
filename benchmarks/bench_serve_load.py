"""Hostile load against a teacher server (``scope serve-teacher`` or vLLM), loopback only.

Phases, each bounded in connections and seconds:

1. ``quiet``: a well-behaved client (a fresh connection per request, one 64-token
   row, ``prompt_logprobs 0``) sends ``--probes`` requests; latency p50 / max.
2. ``idle``: an attacker opens ``--idle`` TCP connections that never send a byte
   (reopening any the server closes) while the same client probes again.
3. ``slow``: ``--slow`` connections send one header byte a second (slowloris).
4. ``burst``: ``--burst`` requests at once, each on its own connection; how many
   were answered, reset or timed out.
5. ``large``: one ~0.8 MB request (``--large-tokens`` token ids in 512-token rows,
   ``prompt_logprobs 20``): status, response bytes, and the server's peak resident
   memory above its idle level (the whole process tree, sampled every 10 ms).

With ``--launch ours|vllm`` the script starts the server itself under an
``RLIMIT_NOFILE`` of ``--nofile`` (so ``--idle`` above it exhausts its descriptors,
as in the report) on a tiny local Qwen2 it builds (or ``--model``), and stops it
at the end. With ``--url URL --pid PID`` it measures a server you started.

    python benchmarks/bench_serve_load.py --launch ours
    python benchmarks/bench_serve_load.py --launch vllm --vllm-python ~/.cache/scope-opd/venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

PROBE_ROW = [5 + (i % 40) for i in range(64)]


def build_tiny_model(directory: str) -> str:
    """A random tiny Qwen2 (head size 32, as vLLM's CPU attention needs) with the toy char tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, model: str, nofile: int, vllm_python: str, log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kind == "ours":
        command = [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", model, "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", "float32", "--device", "cpu"]
    else:
        env.update(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1")
        command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
                   "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024"]

    def limit_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_descriptors)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # vLLM's engine start is 20-45 s on an idle 2-core machine, minutes on a busy one
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{kind} server exited with {process.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{kind} server not healthy after 600 s:\n{open(log_path).read()[-3000:]}")


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def probe(url: str, count: int, timeout_s: float) -> dict:
    """Sequential well-behaved requests, each on a fresh connection (a new client)."""
    latencies, failures = [], []
    body = {"prompt": PROBE_ROW, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    for _ in range(count):
        start = time.monotonic()
        try:
            with requests.Session() as session:
                response = session.post(url + "/v1/completions", json=body, timeout=timeout_s)
            if response.status_code == 200 and len(response.json()["choices"][0]["prompt_logprobs"]) == len(PROBE_ROW):
                latencies.append(time.monotonic() - start)
            else:
                failures.append(f"HTTP {response.status_code}")
        except requests.RequestException as exc:
            failures.append(type(exc).__name__)
    return {
        "answered": len(latencies),
        "failed": len(failures),
        "failures": sorted(set(failures)),
        "p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "max_s": round(max(latencies), 4) if latencies else None,
    }


class Attacker:
    """Holds ``count`` connections open; ``slow`` ones trickle a header byte a second. Reopens closed ones."""

    def __init__(self, url: str, count: int, slow: bool) -> None:
        parts = urllib.parse.urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.count, self.slow = count, slow
        self.sockets: list[socket.socket] = []
        self.reopened = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(self.address, timeout=0.5)
        except OSError:
            self.refused += 1
            return None
        s.setblocking(False)
        return s

    def __enter__(self):
        failures_in_a_row = 0
        while len(self.sockets) < self.count and failures_in_a_row < 3:  # 3 refusals: the server is saturated
            s = self._open()
            failures_in_a_row = 0 if s is not None else failures_in_a_row + 1
            if s is not None:
                self.sockets.append(s)
        time.sleep(1.0)  # let the server accept what it will
        self._thread.start()
        return self

    def _run(self) -> None:
        header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000
        sent = 0
        while not self._stop.wait(1.0):
            for i, s in enumerate(self.sockets):
                try:
                    if self.slow:
                        s.send(header[sent % len(header) : sent % len(header) + 1])
                    elif s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        raise ConnectionResetError  # closed by the server: an attacker reopens it
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self.sockets[i] = self._open() or s
                    self.reopened += 1
            sent += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.sockets:
            s.close()


def burst(url: str, count: int, timeout_s: float) -> dict:
    body = {"prompt": PROBE_ROW[:16], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}

    def one(_):
        try:
            with requests.Session() as session:
                return f"HTTP {session.post(url + '/v1/completions', json=body, timeout=timeout_s).status_code}"
        except requests.ConnectionError as exc:
            return "reset" if "reset" in str(exc).lower() or "aborted" in str(exc).lower() else "ConnectionError"
        except requests.RequestException as exc:
            return type(exc).__name__

    start = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(one, range(count)))
    return {"wall_s": round(time.monotonic() - start, 2), **{k: outcomes.count(k) for k in sorted(set(outcomes))}}


def large_request(url: str, process: psutil.Process | None, tokens: int, timeout_s: float) -> dict:
    rows = [[5 + (i * 7 + j) % 40 for j in range(512)] for i in range(tokens // 512)]
    body = json.dumps({"prompt": rows, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 20}).encode()
    peak, stop = [0], threading.Event()
    idle_rss = tree_rss(process) if process else 0

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], tree_rss(process))

    sampler = threading.Thread(target=sample, daemon=True)
    if process:
        sampler.start()
    start = time.monotonic()
    try:
        response = requests.post(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"},
                                 timeout=timeout_s)
        outcome = {"status": response.status_code, "response_bytes": len(response.content)}
        if response.status_code != 200:
            outcome["error"] = response.text[:200]
    except requests.RequestException as exc:
        outcome = {"status": type(exc).__name__}
    outcome["seconds"] = round(time.monotonic() - start, 2)
    stop.set()
    if process:
        sampler.join()
        outcome["peak_rss_above_idle_mb"] = round((peak[0] - idle_rss) / 2**20, 1)
    return {"request_bytes": len(body), **outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--launch", choices=["ours", "vllm"], help="start this server on a tiny local model")
    where.add_argument("--url", help="a server already running on 127.0.0.1")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for memory and CPU")
    parser.add_argument("--model", default=None, help="with --launch: model directory (default: build a tiny Qwen2)")
    parser.add_argument("--vllm-python", default=os.path.expanduser("~/.cache/scope-opd/venv-vllm/bin/python"))
    parser.add_argument("--nofile", type=int, default=1024, help="with --launch: the server's RLIMIT_NOFILE")
    parser.add_argument("--idle", type=int, default=1100, help="idle attacker connections (at most 5000)")
    parser.add_argument("--slow", type=int, default=200, help="slowloris attacker connections (at most 5000)")
    parser.add_argument("--burst", type=int, default=200, help="concurrent requests (at most 1000)")
    parser.add_argument("--probes", type=int, default=10, help="well-behaved requests per phase")
    parser.add_argument("--probe-timeout", type=float, default=10.0, help="seconds a well-behaved client waits")
    parser.add_argument("--large-tokens", type=int, default=160 * 512, help="token ids in the large request")
    parser.add_argument("--phases", default="quiet,idle,slow,burst,large")
    args = parser.parse_args()
    for name in ("idle", "slow"):
        setattr(args, name, min(getattr(args, name), 5000))
    args.burst = min(args.burst, 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + args.slow + args.burst + 256)), hard))

    server_process = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.launch:
            model = args.model or build_tiny_model(os.path.join(tmp, "model"))
            server_process, url = launch(args.launch, model, args.nofile, args.vllm_python, os.path.join(tmp, "server.log"))
            pid = server_process.pid
        else:
            url, pid = args.url.rstrip("/"), args.pid
            if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
                raise SystemExit("--url must be on 127.0.0.1 (loopback only)")
        process = psutil.Process(pid) if pid else None
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
              f"{platform.python_version()}; server {args.launch or url}, nofile {args.nofile if args.launch else '?'}")
        results = {}
        try:
            for phase in args.phases.split(","):
                cpu_before, wall_before = (tree_cpu_seconds(process) if process else 0.0), time.monotonic()
                if phase == "quiet":
                    results[phase] = probe(url, args.probes, args.probe_timeout)
                elif phase in ("idle", "slow"):
                    with Attacker(url, getattr(args, phase), slow=phase == "slow") as attacker:
                        results[phase] = probe(url, args.probes, args.probe_timeout)
                        results[phase].update(attacker_connections=len(attacker.sockets), connect_timeouts=attacker.refused,
                                              reopened=attacker.reopened)
                    time.sleep(2)  # let the server drop the attacker's connections before the next phase
                elif phase == "burst":
                    results[phase] = burst(url, args.burst, 60)
                elif phase == "large":
                    results[phase] = large_request(url, process, args.large_tokens, 120)
                else:
                    raise SystemExit(f"unknown phase {phase!r}")
                if process:
                    cpu = tree_cpu_seconds(process) - cpu_before
                    results[phase]["server_cpu_pct"] = round(100 * cpu / (time.monotonic() - wall_before), 1)
                print(f"{phase}: {json.dumps(results[phase])}", flush=True)
        finally:
            if server_process is not None:
                server_process.terminate()
                try:
                    server_process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server_process.kill()


if __name__ == "__main__":
    main()
