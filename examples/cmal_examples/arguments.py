"""How every example program reads its arguments, as transformers' example scripts do: dataclasses of flags through
`HfArgumentParser`, from the command line or from one JSON file of them (keys: the flags' names without `--`).

`parse_arguments` is the one parser of `quickstart.py`, `pretrain.py`, `ablation.py`, `visualize_attention.py` and
`tsne.py`; the fine-tuning programs read their JSON file with `read_json_arguments` too (`cmal_examples.finetuning`).
A bad value, flag or file stops the program with exit status 2 and a message naming the flag (or the key) and the
value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser


def read_json_arguments(path: str) -> dict:
    """The JSON object of the arguments file `path`; `ValueError` naming the file when it is unreadable or not one
    JSON object."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"the arguments file {path!r} is not a readable JSON file: {error}") from None
    if not isinstance(values, dict):
        shape = f"one JSON object (the flags' names as keys), got a {type(values).__name__}"
        # A ValueError like every bad input here: the callers report those.
        raise ValueError(f"the arguments file {path!r} must hold {shape}")  # noqa: TRY004
    return values


def check_json_keys(values: dict, path: str, dataclass_types: Sequence[type]) -> None:
    """What `HfArgumentParser.parse_dict` would not say with the flag's name: a key that is no flag, a required flag
    that is missing."""
    fields = [item for kind in dataclass_types for item in dataclasses.fields(kind) if item.init]
    names = [item.name for item in fields]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"the arguments file {path!r} has keys that are no flag of this program: {unknown} (the "
                         f"flags: {names})")
    missing = [item.name for item in fields if item.name not in values
               and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"the arguments file {path!r} must give " + ", ".join(f"--{name}" for name in missing)
                         + " (as keys: " + ", ".join(repr(name) for name in missing) + ")")


def parse_arguments(dataclass_types: type | Sequence[type], argv: list[str] | None = None, *,
                    description: str | None = None, prog: str | None = None,
                    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> tuple:
    """One instance of each of `dataclass_types` from the flags of `argv` (default `sys.argv[1:]`), or from one JSON
    file when `argv` is a single `.json` path. A `ValueError` of a dataclass' `__post_init__` (or of the file) stops
    the program through `parser.error`: exit status 2 and the message. `prog`: the program's name in the usage and
    the messages (default: argparse's, the name of the script)."""
    types = tuple(dataclass_types) if isinstance(dataclass_types, Sequence) else (dataclass_types,)
    parser = HfArgumentParser(types, prog=prog, description=description, formatter_class=formatter_class)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            values = read_json_arguments(argv[0])
            check_json_keys(values, argv[0], types)
            return tuple(parser.parse_dict(values))
        return tuple(parser.parse_args_into_dataclasses(args=argv))
    except ValueError as error:
        parser.error(str(error))
