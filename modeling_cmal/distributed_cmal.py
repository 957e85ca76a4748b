"""Cross-process helpers of the CMAL losses (torch.distributed only; no Accelerate, so the remote code stays
torch + transformers)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gather_with_gradients(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's `rows` `[B, D]`, concatenated in rank order, with gradients flowing back to every process;
    plus this process's offset in the result.

    `all_gather` needs equal sizes on every rank. In eager mode the batch sizes are exchanged first and every rank
    pads its rows to the largest (the last batch of an epoch may be smaller on some ranks; padding rows are zero,
    so the caller marks them invalid through a column of its own); compiled, the shapes must be static, so every
    process must have the same batch size (Accelerate's default `even_batches=True` gives that)."""
    from torch.distributed.nn.functional import all_gather

    rank, size = torch.distributed.get_rank(), rows.shape[0]
    if not torch.compiler.is_compiling():
        sizes = [torch.zeros(1, dtype=torch.long, device=rows.device)
                 for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(sizes, torch.tensor([size], device=rows.device))
        size = int(torch.cat(sizes).max())
    gathered = all_gather(F.pad(rows, (0, 0, 0, size - rows.shape[0])))
    return torch.cat(gathered, dim=0), rank * size
