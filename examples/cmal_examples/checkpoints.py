"""Checkpoints of `examples/pretrain.py`: written atomically, verified before anything is loaded, pruned, resolved.

A checkpoint is written into `checkpoints/.tmp_step_XXXXXXX`, completed with `trainer_state.json` and the marker
`checkpoint_complete.json` (written last, fsynced) and then renamed: a process killed while saving leaves the earlier
checkpoints untouched, and `--resume_from_checkpoint latest` takes the newest complete one. Resuming never unpickles
arbitrary objects: weights come from safetensors, every other state file must load with
`torch.load(weights_only=True)`, and the trainer state (step, collator state, run layout) is JSON.

Why not Accelerate's own naming and pruning (`ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)`): it writes `checkpoint_<i>` in place, numbered by save count rather than step, and prunes before the
new one is complete, so a kill while saving can leave a half-written folder that looks like a checkpoint and has
already cost a complete one. The folders here are named by step and appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils.other import TORCH_SAFE_GLOBALS

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PREFIX = ".tmp_"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
# Files of an Accelerate checkpoint that are pickles; each must load with weights_only=True.
PICKLED_STATE = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|"
                           r"scaler\.pt|random_states_\d+\.pkl)$")
# What must match between the run that wrote a checkpoint and the one resuming it (data position, RNG files).
RESUME_INVARIANTS = ("per_device_batch_size", "gradient_accumulation_steps", "num_processes", "max_train_samples",
                     "seed", "itm_hard_negative_rate")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would need arbitrary unpickling, or the checkpoint is incomplete, corrupt or does not fit
    this run (a missing state file, a truncated `model.safetensors`, a tensor of another shape, a malformed
    `trainer_state.json`). The message names the file."""


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (written atomically, with their marker), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (best effort where the platform cannot open folders)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, total_limit: int,
                      trainer_state: dict):
    """Yields the temporary folder to `save_state` into; on exit writes the trainer state and the completion marker
    last, renames the folder to `step_XXXXXXX` and prunes to the newest `total_limit` complete checkpoints. A kill
    mid-save leaves the earlier checkpoints intact and no folder named `step_*` without its marker."""
    final = checkpoint_dir / f"step_{step:07d}"
    temporary = checkpoint_dir / f"{TEMPORARY_PREFIX}step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield str(temporary)
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        _write_json(temporary / TRAINER_STATE, trainer_state)
        for item in temporary.iterdir():
            _fsync(item)
        _write_json(temporary / COMPLETE_MARKER, {"step": step})
        _fsync(temporary)
        if final.exists():  # this step was saved before (a resume from an earlier checkpoint): replace it
            stale = checkpoint_dir / f"{TEMPORARY_PREFIX}old_step_{step:07d}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temporary, final)
        _fsync(checkpoint_dir)
        for old in list_checkpoints(checkpoint_dir)[:-total_limit]:
            # Renamed first, so that a kill during the deletion leaves no half-deleted folder that looks complete.
            doomed = checkpoint_dir / f"{TEMPORARY_PREFIX}pruned_{old.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_unfinished_checkpoints(checkpoint_dir: Path) -> None:
    """Remove the temporary folders a run killed while saving or pruning checkpoints left behind."""
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if path.name.startswith(TEMPORARY_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def resolve_resume(path: str | None, checkpoint_dir: Path) -> Path | None:
    """`latest`: the newest complete checkpoint under `checkpoint_dir` (None when there is none); a path: that
    checkpoint, which must be complete."""
    if path is None:
        return None
    if path == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    resolved = Path(path)
    if not (resolved / COMPLETE_MARKER).is_file():
        raise SystemExit(f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {COMPLETE_MARKER})")
    return resolved


def _model_tensor_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]]]:
    """`(name -> shape, name -> the names sharing its storage)` of a model's state dict (tied weights are saved
    once in `model.safetensors`)."""
    state = model.state_dict()
    by_storage: dict[int, set[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
    tied = {name: by_storage[tensor.untyped_storage().data_ptr()] for name, tensor in state.items()}
    return {name: tuple(tensor.shape) for name, tensor in state.items()}, tied


def safetensors_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors file, from its header (nothing else is read)."""
    from safetensors import safe_open

    with safe_open(os.fspath(file), framework="pt") as weights:
        return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118


def _check_safetensors(file: Path, model: torch.nn.Module | None) -> None:
    """The safetensors header must be complete (a truncated file is refused here, not by Accelerate's loader) and,
    given the model, name exactly its tensors with their shapes (tied weights once)."""
    from safetensors import SafetensorError

    try:
        shapes = safetensors_shapes(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise UnsafeCheckpointError(f"{file} is not a complete safetensors file (truncated or corrupt?): "
                                    f"{error}") from None
    if model is None:
        return
    expected, tied = _model_tensor_shapes(model)
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UnsafeCheckpointError(f"{file} holds {len(unexpected)} tensors this model does not have, e.g. "
                                    f"{unexpected[:3]}; it was written by another model (--model_config?)")
    wrong = [(name, shape, expected[name]) for name, shape in shapes.items() if shape != expected[name]]
    if wrong:
        name, shape, want = wrong[0]
        raise UnsafeCheckpointError(f"{file}: tensor {name!r} has shape {list(shape)}, this model expects "
                                    f"{list(want)} ({len(wrong)} tensors of another shape; another --model_config?)")
    missing = sorted(name for name in expected if not tied[name] & set(shapes))
    if missing:
        raise UnsafeCheckpointError(f"{file} lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")


def _check_trainer_state(file: Path, max_steps: int | None) -> dict:
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UnsafeCheckpointError(f"{file} is missing or not JSON: {error}") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"{file} must be a JSON object with an integer step and the collator state, "
                                    f"got {type(state).__name__}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UnsafeCheckpointError(f"{file}: 'step' must be an integer >= 0, got {step!r}")
    if max_steps is not None and step > max_steps:
        raise UnsafeCheckpointError(f"{file}: 'step' is {step}, beyond --max_steps {max_steps}: nothing would be "
                                    "trained. Resume with --max_steps of at least that step")
    collator = state.get("collator")
    seed = collator.get("seed") if isinstance(collator, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise UnsafeCheckpointError(f"{file}: 'collator' must be the collator state, a JSON object with an integer "
                                    f"seed >= 0 (from CmalPretrainingCollator.state_dict()), got {collator!r}")
    return state


def verify_checkpoint(path: Path, process_index: int = 0, *, model: torch.nn.Module | None = None,
                      max_steps: int | None = None) -> dict:
    """Check that resuming from `path` loads nothing but tensors and plain data, and return its trainer state.

    Weights must be safetensors (`model.safetensors`) or an FSDP sharded-state folder; `pytorch_model.bin` is refused.
    Every pickled state file (optimizer, scheduler, sampler, scaler, RNG states) must load with
    `torch.load(weights_only=True)`, which refuses any global outside tensors, containers and numpy's RNG state;
    Accelerate's own loader then reads the files that passed. Files Accelerate would unpickle without that
    restriction (`custom_checkpoint_*.pkl`) are refused: this script keeps its collator state in JSON.
    The checkpoint must also be complete and fit the run: `optimizer.bin`, `scheduler.bin` and the RNG states of
    this process are present, `model.safetensors` has a complete header and (given `model`) exactly the model's
    tensors with their shapes, and `trainer_state.json` holds an integer `step` in [0, `max_steps`] and the
    collator state. Nothing is loaded into the model, optimizer or collator here.
    Raises `UnsafeCheckpointError` (a `ValueError`) naming the file.
    """
    names = {item.name for item in path.iterdir()}
    custom = sorted(name for name in names if re.match(r"^custom_checkpoint_\d+\.pkl$", name))
    if custom:
        raise UnsafeCheckpointError(
            f"{path / custom[0]}: this script stores no custom pickled state (Accelerate would unpickle it "
            "without weights_only); refusing to resume from a checkpoint that holds one"
        )
    if "model.safetensors" not in names and not any(name.startswith("pytorch_model_fsdp") for name in names):
        found = ", ".join(sorted(names)) or "nothing"
        raise UnsafeCheckpointError(f"{path}: no model.safetensors (weights are only loaded from safetensors); "
                                    f"found {found}")
    random_states = f"random_states_{process_index}.pkl"
    if random_states not in names:
        raise UnsafeCheckpointError(f"{path}: no {random_states}; the RNG states of process {process_index} are "
                                    "needed to resume exactly")
    # Accelerate saves the optimizer as optimizer.bin (optimizer_0/ for FSDP sharded state) and the scheduler as
    # scheduler.bin, and loads both unconditionally.
    for required, alternative in (("optimizer.bin", "optimizer_0"), ("scheduler.bin", None)):
        if required not in names and alternative not in names:
            raise UnsafeCheckpointError(f"{path / required} is missing; a checkpoint of this script holds the "
                                        "optimizer and scheduler states (incomplete copy?)")
    for name in sorted(names):
        if not PICKLED_STATE.match(name):
            continue
        try:
            with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
                torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # an UnpicklingError for a forbidden global, anything else for a broken file
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UnsafeCheckpointError(
                f"{path / name} cannot be loaded with torch.load(weights_only=True) and is refused: it holds "
                f"something other than tensors and plain data (tampered or corrupt?) [{first_line}]"
            ) from None
    if "model.safetensors" in names:
        _check_safetensors(path / "model.safetensors", model)
    return _check_trainer_state(path / TRAINER_STATE, max_steps)


def check_resume(path: Path, state: dict, run_state: dict, *, stop_after_steps: int | None) -> None:
    """Refuses to resume from `path` (its verified trainer `state`) into a run whose layout differs (`run_state`: the
    batch size, accumulation, processes, data subset, seed and hard-negative rate that fix the data position, the
    batches' draws and the RNG files), or that would train nothing. Raises `SystemExit` naming the flag."""
    if stop_after_steps is not None and state["step"] > stop_after_steps:
        raise SystemExit(f"--resume_from_checkpoint {str(path)!r}: {path / TRAINER_STATE} is at step "
                         f"{state['step']}, beyond --stop_after_steps {stop_after_steps}: nothing would be trained")
    for name in RESUME_INVARIANTS:
        if name in state and state[name] != run_state[name]:
            flag = "processes (accelerate --num_processes)" if name == "num_processes" else f"--{name}"
            raise SystemExit(f"--resume_from_checkpoint {str(path)!r} was written with {flag} = {state[name]}; "
                             f"this run has {run_state[name]}. Resume with the same value.")


def save_final(accelerator: Accelerator, model, processor, output_dir: Path) -> None:
    """Model + processor + code into a temporary sibling, then moved into `output_dir` file by file."""
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the full state)
    if not accelerator.is_main_process:
        return
    temporary = output_dir / f"{TEMPORARY_PREFIX}final"
    shutil.rmtree(temporary, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=state_dict)
    processor.save_pretrained(temporary)
    for item in temporary.iterdir():
        _fsync(item)
        os.replace(item, output_dir / item.name)
    temporary.rmdir()
