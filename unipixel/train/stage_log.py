"""What the single-module stages (`sam_stage`, `vision_stage`) share: their common options, and a
log that prints and appends JSON rows and says when the time budget is spent."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .parallel import agreed_spent


def stage_parser(prog: str, doc: str, init_help: str, steps: int, lr: float, batch_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("init", type=Path, help=init_help)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=16, help=batch_help)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    return parser


class StageLog:
    """With `workers` > 1, only the first process (`rank` 0) prints and writes, and the time budget
    is the one the slowest process has used, so all take the same learning rate and stop together."""

    def __init__(self, path: Path, max_minutes: float | None = None, rank: int = 0, workers: int = 1):
        self.lead, self.workers = rank == 0, workers
        self.file = open(path, "a") if self.lead else None
        self.began, self.max_minutes = time.time(), max_minutes
        self.spent = 0.0  # the share of the time budget used, as of the last `out_of_time` (0 without one)

    def write(self, step: int, loss: torch.Tensor, losses: dict[str, torch.Tensor], **extra) -> None:
        row = {"step": step, "elapsed_s": round(time.time() - self.began, 1), "loss": round(loss.item(), 4)}
        row.update({k: round(v.item(), 4) for k, v in losses.items()})
        row.update(extra)
        print(json.dumps(row), flush=True)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def out_of_time(self, step: int) -> bool:
        """Measure the time used (once a step: it also sets the next step's learning rate)."""
        own = (time.time() - self.began) / (60 * self.max_minutes) if self.max_minutes is not None else 0.0
        self.spent = agreed_spent(own, self.workers)
        over = self.spent > 1
        if over and self.lead:
            print(f"stopping at step {step}: {self.max_minutes} minutes are up", flush=True)
        return over

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
