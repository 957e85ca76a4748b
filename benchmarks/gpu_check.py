#!/usr/bin/env python
"""One script for a GPU machine (under 8 minutes): a bf16 training step of CMAL-base, eager and compiled, with
samples/s, MFU against the GPU's bf16 peak and peak memory, then a 1-process DDP and FSDP2 smoke run; one table.

    python benchmarks/gpu_check.py                      # CMAL-base, batch 64, 36 regions, 40 pieces, on cuda:0
    python benchmarks/gpu_check.py --peak_tflops 989    # when the GPU is not in the table below
    python benchmarks/gpu_check.py --device cpu --smoke # tiny shapes on CPU: checks that the script runs

MFU = (model FLOPs of one training step, counted by `torch.utils.flop_counter.FlopCounterMode` on the eager step)
/ step time / peak bf16 FLOP/s (dense, no sparsity). Not part of CI; the issue's target is >= 40 % compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from modeling_cmal import CmalConfig, CmalForPreTraining  # noqa: E402
from modeling_cmal.collator_cmal import mlm_prediction_positions  # noqa: E402
from modeling_cmal.modeling_cmal import CmalLayer  # noqa: E402
from cmal_processing.arguments import parse_dataclasses  # noqa: E402

# Dense bf16 peaks in TFLOP/s (vendor datasheets, without structured sparsity); matched on the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
                    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "B200": 2250.0}


@dataclass
class GpuCheckArguments:
    """The flags of the script (`HfArgumentParser`)."""

    device: str = "cuda"
    batch_size: int = 64
    num_regions: int = 36
    num_pieces: int = 40
    steps: int = field(default=20, metadata={"help": "timed steps per mode (after warm-up)"})
    peak_tflops: float | None = field(default=None, metadata={"help": "bf16 peak of the device (default: table)"})
    smoke: bool = field(default=False, metadata={"help": "tiny shapes (hidden 64), to check the script"})

    def __post_init__(self):
        for name in ("batch_size", "num_regions", "num_pieces", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak_tflops must be > 0, got {self.peak_tflops}")


def parse_args(argv=None) -> GpuCheckArguments:
    parser = HfArgumentParser(GpuCheckArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parse_dataclasses(parser, argv)
    return args


def make_config(smoke: bool) -> CmalConfig:
    if smoke:
        return CmalConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_text_layers=1,
                          num_visual_layers=1, num_unified_layers=2, visual_feat_dim=128)
    return CmalConfig()  # CMAL-base: 768 / 12 heads / 3072, 6 + 3 + 6 layers, BUTD 2048-d regions


def make_batch(config: CmalConfig, args, device: torch.device, seed: int = 0) -> dict:
    """A pre-training batch as the collator makes it: 4 anchors per caption with mixed actions, 15 % MLM, ITM."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, pieces, regions = args.batch_size, args.num_pieces, args.num_regions
    input_ids = torch.randint(1000, config.vocab_size, (batch_size, pieces), generator=generator)
    labels = torch.where(torch.rand(batch_size, pieces, generator=generator) < 0.15, input_ids, -100)
    anchors = 4
    anchor_pairs = torch.stack([torch.randint(1, pieces - 1, (batch_size, anchors), generator=generator),
                                torch.randint(0, regions, (batch_size, anchors), generator=generator)], dim=-1)
    boxes = torch.rand(batch_size, regions, 4, generator=generator).sort(dim=-1).values
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, pieces, dtype=torch.long),
        "token_type_ids": torch.zeros(batch_size, pieces, dtype=torch.long),
        "visual_feats": torch.rand(batch_size, regions, config.visual_feat_dim, generator=generator),
        "visual_pos": boxes,
        "visual_attention_mask": torch.ones(batch_size, regions, dtype=torch.long),
        "anchor_pairs": anchor_pairs,
        "anchor_concept_ids": torch.randint(0, config.num_anchor_concepts, (batch_size, anchors), generator=generator),
        "anchor_actions": torch.randint(0, 6, (batch_size, anchors), generator=generator),
        "labels": labels,
        "mlm_positions": mlm_prediction_positions(labels),
        "itm_labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(model, optimizer, batch, device) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()


def time_steps(model, optimizer, batch, device, steps: int, warmup: int) -> float:
    """Seconds per step (median of `steps` timed steps after `warmup`)."""
    for _ in range(warmup):
        train_step(model, optimizer, batch, device)
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch, device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_flops(model, batch, device) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return BF16_PEAK_TFLOPS[key] * 1e12
    return None


def measure(config, args, device, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = CmalForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = make_batch(config, args, device)
    flops = step_flops(model, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = torch.compile(model, fullgraph=True) if compiled else model
    seconds = time_steps(runner, optimizer, batch, device, args.steps, warmup=3 if compiled else 2)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "samples_per_s": args.batch_size / seconds, "flops": flops, "memory_gib": memory}


def distributed_smoke(config, args, device, kind: str) -> str:
    """Two training steps in a 1-process group: DDP (find_unused_parameters=False) or FSDP2 (`fully_shard` of each
    `CmalLayer` and the root). Returns "ok" or the error."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = CmalForPreTraining(config).to(device).train()
        if kind == "ddp":
            model = DistributedDataParallel(model, find_unused_parameters=False)
        else:
            from torch.distributed.fsdp import fully_shard

            for module in model.modules():
                if isinstance(module, CmalLayer):
                    fully_shard(module)
            fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = make_batch(config, args, device, seed=1)
        for _ in range(2):
            train_step(model, optimizer, batch, device)
        synchronize(device)
        return "ok"
    except Exception as error:  # reported in the table: the other rows still matter
        return f"FAILED: {type(error).__name__}: {error}"[:200]
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu --smoke to check the script")
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = make_config(args.smoke)
    started = time.perf_counter()
    peak = peak_flops(args, device)
    rows = []
    for compiled in (False, True):
        result = measure(config, args, device, compiled)
        mfu = result["flops"] / result["seconds"] / peak if peak else float("nan")
        rows.append((f"train step, {'compiled' if compiled else 'eager'}", f"{result['samples_per_s']:.0f}",
                     f"{result['seconds'] * 1e3:.1f}", f"{100 * mfu:.1f} %", f"{result['memory_gib']:.2f}"))
    flops_per_sample = result["flops"] / args.batch_size
    smokes = [(f"{kind.upper()} 1 process, 2 steps", distributed_smoke(config, args, device, kind))
              for kind in ("ddp", "fsdp2")]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nCMAL {'smoke shapes' if args.smoke else 'base'} on {name}: batch {args.batch_size}, "
          f"{args.num_pieces} pieces, {args.num_regions} regions, bf16 autocast, AdamW; "
          f"{flops_per_sample / 1e9:.1f} GFLOP per sample per step; peak "
          f"{'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (pass --peak_tflops)'}; torch {torch.__version__}")
    header = ("measurement", "samples/s", "ms/step", "MFU", "peak GiB")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(value).ljust(w) for value, w in zip(row, widths)))
    for label, status in smokes:
        print(f"{label}: {status}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if all(status == "ok" for _, status in smokes) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
