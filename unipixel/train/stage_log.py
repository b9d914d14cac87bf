"""What the single-module stages (`sam_stage`, `vision_stage`) share: their common options, and a
log that prints and appends JSON rows and says when the time budget is spent."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


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
    def __init__(self, path: Path, max_minutes: float | None = None):
        self.file = open(path, "a")
        self.began, self.max_minutes = time.time(), max_minutes

    def write(self, step: int, loss: torch.Tensor, losses: dict[str, torch.Tensor], **extra) -> None:
        row = {"step": step, "elapsed_s": round(time.time() - self.began, 1), "loss": round(loss.item(), 4)}
        row.update({k: round(v.item(), 4) for k, v in losses.items()})
        row.update(extra)
        print(json.dumps(row), flush=True)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def spent(self) -> float:
        """The share of the time budget used so far (0 without one)."""
        return (time.time() - self.began) / (60 * self.max_minutes) if self.max_minutes is not None else 0.0

    def out_of_time(self, step: int) -> bool:
        over = self.spent() > 1
        if over:
            print(f"stopping at step {step}: {self.max_minutes} minutes are up", flush=True)
        return over

    def close(self) -> None:
        self.file.close()
