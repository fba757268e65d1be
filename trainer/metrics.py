"""Progress output on the terminal and JSONL metrics, from rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, path: Path | None, enabled: bool, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self.path = Path(path) if path else None
        self.start = time.perf_counter()
        self.opened = False

    def open(self, resume_step: int | None = None) -> None:
        """Start the JSONL file: a new run truncates it; a resumed run keeps the rows up to the
        checkpoint's step (and drops rows a crashed run wrote after it)."""
        self.opened = True
        if not (self.enabled and self.path):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def record(self, row: dict) -> None:
        """Write one JSONL line and a terminal summary of it."""
        if not self.enabled:
            return
        if not self.opened:
            self.open()
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        parts = [f"step {row['step']}", f"epoch {row['epoch']}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".3g"), ("samples_per_s", ".0f"),
                         ("eval_loss", ".4f"), ("eval_accuracy", ".4f")):
            if key in row:
                parts.append(f"{key} {row[key]:{fmt}}")
        self.info("  ".join(parts))
