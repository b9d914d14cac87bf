"""Checkpoints of a stage (`checkpoint-STEP/` with `trainer_state.pt` to resume) and the shipped export."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..model import load_model


def save_checkpoint(model, processor, optimizer, step: int, out_dir: Path, keep: int = 3) -> Path:
    path = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
               tmp / "trainer_state.pt")  # fmt: skip
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def export(checkpoint: str | Path, out_dir: str | Path, sam_from: str | Path | None = None,
           vision_from: str | Path | None = None) -> Path:
    """Ship a training checkpoint: parameters stored in float16 (buffers stay float32), no optimizer.

    `sam_from` takes SAM 2 from another checkpoint: a SAM stage run beside a language stage that held
    SAM 2, both anchored on the same fixed color prompts. `vision_from` likewise takes the vision
    tower and the `<|mem|>` projector (a vision stage run on after the language stage branched off).
    `load_model` reads the result back in the dtype it is asked for (float32 on CPU)."""
    model, processor = load_model(str(checkpoint), device="cpu", dtype=torch.float32)
    for source, parts in ((sam_from, ("sam2",)), (vision_from, ("model.visual", "msk_proj"))):
        if source is not None:
            donor = load_model(str(source), device="cpu", dtype=torch.float32)[0]
            for part in parts:
                model.get_submodule(part).load_state_dict(donor.get_submodule(part).state_dict())
    for param in model.parameters():
        param.data = param.data.half()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    return out_dir
