"""Reliability: what survives crashes, tampering and garbage input.

- Checkpoints of examples/pretrain.py are atomic (temporary folder, `checkpoint_complete.json` last, rename), and
  `--resume_from_checkpoint latest` takes the newest complete one.
- A real SIGKILL, at a random step or in the middle of writing a checkpoint, followed by a resume, ends with the
  same weights (bit for bit) and the same logged losses as a run that was never interrupted (dropout on).
- Resuming never runs a pickle: weights come from safetensors, every other state file must pass
  `torch.load(weights_only=True)`; a tampered file stops the run with an error naming it, and its payload never runs.
- Region-feature readers turn arbitrary garbage into either valid regions or a `CorruptRegionsError` (a ValueError
  with a documented `reason`), never another exception. The restricted unpickler of `.npz` `info` members is
  tested in test_readers.py (`test_npz_folder_reads_images_and_refuses_malicious_pickle`,
  `test_safe_pickle_refuses_other_globals`), as are the reasons of hand-made corrupt rows; here are the
  property-based versions.
"""

import base64
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT
from cmal_processing import CorruptRegionsError, SkipCounter, read_npz_regions, read_region_features
from cmal_processing.readers import parse_tsv_fields
from test_readers import VG_VOCAB, butd_fields, make_regions, write_npz

PRETRAIN = str(REPO_ROOT / "examples" / "pretrain.py")
STEPS, CHECKPOINT_EVERY = 16, 2
HANG_TIMEOUT_S = 1800  # subprocess timeouts catch hangs, not a slow machine
CONFIG = {
    "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_text_layers": 1,
    "num_visual_layers": 1, "num_unified_layers": 1, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}
READER_REASONS = {"malformed_row", "bad_base64", "wrong_buffer_size", "bad_shape", "non_finite", "bad_image_size",
                  "bad_box", "no_regions", "tag_id_out_of_range", "missing_key", "unsafe_pickle", "unreadable_file"}


@pytest.fixture(scope="module")
def pretrain_module():
    """The checkpoint machinery of examples/pretrain.py (it lives in the programs' shared module)."""
    from cmal_examples import checkpoints

    return checkpoints


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    for name in ("ACCELERATE_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def run_args(synthetic_corpus, synthetic_corpus_info, tokenizer, tmp_path_factory):
    """Arguments of a tiny single-process run with dropout on; 64 rows at batch 8 make an 8-step epoch, so the
    16 steps cross an epoch boundary."""
    from modeling_cmal.anchoring import ConceptLexicon

    config = tmp_path_factory.mktemp("reliability_config") / "config.json"
    config.write_text(json.dumps({"model_type": "cmal", **CONFIG, "vocab_size": len(tokenizer),
                                  "num_anchor_concepts": len(ConceptLexicon.default()),
                                  "visual_feat_dim": synthetic_corpus_info["feature_dim"]}))

    def args(output_dir, *extra):
        return ["--dataset_path", str(synthetic_corpus / "pretrain"), "--output_dir", str(output_dir),
                "--model_config", str(config), "--max_steps", str(STEPS), "--checkpointing_steps",
                str(CHECKPOINT_EVERY), "--checkpoints_total_limit", "2", "--logging_steps", "1", "--eval_steps", "5",
                "--max_eval_batches", "1", "--per_device_batch_size", "8", "--max_train_samples", "64",
                "--learning_rate", "1e-3", "--warmup_steps", "3", "--max_text_length", "32", "--seed", "11",
                "--report_to", "none", *extra]

    return args


def _run(args, prefix=None, expect_ok=True):
    command = (prefix or [sys.executable, PRETRAIN]) + args
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=HANG_TIMEOUT_S)
    if expect_ok:
        assert result.returncode == 0, f"{command}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def _losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert len(losses) == len(dict(losses)), f"a step was logged twice: {losses}"
    return dict(losses)


@pytest.fixture(scope="module")
def reference_run(run_args, tmp_path_factory):
    """The uninterrupted run every crash test compares with."""
    output = tmp_path_factory.mktemp("reference") / "run"
    _run(run_args(output))
    return output


def _logged_steps(metrics):
    """Steps in metrics.jsonl so far (a line being written may be incomplete)."""
    steps = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                pass
    return steps


def _assert_matches_reference(output, reference):
    assert _losses(output) == _losses(reference)  # exact: same floats in the same order
    expected, got = load_file(reference / "model.safetensors"), load_file(output / "model.safetensors")
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_latest_takes_the_newest_complete_checkpoint(pretrain_module, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 10):
        (checkpoints / f"step_{step:07d}").mkdir(parents=True)
        (checkpoints / f"step_{step:07d}" / pretrain_module.COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (checkpoints / "step_0000020").mkdir()  # killed before its marker: newer, but not complete
    (checkpoints / "step_0000020" / "model.safetensors").write_bytes(b"half written")
    (checkpoints / ".tmp_step_0000030").mkdir()  # killed inside save_state
    (checkpoints / "notes").mkdir()
    assert pretrain_module.resolve_resume("latest", checkpoints).name == "step_0000010"  # 10 > 2 numerically
    assert [path.name for path in pretrain_module.list_checkpoints(checkpoints)] == ["step_0000002", "step_0000010"]
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        pretrain_module.resolve_resume(str(checkpoints / "step_0000020"), checkpoints)
    assert pretrain_module.resolve_resume("latest", tmp_path / "nothing_here") is None
    assert pretrain_module.resolve_resume(None, checkpoints) is None
    pretrain_module.remove_unfinished_checkpoints(checkpoints)  # what a starting run does first
    assert sorted(path.name for path in checkpoints.iterdir()) == ["notes", "step_0000002", "step_0000010",
                                                                   "step_0000020"]


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(run_args, reference_run, tmp_path):
    """SIGKILL inside the save of step 6, after every state file was written and just before the completion
    marker (the most complete-looking incomplete checkpoint there is). Step 4 stays the newest complete checkpoint,
    `latest` resumes from it and the run ends exactly as the uninterrupted one."""
    output = tmp_path / "run"
    kill_step = 6
    # pretrain.main() with _write_json replaced by a version that SIGKILLs the process at the marker of `kill_step`.
    runner = (
        "import os, runpy, signal, sys\n"
        "from cmal_examples import checkpoints\n"
        "write = checkpoints._write_json\n"
        "def killing_write(path, value):\n"
        f"    if path.name == checkpoints.COMPLETE_MARKER and value['step'] == {kill_step}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    write(path, value)\n"
        "checkpoints._write_json = killing_write\n"
        f"sys.argv = [{PRETRAIN!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({PRETRAIN!r}, run_name='__main__')\n"
    )
    killed = _run(run_args(output), prefix=[sys.executable, "-c", runner], expect_ok=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = output / "checkpoints"
    half = checkpoints / f".tmp_step_{kill_step:07d}"
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= {p.name for p in half.iterdir()}
    assert not (half / "checkpoint_complete.json").exists()
    assert not (checkpoints / f"step_{kill_step:07d}").exists()
    assert [path.name for path in sorted(checkpoints.iterdir()) if path.name.startswith("step_")] == [
        "step_0000002", "step_0000004"]
    assert max(_losses(output)) == kill_step  # it had logged step 6 before dying

    resumed = _run(run_args(output, "--resume_from_checkpoint", "latest"))
    assert "step_0000004 at step 4" in resumed.stdout
    assert not half.exists()  # the half-written folder was cleared
    _assert_matches_reference(output, reference_run)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(run_args, reference_run, tmp_path):
    """A real `pretrain.py` process killed with SIGKILL at a random step (after its first checkpoint, possibly in the
    middle of a later one), then `--resume_from_checkpoint latest`: same losses, bit-identical final weights."""
    target = random.Random().randint(CHECKPOINT_EVERY + 1, STEPS - 4)
    output = tmp_path / "run"
    metrics = output / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, PRETRAIN, *run_args(output)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT)
    killed_at = None
    deadline = time.monotonic() + HANG_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            steps = _logged_steps(metrics)
            complete = list((output / "checkpoints").glob("step_*/checkpoint_complete.json"))
            if steps and max(steps) >= target and complete:
                os.kill(process.pid, signal.SIGKILL)
                killed_at = max(steps)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None and killed_at is None:
            process.kill()
        log = process.communicate(timeout=HANG_TIMEOUT_S)[0].decode(errors="replace")
    assert killed_at is not None, f"the run ended before step {target} could be reached:\n{log[-3000:]}"
    assert process.returncode == -signal.SIGKILL
    assert not (output / "model.safetensors").exists()

    resumed = _run(run_args(output, "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in resumed.stdout, f"target step {target}: {resumed.stdout[-2000:]}"
    try:
        _assert_matches_reference(output, reference_run)
    except AssertionError as error:
        raise AssertionError(f"killed at step {killed_at} (target {target}): {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading never runs a pickle
# ----------------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs `exec`, which creates the marker file: what a tampered checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",)


def _tampered_copy(reference_run, tmp_path, name, marker):
    """A copy of the reference run's newest checkpoint with `name` replaced by a torch.save'd payload."""
    newest = sorted((reference_run / "checkpoints").glob("step_*"))[-1]
    checkpoint = tmp_path / newest.name
    shutil.copytree(newest, checkpoint)
    torch.save({"state": Payload(marker), "param_groups": []}, checkpoint / name)
    return checkpoint


def test_payload_is_live(tmp_path):
    """The test payload really runs when a checkpoint file is loaded the unsafe way."""
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "optimizer.bin")
    torch.load(tmp_path / "optimizer.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_tampered_state_file_is_refused_and_never_runs(pretrain_module, reference_run, tmp_path, name):
    marker = tmp_path / "pwned"
    checkpoint = _tampered_copy(reference_run, tmp_path, name, marker)
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match=f"{name} cannot be loaded with "
                       r"torch.load\(weights_only=True\) and is refused"):
        pretrain_module.verify_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_tampered_checkpoint_stops_with_a_clear_error(run_args, reference_run, tmp_path):
    """End to end: `pretrain.py --resume_from_checkpoint` on a checkpoint whose optimizer.bin holds a payload exits
    with an error naming the flag and the file; the payload never ran, nothing was trained."""
    marker = tmp_path / "pwned"
    checkpoint = _tampered_copy(reference_run, tmp_path, "optimizer.bin", marker)
    output = tmp_path / "run"
    result = _run(run_args(output, "--resume_from_checkpoint", str(checkpoint)), expect_ok=False)
    assert result.returncode == 1
    assert "--resume_from_checkpoint" in result.stderr and "optimizer.bin cannot be loaded with" in result.stderr
    assert "weights_only=True" in result.stderr
    assert not marker.exists()
    assert not (output / "model.safetensors").exists() and not (output / "metrics.jsonl").exists()


@pytest.mark.slow
def test_other_unsafe_or_broken_checkpoints_are_refused(pretrain_module, reference_run, tmp_path):
    newest = sorted((reference_run / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "pwned"

    def copy(name):
        target = tmp_path / name
        shutil.copytree(newest, target)
        return target

    # The reference checkpoint itself passes, and gives back its trainer state.
    state = pretrain_module.verify_checkpoint(newest)
    assert state["step"] == STEPS and state["collator"] == {"seed": 11} and state["num_processes"] == 1
    # Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False: never accepted here.
    custom = copy("custom")
    torch.save({"seed": Payload(marker)}, custom / "custom_checkpoint_0.pkl")
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match="custom_checkpoint_0.pkl"):
        pretrain_module.verify_checkpoint(custom)
    # Weights only from safetensors: a pickled pytorch_model.bin in their place is refused.
    pickled_weights = copy("pickled_weights")
    (pickled_weights / "model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, pickled_weights / "pytorch_model.bin")
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match="no model.safetensors"):
        pretrain_module.verify_checkpoint(pickled_weights)
    # A truncated optimizer state: a clear error, not a traceback from deep inside torch.
    truncated = copy("truncated")
    data = (truncated / "optimizer.bin").read_bytes()
    (truncated / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match="optimizer.bin cannot be loaded"):
        pretrain_module.verify_checkpoint(truncated)
    # The RNG states of this process are required (exact resume), and the trainer state must be JSON.
    no_rng = copy("no_rng")
    (no_rng / "random_states_0.pkl").unlink()
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match="no random_states_0.pkl"):
        pretrain_module.verify_checkpoint(no_rng)
    bad_state = copy("bad_state")
    (bad_state / "trainer_state.json").write_text("{not json")
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match="trainer_state.json is missing or not JSON"):
        pretrain_module.verify_checkpoint(bad_state)
    assert not marker.exists()


def _broken_copy(reference_run, tmp_path, case):
    """A copy of the reference run's newest (complete) checkpoint broken in one way; `(folder, file it names)`."""
    newest = sorted((reference_run / "checkpoints").glob("step_*"))[-1]
    checkpoint = tmp_path / "broken" / newest.name
    shutil.copytree(newest, checkpoint)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    if case in ("no_optimizer", "no_scheduler"):
        name = "optimizer.bin" if case == "no_optimizer" else "scheduler.bin"
        (checkpoint / name).unlink()
        return checkpoint, name
    if case == "truncated_weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
        return checkpoint, "model.safetensors"
    if case == "wrong_shape":
        tensors = load_file(checkpoint / "model.safetensors")
        tensors["amc_head.classifier.bias"] = torch.zeros(tensors["amc_head.classifier.bias"].numel() + 1)
        save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
        return checkpoint, "model.safetensors"
    if case.startswith("collator"):
        state["collator"] = {"collator_string": "seed 11", "collator_no_seed": {}, "collator_seed_text": {"seed": "x"},
                             "collator_seed_float": {"seed": 11.5}, "collator_seed_bool": {"seed": True}}[case]
    elif case == "step_beyond_max_steps":
        state["step"] = STEPS + 5
    elif case == "step_bool":
        state["step"] = True
    else:
        raise AssertionError(case)
    state_file.write_text(json.dumps(state))
    return checkpoint, "trainer_state.json"


BROKEN_CHECKPOINTS = {
    "no_optimizer": r"optimizer.bin is missing",
    "no_scheduler": r"scheduler.bin is missing",
    "truncated_weights": r"model.safetensors is not a complete safetensors file",
    "wrong_shape": r"model.safetensors: tensor 'amc_head.classifier.bias' has shape \[\d+\], this model expects",
    "collator_string": r"trainer_state.json: 'collator' must be the collator state",
    "collator_no_seed": r"trainer_state.json: 'collator' must be the collator state",
    "collator_seed_text": r"trainer_state.json: 'collator' must be the collator state.*'seed': 'x'",
    "collator_seed_float": r"trainer_state.json: 'collator' must be the collator state.*11.5",
    "collator_seed_bool": r"trainer_state.json: 'collator' must be the collator state.*True",
    "step_beyond_max_steps": rf"trainer_state.json: 'step' is {STEPS + 5}, beyond --max_steps {STEPS}",
    "step_bool": r"trainer_state.json: 'step' must be an integer >= 0, got True",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_incomplete_or_mismatched_checkpoint_is_refused_before_loading(pretrain_module, reference_run, run_args,
                                                                       tmp_path, case):
    """A complete checkpoint (it has its marker) broken in one way. Each used to end in a traceback from Accelerate
    or safetensors (FileNotFoundError, SafetensorError, size-mismatch RuntimeError, raw ValueError) or, for a step
    beyond --max_steps or a bool, to exit 0 having trained nothing. Now `verify_checkpoint` refuses it, and the
    script stops with an error naming the flag and the file before it loads or trains anything."""
    from modeling_cmal import CmalConfig, CmalForPreTraining

    checkpoint, name = _broken_copy(reference_run, tmp_path, case)
    model = CmalForPreTraining(CmalConfig.from_pretrained(reference_run))
    with pytest.raises(pretrain_module.UnsafeCheckpointError, match=BROKEN_CHECKPOINTS[case]) as raised:
        pretrain_module.verify_checkpoint(checkpoint, model=model, max_steps=STEPS)
    assert isinstance(raised.value, ValueError) and str(checkpoint / name) in str(raised.value)

    output = tmp_path / "run"
    result = _run(run_args(output, "--resume_from_checkpoint", str(checkpoint)), expect_ok=False)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"--resume_from_checkpoint {str(checkpoint)!r}: "), result.stderr[-3000:]
    assert str(checkpoint / name) in last_line and re.search(BROKEN_CHECKPOINTS[case], last_line)
    assert "Traceback" not in result.stderr
    assert not (output / "metrics.jsonl").exists() and not (output / "model.safetensors").exists()


@pytest.mark.slow
def test_resume_beyond_stop_after_steps_is_refused(reference_run, run_args, tmp_path):
    newest = sorted((reference_run / "checkpoints").glob("step_*"))[-1]
    output = tmp_path / "run"
    result = _run(run_args(output, "--resume_from_checkpoint", str(newest), "--stop_after_steps", "3"),
                  expect_ok=False)
    assert result.returncode == 1
    assert f"trainer_state.json is at step {STEPS}, beyond --stop_after_steps 3" in result.stderr
    assert not (output / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# Readers on garbage (property-based)
# ----------------------------------------------------------------------------------------------------------------


def _assert_valid_regions(regions):
    assert set(regions) == {"image_id", "visual_feats", "visual_pos", "image_size", "tags", "scores"}
    num_boxes = regions["visual_feats"].shape[0]
    assert num_boxes > 0 and regions["visual_feats"].ndim == 2 and regions["visual_feats"].dtype == np.float32
    assert regions["visual_pos"].shape == (num_boxes, 4) and regions["scores"].shape == (num_boxes,)
    assert len(regions["tags"]) == num_boxes and all(isinstance(tag, str) for tag in regions["tags"])
    assert all(np.isfinite(regions[key]).all() for key in ("visual_feats", "visual_pos", "scores"))
    width, height = regions["image_size"]
    assert isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
    assert regions["visual_feats"].shape[1] > 0
    x1, y1, x2, y2 = regions["visual_pos"].T
    assert (x1 <= x2).all() and (y1 <= y2).all()  # not inverted
    assert (x1 < width).all() and (y1 < height).all() and (x2 > 0).all() and (y2 > 0).all()  # overlaps the image


def _garbage_field():
    return st.one_of(
        st.binary(max_size=40),
        st.integers(-10**30, 10**30).map(lambda n: str(n).encode()),
        st.sampled_from([b"", b"0", b"-1", b"nan", b"1e3", b" 2 ", b"\xff\xfe", b"=", b"AAAA", b"AAAAAAAAAAA="]),
        st.binary(max_size=48).map(base64.b64encode),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_boxes=st.integers(1, 4), feature_dim=st.integers(1, 8))
def test_tsv_fields_with_garbage_give_regions_or_corrupt_regions_error(data, num_boxes, feature_dim):
    """Start from a valid BUTD row and replace, drop or add arbitrary fields."""

    fields = [field.encode() for field in butd_fields(make_regions("img", num_boxes, feature_dim, seed=3))]
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        index = data.draw(st.integers(0, len(fields) - 1)) if fields else 0
        if action == "replace" and fields:
            fields[index] = data.draw(_garbage_field())
        elif action == "drop" and fields:
            del fields[index]
        else:
            fields.insert(index, data.draw(_garbage_field()))
    try:
        regions = parse_tsv_fields(fields, VG_VOCAB)
    except CorruptRegionsError as error:
        assert error.reason in READER_REASONS and str(error)
    else:
        _assert_valid_regions(regions)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=120), st.lists(_garbage_field(), min_size=10, max_size=10)),
                      max_size=6))
def test_tsv_file_of_garbage_is_read_or_counted(tmp_path, lines):
    """Whole files of garbage lines: `read_region_features` yields only valid regions, counts every other non-blank
    line in its SkipCounter, and raises nothing."""

    path = tmp_path / "garbage.tsv"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else b"\t".join(line) for line in lines))
    with open(path, "rb") as handle:
        non_blank = sum(1 for line in handle if line.strip())
    errors = SkipCounter()
    read = list(read_region_features(path, errors=errors))
    for regions in read:
        _assert_valid_regions(regions)
    assert set(errors.counts) <= READER_REASONS
    assert len(read) + errors.total == non_blank


def _valid_npz_bytes(tmp_path, num_boxes=2, feature_dim=4):

    write_npz(tmp_path, make_regions("img", num_boxes, feature_dim, seed=1))
    return (tmp_path / "img.npz").read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_npz_bytes_with_garbage_give_regions_or_corrupt_regions_error(tmp_path, data):
    """Random bytes, or a valid bottom-up-attention.pytorch file with flipped / cut / overwritten bytes."""

    valid = _valid_npz_bytes(tmp_path)
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "overwrite"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=300))
    elif kind == "flip":
        blob = bytearray(valid)
        for position in data.draw(st.lists(st.integers(0, len(valid) - 1), min_size=1, max_size=8)):
            blob[position] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    elif kind == "truncate":
        blob = valid[: data.draw(st.integers(0, len(valid) - 1))]
    else:
        start = data.draw(st.integers(0, len(valid) - 1))
        blob = valid[:start] + data.draw(st.binary(min_size=1, max_size=64)) + valid[start + 64:]
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(blob)
    try:
        regions = read_npz_regions(path)
    except CorruptRegionsError as error:
        assert error.reason in READER_REASONS
    else:
        _assert_valid_regions(regions)


def _npz_with_members(path, **members):
    """A `.npz` whose members are arbitrary arrays (object arrays pickled, as numpy writes them)."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in members.items():
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=True)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def _object_scalar(value):
    array = np.empty((), dtype=object)
    array[()] = value
    return array


_ARRAY_VALUES = st.one_of(
    st.integers(-5, 5).map(np.int64),
    st.floats(allow_nan=True, allow_infinity=True).map(np.float32),
    st.lists(st.floats(-10, 10), max_size=8).map(lambda v: np.asarray(v, np.float32)),
    st.lists(st.integers(-3, 2000), max_size=8).map(lambda v: np.asarray(v, np.int64)),
    st.tuples(st.integers(0, 3), st.integers(0, 5)).map(lambda shape: np.ones(shape, np.float32)),
    st.sampled_from([np.asarray(["a", "b"]), np.asarray([True, False]), np.zeros((2, 2, 2)),
                     np.asarray([1 + 2j, 3j]), np.asarray([1.5, 2.5])]),
    # found by adversarial testing: inf / complex scalars ended the whole folder read, 1e300 overflowed float32
    st.sampled_from([np.float64(np.inf), np.float64(-np.inf), np.complex128(2), np.complex64(3 + 1j), np.float64(1e300),
                     np.full((2, 4), 1e300), np.zeros((3, 0), np.float32), np.asarray([[5, 5, 1, 1]], np.float32)]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_npz_members_of_any_shape_and_dtype_give_regions_or_corrupt_regions_error(tmp_path, data):
    """Well-formed archives whose members hold wrong shapes, dtypes, NaNs, or an `info` dict of odd values
    (lists, strings, None)."""

    # (Ragged lists are left to test_npz_info_with_ragged_lists_is_a_corrupt_file below.)
    info_value = st.one_of(_ARRAY_VALUES, st.none(), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3))
    info = data.draw(st.one_of(
        st.fixed_dictionaries({"objects_id": info_value, "objects_conf": info_value}),
        st.dictionaries(st.sampled_from(["objects_id", "objects_conf", "attrs_id"]), info_value, max_size=3),
        st.one_of(st.none(), st.integers(), st.text(max_size=3)),
    ))
    members = {key: data.draw(_ARRAY_VALUES) for key in ("x", "bbox", "num_bbox", "image_h", "image_w")}
    members["info"] = _object_scalar(info)
    path = tmp_path / "img.npz"
    _npz_with_members(path, **members)
    try:
        regions = read_npz_regions(path)
    except CorruptRegionsError as error:
        assert error.reason in READER_REASONS
    else:
        _assert_valid_regions(regions)


def test_npz_info_with_ragged_lists_is_a_corrupt_file(tmp_path):
    """Found by the property test above: `info = {"objects_id": [0, []], ...}` must be skipped and counted like any
    other corrupt file, not stop the whole read."""
    regions = make_regions("ragged", 2, 4)
    write_npz(tmp_path, regions, info=_object_scalar({"objects_id": [0, []], "objects_conf": [0.5, 0.5]}))
    write_npz(tmp_path, make_regions("fine", 2, 4))
    errors = SkipCounter()
    read = list(read_region_features(tmp_path, errors=errors))  # the ValueError escapes here today
    assert [r["image_id"] for r in read] == ["fine"] and errors.counts == {"bad_shape": 1}
    with pytest.raises(CorruptRegionsError):
        read_npz_regions(tmp_path / "ragged.npz")
