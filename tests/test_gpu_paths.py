"""GPU-path mechanisms shown on CPU (issue 21): ZeRO teacher loading, fp32 master weights, synchronised phase
timings, the overlap thread's device, and the GPU check's wheel list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import free_port
from test_trainer import dataset, has_digit_reward, make_args

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


# ---------------------------------------------------------------- 21.1: the teacher under DeepSpeed ZeRO


@pytest.mark.parametrize("stage", [3, 2])
def test_teacher_loads_under_a_registered_zero_config_as_trls_reference_model(tmp_path, tiny_pair_dir, stage):
    """A real DeepSpeed ZeRO config registered by TrainingArguments(deepspeed=...) (one CPU process, gloo):
    under ZeRO-3 the trainer's teacher loads with no device_map, so zero.Init partitions every parameter while
    it loads (transformers refuses any device_map there), and a SCOPETrainer wraps it in a DeepSpeedEngine and
    scores with it; KD's teacher (an explicit device) loads whole. ZeRO-2 runs the teacher unsharded (TRL's
    prepare_deepspeed uses stage 0 for it), so it does not count as sharded (synced_ranks stays off)."""
    pytest.importorskip("deepspeed", reason="needs DeepSpeed: pip install --no-build-isolation deepspeed==0.18.9 "
                                            "(no ops compiled at install; see docs/gpu.md)")
    out = tmp_path / "zero"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "dist_scripts" / "zero_teacher_load.py"),
                           tiny_pair_dir["student"], tiny_pair_dir["teacher"], str(out), str(stage)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert result["distributed_type"].endswith("DEEPSPEED") and result["zero3_registered"] == (stage == 3)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"])
    full_shapes = {n: list(p.shape) for n, p in teacher.named_parameters()}
    assert {p["name"]: p["ds_shape"] for p in result["load"]} == full_shapes
    if stage == 3:  # partitioned at load: zero.Init left an empty local tensor and the full shape in ds_shape
        assert all(p["ds_status"].endswith("NOT_AVAILABLE") and p["numel"] == 0 for p in result["load"])
    else:
        assert all(p["ds_status"] == "None" and p["numel"] > 0 for p in result["load"])
    assert result["load_frozen"]
    assert {p["name"]: p["shape"] for p in result["replica"]} == full_shapes
    assert not any(p["has_ds_status"] for p in result["replica"])
    assert result["zero3_registered_after_replica"] == (stage == 3)
    trainer = result["trainer"]
    assert trainer["teacher_wrapper"] == "DeepSpeedEngine" and trainer["sharded"] == (stage == 3)
    assert trainer["synced_ranks"] is False  # one process: nothing to pad for
    # The wrapped (and, under ZeRO-3, gathered on the fly) teacher scores exactly as the plain model.
    with torch.no_grad():
        logits = teacher(torch.tensor([[5, 6, 7, 8]])).logits[0].float().log_softmax(-1)
    expected = [logits[2, 8].item(), logits[3, 9].item()]  # input 5 6 7 8: position 2 predicts 8, 3 predicts 9
    assert trainer["scores"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- 21.2: fp32 master weights, bf16 compute


def _preset_student(path, preset):
    """The student as `scope train` loads it with this preset's `dtype` (train_cli: getattr(torch, dtype))."""
    config = yaml.safe_load(preset.read_text())
    dtype = config.get("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype)), config


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_paper_presets_keep_fp32_master_weights_and_bf16_compute(tmp_path, tiny_pair_dir, preset):
    """One real SCOPE step with the preset's student dtype, bf16 flag, lr and weight decay: parameters and Adam
    states are float32, the forward runs in bf16, and every weight moves at lr 5e-5 (in bf16, |update| ~ 5e-5 is
    below half an ulp of most weights and rounds away; weight decay alone, 5e-7 x w, always does)."""
    student, config = _preset_student(tiny_pair_dir["student"], preset)
    assert config["bf16"] is True and config["learning_rate"] == 5e-5 and config["weight_decay"] == 0.01
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = make_args(tmp_path, bf16=config["bf16"], learning_rate=config["learning_rate"],
                     weight_decay=config["weight_decay"], lr_scheduler_type="constant", teacher_model=tiny_pair_dir["teacher"])
    compute_dtypes = []
    hook = student.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, inputs, output: compute_dtypes.append(output.dtype) if torch.is_grad_enabled() else None)
    from scope_opd.trainer import SCOPETrainer

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no fp32 master copy" warning either
        warnings.filterwarnings("ignore", message="(?!the trainable parameters)")
        trainer = SCOPETrainer(student, reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
                               processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))
    trainer.train()
    hook.remove()
    assert compute_dtypes and set(compute_dtypes) == {torch.bfloat16}
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    states = [s for s in trainer.optimizer.state.values() if s]
    assert states and {t.dtype for s in states for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    for name, p in params.items():  # and no element stayed put
        assert (p.detach() != before[name]).all(), f"{name}: {(p.detach() == before[name]).sum().item()} weights did not move"


def test_a_bf16_student_without_master_copy_warns_with_the_fix(tmp_path, tiny_pair_dir):
    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"], dtype=torch.bfloat16)
    from scope_opd.trainer import SCOPETrainer

    with pytest.warns(UserWarning, match=r"trainable parameters are bfloat16 and no fp32 master copy.*dtype: float32"):
        SCOPETrainer(student, reward_funcs=[has_digit_reward], args=make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]),
                     train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))


# ---------------------------------------------------------------- 21.4: the overlap thread's device


class _PerThreadDevice:
    """Stand-in for ``torch.cuda``'s current-device query, per thread as CUDA's is.

    This is the one mock here, and why: the current device is per-thread state that only an accelerator runtime
    keeps (a new thread starts on device 0); a CPU build has no such state to read, so on CPU the only way to see
    which device the scoring thread made current is to record the call that sets it.
    """

    def __init__(self):
        import threading

        self._local = threading.local()

    def set_device(self, device):
        self._local.index = torch.device(device).index if not isinstance(device, int) else device

    def current_device(self):
        return getattr(self._local, "index", 0)  # what a fresh CUDA thread reports


def test_the_overlap_thread_runs_on_the_teachers_device(monkeypatch):
    from scope_opd.teachers.overlap import TeacherPrefetch

    cuda = _PerThreadDevice()
    real_get_device_module = torch.get_device_module
    monkeypatch.setattr(torch, "get_device_module", lambda kind=None: cuda if str(kind) == "cuda" else real_get_device_module(kind))
    seen = []

    class TeacherOnRank3:
        device = torch.device("cuda", 3)

        def score(self, prompt_ids, completion_ids):
            seen.append(cuda.current_device())
            return [torch.zeros(len(c)) for c in completion_ids]

    prefetch = TeacherPrefetch(TeacherOnRank3())
    prefetch.submit([0, 1], [[1, 2], [3]], [[4], [5, 6]])
    scores = prefetch.scores([0, 1], [[1, 2], [3]], [[4], [5, 6]])
    prefetch.close()
    assert [s.shape[0] for s in scores] == [1, 2]
    assert seen == [3]  # the background thread's current device is the teacher's
    assert cuda.current_device() == 0  # and the trainer's thread was left alone


def test_the_overlap_thread_leaves_cpu_and_server_teachers_alone(tiny_pair_dir):
    from scope_opd.teachers import InProcessTeacher, load_teacher_model
    from scope_opd.teachers.overlap import TeacherPrefetch

    teacher = InProcessTeacher(load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu"))
    prefetch = TeacherPrefetch(teacher)
    prefetch.submit([0], [[5, 6, 7]], [[8, 9]])
    got = prefetch.scores([0], [[5, 6, 7]], [[8, 9]])
    prefetch.close()
    assert torch.equal(got[0], teacher.score([[5, 6, 7]], [[8, 9]])[0])


# ---------------------------------------------------------------- 21.3: phase timings wait for the device


def test_phase_timings_wait_for_queued_device_work_at_every_boundary(tmp_path, tiny_pair_dir):
    """A stand-in asynchronous device: the update's forward, backward and optimiser step each queue 0.2 s of
    "kernel" work that only runs when the trainer synchronises the device. Every step's queue is empty by the
    time the step ends (the trainer waited at the phase boundaries), and "update" holds all of it.

    Why a stand-in: on CPU every op runs synchronously, so there is no queued work for a missing
    synchronisation to leave out; the device queue and its ``synchronize`` are the only mock here (the trainer,
    the model, TRL and the optimiser are real)."""
    import time as time_module

    from transformers import TrainerCallback

    from scope_opd.trainer import SCOPETrainer

    queued = []  # seconds of "kernel" work not yet run
    drained_at_step_end = []

    class AsyncDeviceTrainer(SCOPETrainer):
        def _sync_device(self):
            if queued:
                time_module.sleep(sum(queued))
                queued.clear()

    class QueueAtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            drained_at_step_end.append(not queued)

    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    student.register_forward_hook(lambda *a: queued.append(0.2) if torch.is_grad_enabled() else None)
    student.model.embed_tokens.weight.register_hook(lambda grad: queued.append(0.2))  # the backward pass
    args = make_args(tmp_path, max_steps=2, teacher_model=tiny_pair_dir["teacher"])
    trainer = AsyncDeviceTrainer(student, reward_funcs=[has_digit_reward], args=args, train_dataset=dataset(),
                                 processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
                                 callbacks=[QueueAtStepEnd()])
    trainer.create_optimizer()
    trainer.optimizer.register_step_post_hook(lambda *a: queued.append(0.2))
    trainer.train()
    assert drained_at_step_end == [True, True]
    updates = [h["timing/update"] for h in trainer.state.log_history if "timing/update" in h]
    assert len(updates) == 2 and all(u >= 0.6 for u in updates)  # forward + backward + optimiser step, 0.2 s each


# ---------------------------------------------------------------- 21.6: the GPU check's wheels cannot rot

# On a lent GPU machine (issue 21): torch, transformers, accelerate, peft, Triton, and their own dependencies.
PRESENT_ON_GPU_MACHINE = {
    "torch", "transformers", "accelerate", "peft", "triton", "numpy", "tokenizers", "safetensors", "huggingface-hub",
    "pyyaml", "requests", "tqdm", "filelock", "fsspec", "packaging", "jinja2", "psutil", "sympy", "httpx",
    "typing-extensions", "regex",
}
# Not needed by benchmarks/gpu_check.sh, with why.
NOT_NEEDED_ON_GPU_MACHINE = {
    "matplotlib": "plots only (scope analyze); no check draws",
    "typing": "python < 3.5 only",
}


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _applies_on_the_gpu_machine(requirement: str) -> bool:
    from packaging.requirements import Requirement

    marker = Requirement(requirement).marker
    environment = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    return marker is None or marker.evaluate(environment)


def test_gpu_wheel_list_covers_the_projects_dependencies_there():
    """Every requirement of the project, and of each wheel shipped, is shipped, present there, or not needed."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "==", line
            pins[_name(line)] = next(iter(requirement.specifier)).version
    covered = set(pins) | PRESENT_ON_GPU_MACHINE | set(NOT_NEEDED_ON_GPU_MACHINE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted({_name(r) for r in project} - covered) == []
    # The project's own pins (trl==1.16.0) are the versions shipped.
    for requirement in map(Requirement, project):
        if _name(str(requirement)) in pins:
            assert requirement.specifier.contains(pins[_name(str(requirement))]), (str(requirement), pins)
    # Each shipped package's requirements (as its installed metadata here states them), and that the pin
    # satisfies the requirements of the packages that need it.
    missing = {}
    for dist in pins:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (e.g. pandas's pytz): its requirements are checked on the wheels
        for requirement in requires:
            if "extra ==" in requirement or not _applies_on_the_gpu_machine(requirement):
                continue
            if _name(requirement) not in covered:
                missing.setdefault(dist, []).append(requirement)
    assert missing == {}
    trl_requires = [Requirement(r) for r in importlib.metadata.requires("trl") if "extra ==" not in r]
    for requirement in trl_requires:
        if _name(str(requirement)) in pins:
            assert requirement.specifier.contains(pins[_name(str(requirement))], prereleases=True), str(requirement)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """`benchmarks/gpu_check.sh --dry-run` end to end on CPU (tiny shapes): a summary line per check, exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1500)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for check in ("install:", "step_paper: ok", "microbatch: ok", "fused_logits: ok", "smollm2_shape:", "not checked here:"):
        assert check in summary, summary
    assert "SCOPE/GRPO step ratio:" in summary and "measured wall time" in summary
