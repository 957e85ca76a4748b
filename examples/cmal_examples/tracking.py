"""`metrics.jsonl`, an Accelerate tracker: every value `accelerator.log` records, one JSON object per call
(`{"step": ..., "train/loss": ..., ...}`), appended in order. The programs and tests read it without TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JsonLinesTracker(GeneralTracker):
    """An Accelerate tracker writing `path` (on the main process only, as every tracker).

    Give it to `Accelerator(log_with=[JsonLinesTracker(path), ...])` beside the named trackers; after resuming at a
    checkpoint, `drop_after(step)` removes what a killed run logged past that step (and a half-written last line),
    as TensorBoard's `purge_step` does for its events."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """The run's configuration goes to the named trackers (TensorBoard's hparams): this file holds metrics only."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def drop_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
