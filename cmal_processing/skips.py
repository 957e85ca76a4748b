"""Counting what a reader or builder leaves out, so that bad data is never dropped silently."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["SkipCounter"]


class SkipCounter:
    """Skipped records by reason: a count per reason and the first `max_examples` examples of each.

    Readers and builders call `add(reason, example)` for every record they leave out; reasons are short snake_case
    keys (`"bad_base64"`, `"missing_features"`, ...), examples say which record and why, in words. The first skip of
    each reason is also logged as a warning, so nothing disappears even when nobody inspects the counter.

    >>> skipped = SkipCounter()
    >>> skipped.add("bad_base64", "train.tsv line 3 (image 'COCO_1'): Incorrect padding")
    >>> skipped["bad_base64"], skipped["wrong_buffer_size"], skipped.total
    (1, 0, 1)
    """

    def __init__(self, name: str = "skipped", *, max_examples: int = 3):
        if not isinstance(max_examples, int) or max_examples < 0:
            raise ValueError(f"max_examples must be an int >= 0, got {max_examples!r}")
        self.name = name
        self.max_examples = max_examples
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        """Count one skipped record under `reason`; keep `example` if fewer than `max_examples` are kept."""
        if reason not in self._counts:
            logger.warning("%s: %s (%s)", self.name, reason, example)
            self._counts[reason] = 0
            self._examples[reason] = []
        self._counts[reason] += 1
        if len(self._examples[reason]) < self.max_examples:
            self._examples[reason].append(example)

    def update(self, other: SkipCounter) -> None:
        """Add `other`'s counts and keep its examples while room is left (its first skips are not logged again)."""
        for reason, count in other._counts.items():
            self._counts[reason] = self._counts.get(reason, 0) + count
            examples = self._examples.setdefault(reason, [])
            examples.extend(other._examples[reason][: self.max_examples - len(examples)])

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    def __bool__(self) -> bool:
        return bool(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """Reason → number of skipped records, most frequent first."""
        return dict(sorted(self._counts.items(), key=lambda item: (-item[1], item[0])))

    @property
    def examples(self) -> dict[str, list[str]]:
        """Reason → the first few examples."""
        return {reason: list(examples) for reason, examples in self._examples.items()}

    def format(self) -> str:
        """Human-readable lines: `name: total`, then one line per reason with its first example."""
        if not self._counts:
            return f"{self.name}: 0"
        lines = [f"{self.name}: {self.total}"]
        for reason, count in self.counts.items():
            lines.append(f"  {reason}: {count}  e.g. {self._examples[reason][0]}" if self._examples[reason]
                         else f"  {reason}: {count}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, counts={self.counts})"
