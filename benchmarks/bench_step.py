"""Seconds per training step, GRPO vs OPD vs SCOPE (synchronous and overlapped), same batch, interleaved.

Prints a paper-Table-8-style breakdown (generation, old log-prob, reference log-prob,
reward, teacher scoring, update) from the trainer's own ``timing/*`` metrics. "teacher" is
the time the trainer waits for the teacher; with ``teacher_overlap`` the teacher also works
in the background while later chunks generate ("teacher (background)", not part of the
step). GRPO is measured twice: TRL's default (beta = 0: no reference model, and no separate
old-log-prob pass when steps are aligned) and the paper's (beta = 1e-4: a reference pass).

    python benchmarks/bench_step.py                         # CPU, toy models, in-process teacher
    python benchmarks/bench_step.py --teacher server        # teacher in its own `scope serve-teacher` process
    python benchmarks/bench_step.py --random-qwen2 0.5b --teacher server   # GPU: ~0.5B student, ~1.5B teacher, bf16
    python benchmarks/bench_step.py --model "$(bash scripts/smollm2.sh | tail -1)" --teacher server --threads 1
                                                            # a real checkpoint as student and teacher

One method's trainer is alive at a time: each (round, method) builds its trainer from the checkpoint on
disk (so every method starts every round from the same weights), trains, and is freed before the next;
the process's resident memory is watched (``--max-rss-gb``) and its peak printed, with the server's. The
teacher server is stopped however the script ends (return, exception, Ctrl-C, SIGTERM; it also dies
with this process on Linux). "wall" is the measured time of each optimiser step (device synchronised at
its start and end) beside the phase sum "total".

With ``--teacher server`` on a CPU machine the trainer and the teacher server get one torch
thread and one core each (``--pin``, default on), so the teacher's work runs beside the
trainer's rather than on top of it. Rounds interleave the methods (A B C A B C ...) so machine
noise hits all alike; the table shows medians over rounds after one warm-up round. The last
line reads ``SCOPE/GRPO step ratio: X (sync Y)``: X is SCOPE with the teacher overlapped and the
student-guided weights from the log-probs read during generation (``student_logprob_source:
sampler``), Y the synchronous default, each over TRL's default GRPO step (beta 0), measured side by
side in this run; ``scope(overlap)`` (forward log-probs) is in the table too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PHASES = ("generation", "old_logprob", "ref_logprob", "reward", "teacher", "update")
BACKGROUND = "teacher_overlapped"  # seconds the overlapped teacher worked beside the step (not part of it)
METHODS = {
    "grpo(beta=0)": dict(algorithm="grpo", beta=0.0),
    "grpo(beta=1e-4)": dict(algorithm="grpo", beta=1e-4),
    "opd": dict(algorithm="opd"),
    "scope(sync)": dict(algorithm="scope"),
    "scope(overlap)": dict(algorithm="scope", teacher_overlap=True),
    # The student-guided weights from the log-probs read while generate samples: no extra old-log-prob forward.
    "scope(overlap+sampler)": dict(algorithm="scope", teacher_overlap=True, student_logprob_source="sampler"),
}


def _die_with_parent():
    """In the server's child process: SIGKILL it when the benchmark dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_teacher_server(path: str, device: str, dtype: str, core: int | None, batch_size: int):
    """`scope serve-teacher` in its own process on 127.0.0.1 (one torch thread, pinned to ``core``): (process, url)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", path, "--host", "127.0.0.1",
               "--port", "0", "--device", device, "--dtype", dtype, "--batch-size", str(batch_size)]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"scope serve-teacher did not start (exit {proc.wait()}): {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def _peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a process, 0 where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryGuard:
    """Interrupts the main thread (KeyboardInterrupt: the server is still stopped) when RSS passes ``limit_bytes``."""

    def __init__(self, limit_bytes: int):
        import threading

        self.limit, self.exceeded = limit_bytes, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rss-guard", daemon=True)
        if limit_bytes > 0 and os.path.exists("/proc/self/status"):
            self._thread.start()

    def _watch(self):
        import _thread

        while not self._stop.wait(0.2):
            rss = _rss_bytes()
            if rss > self.limit:
                self.exceeded = rss
                _thread.interrupt_main()
                return

    def stop(self):
        self._stop.set()


class StepWallClock:
    """TrainerCallback: wall seconds of each optimiser step, the device synchronised at both ends."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.seconds, self._start = [], None

            def _now(self):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return time.perf_counter()

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = self._now()

            def on_step_end(self, args, state, control, **kwargs):
                self.seconds.append(self._now() - self._start)

        return _Clock()


RANDOM_SIZES = {  # (hidden, layers, heads, kv_heads, intermediate) roughly Qwen2-0.5B / 1.5B shaped
    "0.5b": ((896, 24, 14, 2, 4864), (1536, 28, 12, 2, 8960)),
    "tiny": ((64, 2, 4, 2, 128), (128, 2, 4, 2, 256)),
}


def build_random_pair(size: str, root: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = {}
    for role, (hidden, layers, heads, kv, inter) in zip(("student", "teacher"), RANDOM_SIZES[size]):
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
        torch.manual_seed(0 if role == "student" else 1)
        model = Qwen2ForCausalLM(config).to(dtype)
        model.save_pretrained(f"{root}/{role}")
        tokenizer.save_pretrained(f"{root}/{role}")
        paths[role] = f"{root}/{role}"
    return paths


def build_random_like(source: str, root: str):
    """A random student (seed 0) and teacher (seed 1) with ``source``'s config and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    paths = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(f"{root}/{role}")
        tokenizer.save_pretrained(f"{root}/{role}")
        paths[role] = f"{root}/{role}"
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="student path (default: toy student)")
    parser.add_argument("--teacher-path", help="teacher path (default: toy teacher)")
    parser.add_argument("--random-like", metavar="DIR",
                        help="randomly initialised student and teacher of DIR's config.json, with DIR's tokenizer (e.g. "
                        "SmolLM2-135M's shape, whose weights are too big to carry to a GPU machine)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of the methods to run (default: all; ratios need their methods)")
    parser.add_argument("--model", help="a checkpoint (directory or hub id) used as both student and teacher")
    parser.add_argument("--max-rss-gb", type=float, default=10.0,
                        help="stop (and stop the server) if this process's resident memory passes this (0: no limit)")
    parser.add_argument("--random-qwen2", choices=sorted(RANDOM_SIZES), help="use randomly initialised Qwen2-shaped models")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 with --teacher server)")
    parser.add_argument("--teacher", choices=("in-process", "server"), default="in-process",
                        help="in-process: the teacher model in the trainer's process; server: `scope serve-teacher` on 127.0.0.1")
    parser.add_argument("--chunk-groups", type=int, default=0,
                        help="scope(overlap): 0 (default) sends each row to the teacher when it emits EOS inside one "
                        "generate call; k > 0 generates k prompt groups at a time (the vLLM way)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="CPU with --teacher server: do not pin the trainer and the server to one core each")
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose among {list(METHODS)}")
    for name in [m for m in METHODS if m not in args.methods.split(",")]:
        del METHODS[name]
    import signal

    # SIGTERM (timeout, kill) runs the finally blocks too, so the teacher server is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cuda = torch.cuda.is_available()
    pin = args.pin and args.teacher == "server" and not cuda and len(os.sched_getaffinity(0)) >= 2
    if args.teacher == "server" and args.threads is None and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = sorted(os.sched_getaffinity(0))
    if pin:
        os.sched_setaffinity(0, {cores[0]})
    chunk_groups = args.chunk_groups

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from scope_opd.toy.task import toy_dataset
    from scope_opd.trainer import SCOPEConfig, SCOPETrainer

    # The presets' precision: float32 weights (the optimiser's master copy), bf16 compute on CUDA (autocast).
    dtype = torch.float32
    workdir = tempfile.mkdtemp(prefix="bench_step_")
    if args.random_qwen2:
        paths = build_random_pair(args.random_qwen2, workdir, dtype)
    elif args.random_like:
        paths = build_random_like(args.random_like, workdir)
    elif args.model:
        paths = {"student": args.model, "teacher": args.model}
    elif args.student and args.teacher_path:
        paths = {"student": args.student, "teacher": args.teacher_path}
    else:
        from scope_opd.toy.models import ensure_toy_models

        toy = ensure_toy_models()
        paths = {"student": str(toy.student), "teacher": str(toy.teacher)}
    prompts = toy_dataset("train", args.prompts * (args.rounds + 1) * args.steps_per_round * 4, seed=0)
    dataset = Dataset.from_dict({"prompt": prompts["prompt"], "answer": prompts["answer"]})
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    server = None
    if args.teacher == "server":
        server, url = start_teacher_server(paths["teacher"], "cuda" if cuda else "cpu", "bfloat16" if cuda else "float32",
                                           cores[1] if pin else None, batch_size=8)

    def build_trainer(name):
        overrides = dict(METHODS[name])
        if overrides.get("teacher_overlap"):
            overrides["rollout_chunk_groups"] = chunk_groups
        uses_teacher = overrides["algorithm"] != "grpo"
        teacher = {}
        if uses_teacher and server is not None:
            teacher = dict(teacher_server_url=url, teacher_tokenizer=paths["teacher"])
        elif uses_teacher:
            teacher = dict(teacher_model=paths["teacher"], teacher_dtype="bfloat16" if cuda else "float32")
        config = SCOPEConfig(
            output_dir=f"{workdir}/{name}", per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations, max_completion_length=args.max_completion_length,
            max_steps=args.steps_per_round, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=not cuda, bf16=cuda, seed=0, verifier="exact", disable_tqdm=True,
            # gradient_checkpointing: TRL's default (True), as in the presets.
            **teacher, **overrides,
        )
        # From the checkpoint on disk every time: every method starts every round from the same weights.
        model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=dtype)
        trainer = SCOPETrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the table below is the output
        return trainer

    per_method = {name: [] for name in METHODS}
    guard = MemoryGuard(int(args.max_rss_gb * 2**30))
    server_peak = 0
    try:
        run_rounds(args, build_trainer, per_method)
    except KeyboardInterrupt:
        if guard.exceeded:
            raise SystemExit(f"bench_step: resident memory {guard.exceeded / 2**30:.2f} GiB passed --max-rss-gb "
                             f"{args.max_rss_gb}; stopped") from None
        raise
    finally:
        guard.stop()
        if server is not None:
            server_peak = _peak_rss_bytes(server.pid)
            server.kill()
            server.wait()
    report(args, per_method, paths, dtype, cuda, chunk_groups, pin, server_peak)


def run_rounds(args, build_trainer, per_method):
    import gc

    for round_index in range(args.rounds + 1):
        for name in METHODS:  # interleaved: A B C A B C ..., one trainer alive at a time
            trainer = build_trainer(name)
            clock = StepWallClock()
            trainer.add_callback(clock)
            trainer.train()
            history = list(trainer.state.log_history)
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if round_index == 0:
                continue  # warm-up
            steps = [h for h in history if "timing/update" in h]
            for h, wall in zip(steps, clock.seconds):
                row = {phase: h.get(f"timing/{phase}", 0.0) for phase in PHASES}
                row["total"] = sum(row.values())
                row["wall"] = wall
                # Logged once per generation batch (= per step here), absent when nothing ran in the background.
                row[BACKGROUND] = h.get(f"timing/{BACKGROUND}", 0.0)
                per_method[name].append(row)


def report(args, per_method, paths, dtype, cuda, chunk_groups, pin, server_peak=0):
    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    where = "in-process" if args.teacher == "in-process" else "server (scope serve-teacher, own process" + (
        ", trainer and server pinned to one core each)" if pin else ")")
    print(f"machine: {device}, torch {torch.__version__}, trainer threads {torch.get_num_threads()}, dtype {dtype}")
    print(f"batch: {args.prompts} prompts x {args.generations} rollouts, max {args.max_completion_length} new tokens; "
          f"student {paths['student']}, teacher {paths['teacher']} ({where}); scope(overlap): "
          f"{'rows sent at EOS' if not chunk_groups else f'chunks of {chunk_groups} prompt groups'}; median of {args.rounds} rounds x {args.steps_per_round} steps")
    keys = (*PHASES, "total", "wall", BACKGROUND)
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in keys} for name, rows in per_method.items()}
    spread = {name: (min(r["total"] for r in rows), max(r["total"] for r in rows)) for name, rows in per_method.items()}
    print("| phase (s/step) | " + " | ".join(METHODS) + " |")
    print("|" + "---|" * (len(METHODS) + 1))
    labels = {BACKGROUND: "teacher (background)", "total": "total (phase sum)", "wall": "wall (measured)"}
    for key in keys:
        print(f"| {labels.get(key, key)} | " + " | ".join(f"{medians[m][key]:.3f}" for m in METHODS) + " |")
    print("| total min-max | " + " | ".join(f"{spread[m][0]:.3f}-{spread[m][1]:.3f}" for m in METHODS) + " |")
    ratio_methods = ("grpo(beta=0)", "grpo(beta=1e-4)", "opd", "scope(sync)", "scope(overlap)", "scope(overlap+sampler)")
    if all(m in METHODS for m in ratio_methods):
        grpo = medians["grpo(beta=0)"]["total"]
        sync, overlap, opd = medians["scope(sync)"], medians["scope(overlap+sampler)"], medians["opd"]
        forward_overlap = medians["scope(overlap)"]
        print(f"(SCOPE sync step - teacher) / grpo(beta=0) step = {(sync['total'] - sync['teacher']) / grpo:.3f}")
        print(f"SCOPE/grpo(beta=1e-4) step ratio: {overlap['total'] / medians['grpo(beta=1e-4)']['total']:.3f} "
              f"(sync {sync['total'] / medians['grpo(beta=1e-4)']['total']:.3f})")
        print(f"teacher share of a synchronous SCOPE step = {sync['teacher'] / sync['total']:.1%} (paper Table 8: 31%)")
        print(f"OPD/grpo(beta=0) step ratio = {opd['total'] / grpo:.3f}")
        print(f"scope(overlap) with the forward's log-probs / grpo(beta=0) = {forward_overlap['total'] / grpo:.3f}")
        fastest = {name: spread[name][0] for name in METHODS}  # least disturbed by other load on a shared machine
        print(f"fastest steps: SCOPE/GRPO {fastest['scope(overlap+sampler)'] / fastest['grpo(beta=0)']:.3f} "
              f"(sync {fastest['scope(sync)'] / fastest['grpo(beta=0)']:.3f})")
    peak = f"trainer process {_peak_rss_bytes() / 2**30:.2f} GiB resident"
    if cuda:
        peak += f", CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated"
    if server_peak:
        peak += f", teacher server {server_peak / 2**30:.2f} GiB resident"
    print(f"peak memory: {peak}")
    wall = {name: medians[name]["wall"] for name in METHODS}
    if not all(m in METHODS for m in ("grpo(beta=0)", "scope(sync)", "scope(overlap+sampler)")):
        print("measured wall time per step: " + ", ".join(f"{m} {wall[m]:.3f} s" for m in METHODS))
        return
    print(f"measured wall time: SCOPE/GRPO {wall['scope(overlap+sampler)'] / wall['grpo(beta=0)']:.3f} "
          f"(sync {wall['scope(sync)'] / wall['grpo(beta=0)']:.3f})")
    # X: overlapped teacher + sampler log-probs (SCOPE's fastest on-policy configuration); Y: the synchronous default.
    grpo = medians["grpo(beta=0)"]["total"]
    print(f"SCOPE/GRPO step ratio: {medians['scope(overlap+sampler)']['total'] / grpo:.3f} "
          f"(sync {medians['scope(sync)']['total'] / grpo:.3f})")


if __name__ == "__main__":
    main()
