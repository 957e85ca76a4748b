"""Upgrades CMAL checkpoints written before 2026-12-02, whose learnable scalars are 0-dim tensors.

The hypersphere scales (`*.hypersphere.scale`) and the learned temperatures (`*.logit_scale`) are 1-element
parameters now, because FSDP2 shards every parameter along its first dimension and refuses 0-dim ones. Loading an
older folder fails in `from_pretrained` with transformers' size-mismatch report (`ckpt: torch.Size([]) vs model:
torch.Size([1])`). This module rewrites such a folder once, explicitly:

    python -m modeling_cmal.convert_cmal_checkpoint path/to/folder

An earlier version registered this conversion inside transformers' loading, through loading internals that changed
between minor releases; an explicit, auditable rewrite depends on safetensors alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The parameters that were 0-dim: the two hypersphere scales and the temperatures of AMC's pairing term and of ITC.
SCALAR_SUFFIXES = ("hypersphere.scale", "logit_scale")
WEIGHTS_NAME = "model.safetensors"


def upgrade_scalar_parameters(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A copy of `state_dict` with each 0-dim scalar parameter (`SCALAR_SUFFIXES`) reshaped to `[1]`; also the
    names of the keys it reshaped. Every other tensor, and a scalar that already has shape `[1]`, is unchanged."""
    upgraded, changed = {}, []
    for key, tensor in state_dict.items():
        if key.endswith(SCALAR_SUFFIXES) and tensor.dim() == 0:
            upgraded[key] = tensor.reshape(1)
            changed.append(key)
        else:
            upgraded[key] = tensor
    return upgraded, changed


def upgrade_checkpoint_folder(folder: str | os.PathLike) -> list[str]:
    """Rewrites `folder/model.safetensors` with `upgrade_scalar_parameters` (atomically: a temporary file renamed
    over the old one) and returns the keys it reshaped; a folder already up to date is left untouched."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"folder {str(folder)!r} has no {WEIGHTS_NAME}; expected a folder written by a CMAL model's "
                         "save_pretrained")
    with safe_open(path, framework="pt") as weights:
        metadata = weights.metadata()
        state_dict = {key: weights.get_tensor(key) for key in weights.keys()}
    upgraded, changed = upgrade_scalar_parameters(state_dict)
    if changed:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".safetensors")
        os.close(handle)
        try:
            save_file(upgraded, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return changed


@dataclass
class ConvertCheckpointArguments:
    """The command line (`HfArgumentParser`): the folders to upgrade, as positional arguments (the documented form)
    or after `--folders`."""

    folders: list[str] = field(default_factory=list, metadata={
        "metavar": "FOLDER", "help": "folders written by a CMAL model's save_pretrained"})


def parse_args(argv: Sequence[str] | None = None) -> ConvertCheckpointArguments:
    """The folders of `argv` (default `sys.argv[1:]`). No folder, an unknown flag or a folder without
    `model.safetensors` stops the program before any rewrite, through `parser.error`: exit status 2 and a message
    naming it. (The few lines of `cmal_processing.arguments.parse_dataclasses`, which this package must not import;
    positional folders are what `HfArgumentParser` leaves over.)"""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ConvertCheckpointArguments, prog="python -m modeling_cmal.convert_cmal_checkpoint",
                              usage="%(prog)s [-h] FOLDER [FOLDER ...]", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    args, rest = parser.parse_args_into_dataclasses(args=None if argv is None else list(argv),
                                                    return_remaining_strings=True, look_for_args_file=False)
    if any(text.startswith("-") for text in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.folders = [*rest, *args.folders]
    if not args.folders:
        parser.error("the following arguments are required: FOLDER (a folder written by save_pretrained)")
    for folder in args.folders:
        if not (Path(folder) / WEIGHTS_NAME).is_file():
            parser.error(f"folder {folder!r} has no {WEIGHTS_NAME}; expected a folder written by a CMAL model's "
                         "save_pretrained")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    for folder in parse_args(argv).folders:
        changed = upgrade_checkpoint_folder(folder)
        print(f"{folder}: {', '.join(changed) if changed else 'already up to date'}")


if __name__ == "__main__":
    main()
