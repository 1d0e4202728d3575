"""rollout_chunk_groups with TRL's vLLM server mode, on 2 processes: every completion comes from its own prompt.

TRL's server path gathers a chunk's prompts from every process and sends one prompt per num_generations rows
(``all_prompts[::G]``) with ``n = G``. When a process holds a number of rows that is not a multiple of G, a
prompt group straddles two processes, and cutting each process's rows into chunks paired rows with another
prompt's completions (issue 17: 4 of 12 rows with G = 4, 6 rows per process, one group per chunk). The config
now refuses that setting, naming both numbers; settings it accepts pair every row with its own prompt, checked
through TRL's real generation code against a stand-in server (tests/stand_in_vllm.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port
from stand_in_vllm import start_server

TESTS = Path(__file__).parent
SCRIPT = TESTS / "dist_scripts" / "chunked_server_generation.py"


@pytest.fixture(scope="module")
def stand_in_server():
    server = start_server()
    yield server
    server.shutdown()
    server.server_close()


def test_chunks_through_trls_server_mode_pair_every_row_with_its_own_prompt(tmp_path, tiny_pair_dir, stand_in_server):
    # per_device_train_batch_size:rollout_chunk_groups, G = 4, 2 processes
    cases = ["8:1", "6:2", "6:1"]  # whole groups per process; 6 rows in one chunk; 6 rows in chunks of 4 (refused)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "dist_scripts"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()),
         str(SCRIPT), tiny_pair_dir["student"], stand_in_server.url, str(tmp_path), *cases],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for case, rows in (("8:1", 8), ("6:2", 6)):
        for result in ranks:
            assert result[case]["rows"] == rows
            assert result[case]["mispaired"] == [], f"{case}: rows paired with another prompt's completion"
    split = [result["6:1"] for result in ranks]
    accepted = [r for r in split if "refused" not in r]
    assert not accepted, (f"6 rows per process in chunks of 4 rows was accepted: "
                          f"{sum(len(r['mispaired']) for r in accepted)} of {sum(r['rows'] for r in accepted)} rows "
                          f"were paired with another prompt's completion: {[r['mispaired'] for r in accepted]}")
    for refused in split:
        assert "6 rows per generation batch" in refused["refused"] and "num_generations 4" in refused["refused"]
    # The server saw TRL's requests: one prompt per group, n = G (2 chunks for "8:1", 1 for "6:2").
    assert [len(r["prompt"]) for r in stand_in_server.requests] == [2, 2, 3]
    assert {r["n"] for r in stand_in_server.requests} == {4}
