"""The README's main job, end to end as a user runs it (smoke preset: the same steps at tiny sizes)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_quickstart_smoke_preset_runs_every_step(tmp_path):
    output = tmp_path / "quickstart"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "examples/quickstart.py", "--preset", "smoke", "--output_dir", str(output)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    # the model was reloaded as remote code, not from the installed package
    assert summary["model_class"].startswith("transformers_modules"), summary["model_class"]
    assert 0.0 <= summary["amc_chance"] < 1.0 and summary["amc_slots"] > 0
    for key in ("amc_accuracy", "vqa_accuracy_pretrained", "vqa_accuracy_scratch"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert len(summary["examples"]) == 5 and all(item["predicted"] for item in summary["examples"])
    assert (output / "loss_curves.png").stat().st_size > 10_000
    for line in ("AMC accuracy", "VQA accuracy, pre-trained CMAL", "VQA accuracy, from scratch"):
        assert line in result.stdout
