"""Shared fixtures: tiny real `transformers` models and a local tokenizer, no hub access."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def pytest_configure(config):
    # Tiny models are dominated by thread overhead: one intra-op thread is ~10-100x faster on 2 cores.
    import torch

    torch.set_num_threads(1)


# Test modules that change how the code sandbox isolates (a fallback that shares the host's /tmp and /dev/shm) and
# then assert that nothing any sandbox uid owns is left there: under pytest-xdist they share one worker, so the
# other worker's sandbox runs never land in what they inspect.
SANDBOX_HOST_STATE_MODULES = ("tests/test_code_sandbox.py", "tests/test_sandbox_leaks.py")
_SHARED_SCOPES = ("class", "module", "package", "session")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, keep the tests that share one module's fixture on one worker.

    A module-, class- or session-scoped fixture defined in a test module (two vLLM servers, a SmolLM2 checkpoint,
    a finished training run, a teacher server) is set up once per worker that runs a test needing it; grouping
    those tests by module sets it up once in all. The module's other tests, and every module without such a
    fixture, go to whichever worker is free.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module_id = item.nodeid.split("::", 1)[0]
        if module_id in SANDBOX_HOST_STATE_MODULES:
            item.add_marker(pytest.mark.xdist_group("sandbox-host-state"))
            continue
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = (d for ds in (fixtures.name2fixturedefs.values() if fixtures else ()) for d in ds)
        if any(d.scope in _SHARED_SCOPES and d.baseid == module_id for d in defs):
            item.add_marker(pytest.mark.xdist_group(module_id))


def build_tiny_qwen2(tokenizer, *, hidden_size=32, layers=2, heads=4, kv_heads=2, seed=0):
    """A randomly initialised Qwen2ForCausalLM sized for unit tests."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="session")
def char_tokenizer():
    from scope_opd.toy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory, char_tokenizer):
    """Saved student (seed 0) and teacher (seed 1, wider) checkpoints sharing the char tokenizer."""
    root = tmp_path_factory.mktemp("tiny_pair")
    paths = {}
    for name, kwargs in {"student": dict(hidden_size=32, seed=0), "teacher": dict(hidden_size=48, seed=1)}.items():
        model = build_tiny_qwen2(char_tokenizer, **kwargs)
        path = root / name
        model.save_pretrained(path)
        char_tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def tiny_pair(tiny_pair_dir):
    """(student, teacher, tokenizer) loaded from ``tiny_pair_dir``; read-only: copy before training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"])
    return student, teacher, AutoTokenizer.from_pretrained(tiny_pair_dir["student"])


@pytest.fixture(scope="session")
def tiny_model(tiny_pair):
    """(student, tokenizer) of ``tiny_pair``."""
    student, _, tokenizer = tiny_pair
    return student, tokenizer


@pytest.fixture(scope="module")
def code_sandbox():
    """The host's code sandbox (namespaces, rlimits, uids); the test is skipped, with the reason, where there is none."""
    from scope_opd.evaluation.humaneval import check_code_sandbox

    try:
        return check_code_sandbox()
    except RuntimeError as err:  # SandboxUnavailable included
        pytest.skip(f"no code sandbox on this host: {err}")


@pytest.fixture
def contained():
    """Skips the test where the sandbox has no private filesystem, pid 1 supervisor or seccomp filter (it says which)."""
    from scope_opd.verifiers import describe_isolation, sandbox

    if not sandbox._isolation().contained:
        pytest.skip(f"no private filesystem, pid 1 supervisor or seccomp filter here ({describe_isolation()})")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, restored after it (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Tiny models run in microseconds on one thread but wait on each other with two on a busy 2-core machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
