"""The arguments the figure programs (`visualize_attention.py`, `tsne.py`) share, in the style of the transformers
examples: `FigureArguments`, a dataclass of the common flags whose `__post_init__` checks them, and
`parse_figure_arguments`, `cmal_examples.arguments.parse_arguments` over a program's subclass of it (flags, or one
JSON file of them).

A bad value raises `ValueError` naming the flag, the value and what was expected; `parse_figure_arguments` turns it
into `parser.error` (exit status 2), from the command line and from a JSON file alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from .arguments import parse_arguments

Arguments = TypeVar("Arguments", bound="FigureArguments")


@dataclass
class FigureArguments:
    """`--model_name_or_path` (a saved CMAL folder), `--output` (the PNG to write), `--seed` (>= 0), and for image
    files `--detector` / `--score_threshold` (in [0, 1)). Every field,
    a subclass's included, must hold a value of its annotated type (what a JSON file gives is not converted by
    argparse); a subclass checks its own values in `__post_init__` after calling this one."""

    model_name_or_path: str = field(metadata={"help": "a CMAL folder (pre-trained or fine-tuned)"})
    output: str = field(metadata={"help": "PNG file to write (its folder is created)"})
    seed: int = field(default=0, metadata={"help": "seed of the figure's synthetic scenes (>= 0)"})
    detector: str | None = field(default=None, metadata={
        "help": "with image files: a transformers object-detector folder (the one the model's features come from)"})
    score_threshold: float = field(default=0.2, metadata={
        "help": "with --detector: detections scoring at most this are dropped (in [0, 1))"})

    def _refuse(self, name: str, requirement: str) -> None:
        raise ValueError(f"--{name} must be {requirement}, got {getattr(self, name)!r}")

    def _check_detector(self, image_files: bool, files_flag: str, unset_requirement: str) -> None:
        """--detector must name a folder when the program reads image files (`files_flag`), and be left unset
        (`unset_requirement` says when) otherwise."""
        if image_files:
            if self.detector is None or not Path(self.detector).is_dir():
                self._refuse("detector", f"a transformers object-detector folder with {files_flag} (the detector "
                             "whose features the model was trained on)")
        elif self.detector is not None:
            self._refuse("detector", unset_requirement)

    def __post_init__(self):
        self._check_types()
        if not Path(self.model_name_or_path, "config.json").is_file():
            self._refuse("model_name_or_path", "a saved CMAL folder with a config.json (a folder written by "
                         "save_pretrained, e.g. the quickstart's outputs/quickstart/pretrained)")
        if Path(self.output).suffix.lower() != ".png":
            self._refuse("output", "a .png file")
        if Path(self.output).is_dir():
            self._refuse("output", "a .png file name, not a folder")
        if self.seed < 0:
            self._refuse("seed", "an integer >= 0")
        if not 0.0 <= self.score_threshold < 1.0:
            self._refuse("score_threshold", "a float in [0, 1)")

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            name, value = item.name, getattr(self, item.name)
            hint = hints[name]
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if value is None and type(None) in options:
                continue
            (kind,) = (option for option in options if option is not type(None))
            if typing.get_origin(kind) is Literal:
                if value not in typing.get_args(kind):
                    self._refuse(name, f"one of {list(typing.get_args(kind))}")
            elif kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    self._refuse(name, "an integer")
            elif kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    self._refuse(name, "a number")
                setattr(self, name, float(value))
            elif kind is str:
                if not isinstance(value, str):
                    self._refuse(name, "a string")
            else:  # a field type this check does not know: a programming error, not a user's
                raise TypeError(f"{type(self).__name__}.{name}: cannot check values of type {kind!r}")

    def positive_integers(self, *names: str) -> None:
        """Refuses every flag of `names` that is not > 0."""
        for name in names:
            if getattr(self, name) <= 0:
                self._refuse(name, "a positive integer")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The program's docstring as written, and every flag's default."""


def parse_figure_arguments(arguments_class: type[Arguments], description: str,
                           argv: list[str] | None = None) -> Arguments:
    """The flags of `arguments_class`, or one JSON file holding them (`cmal_examples.arguments.parse_arguments`),
    with the program's docstring and every flag's default in `--help`."""
    (args,) = parse_arguments(arguments_class, argv, description=description, formatter_class=HelpFormatter)
    return args
