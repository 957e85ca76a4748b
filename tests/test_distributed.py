"""Two gloo processes (`torch.distributed.run`): every pre-training objective switched off in turn, the contrastive
variant, batches with and without anchors (and without anchor inputs at all between two with them), every task head
with and without gradient checkpointing, under DDP with `find_unused_parameters=False`; and FSDP2 (`fully_shard` on
each `CmalLayer` and the root). Each trains two or three steps (DDP raises in a step when a parameter got no
gradient in the one before). The scenarios are in `distributed_worker.py`, run in one launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_worker import scenarios

WORKER = Path(__file__).with_name("distributed_worker.py")
SCENARIOS = [name for name, _ in scenarios()]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("distributed") / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # The timeout catches a hang (a collective waiting for a rank that died), not slowness.
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(output)],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    assert completed.returncode == 0 and output.exists(), completed.stdout[-3000:] + completed.stderr[-5000:]
    return {row["scenario"]: row for row in map(json.loads, output.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_train_two_steps(results, scenario):
    assert results[scenario]["ok"], results[scenario]["error"]
