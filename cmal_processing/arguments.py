"""How the corpus package's command lines read their flags: dataclasses through `transformers.HfArgumentParser`, as
the example programs do (`cmal_examples.arguments`, which this package must not import: the programs sit above it).

A bad flag or value stops the program through `parser.error`: exit status 2 and a message naming the flag and the
value, as argparse gives; a `ValueError` of a dataclass' `__post_init__` is reported the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import HfArgumentParser


def parse_dataclasses(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """One instance of each of the parser's dataclasses from the flags of `argv` (default `sys.argv[1:]`). Unknown
    flags are refused as argparse refuses them ("unrecognized arguments: ..."); no `.args` file is read."""
    try:
        *values, unknown = parser.parse_args_into_dataclasses(
            args=None if argv is None else list(argv), return_remaining_strings=True, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(values)
