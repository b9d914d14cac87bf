"""A prompt set through `python -m unipixel batch` against the same items as one-shot `infer` calls.

Four synthetic shape videos (unipixel/train/scenes.py, with exact ground-truth masks), five items on
each: three referring questions ("Please segment the red circle.") and two point prompts followed by
a question about [1]. The batch run loads the model once and encodes each video once; each `infer`
call is a fresh process that loads the model and encodes its video. Both run on the offline model
and write their outputs; the ratio of wall times is measured in one run. The batch run's aggregate
scores (J, F, J&F on the sampled frames) are printed too.

    python bench/batch.py [--model assets/unipixel-shapes] [--frames 8] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unipixel.export import write_png, write_video  # noqa: E402
from unipixel.train.scenes import make_scene  # noqa: E402

VIDEOS, ITEMS_PER_VIDEO, SOURCE_FRAMES = 4, 5, 16


def centroid(mask: np.ndarray) -> tuple[int, int]:
    """A pixel of the mask near its middle (the mask's own pixel nearest the centroid)."""
    ys, xs = np.nonzero(mask)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(xs[k]), int(ys[k])


def build_prompt_set(work: Path, frames: int, seed: int = 0) -> tuple[Path, list[list[str]]]:
    """The prompt set, and the `infer` arguments of each item (the same question and prompt)."""
    rng = np.random.default_rng(seed)
    items, calls = [], []
    for v in range(VIDEOS):
        scene = make_scene(rng, SOURCE_FRAMES, num_objects=3, hw=(240, 320))
        media = write_video(scene.frames, work / "videos" / f"scene{v}.mp4", fps=8)
        for k in range(ITEMS_PER_VIDEO):
            obj = scene.objects[k % len(scene.objects)]
            truth = work / "masks" / f"scene{v}-{k}"
            for t, mask in enumerate(obj.masks):
                write_png(mask.astype(np.uint8) * 255, truth / f"{t:05d}.png")
            item = {"id": f"scene{v}-{k}", "media": str(media.relative_to(work)), "num_frames": frames,
                    "ground_truth": {"0": str(truth.relative_to(work))}}  # fmt: skip
            if k < 3:
                question = f"Please segment the {obj.name}."
                item["turns"] = [{"question": question}]
                calls.append([str(media), question])
            else:
                x, y = centroid(obj.masks[0])
                question = "What shape is [1]?"
                item["turns"] = [{"object": {"kind": "point", "frame": 0, "points": [[x, y, 1]]}}, {"question": question}]
                calls.append([str(media), question, "--point", f"{x},{y}@0"])
            items.append(item)
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path, calls


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "unipixel-shapes"))
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video (default 8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="keep the prompt set and the runs here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="unipixel-bench-batch-"))
    prompts, calls = build_prompt_set(work, args.frames)
    cli = [sys.executable, "-m", "unipixel"]
    flags = ["--model", args.model, "--device", args.device]

    batch_s = timed(cli + ["batch", str(prompts), "--out", str(work / "run"), *flags])
    infer_s = sum(timed(cli + ["infer", *call, "--frames", str(args.frames), "--out", str(work / "infer" / str(i)), *flags])
                  for i, call in enumerate(calls))  # fmt: skip
    summary = json.loads((work / "run" / "summary.json").read_text())
    print(f"{len(calls)} items ({VIDEOS} videos x {ITEMS_PER_VIDEO}, {args.frames} frames each), model {args.model}, {args.device}")
    print(f"  batch (one process)          {batch_s:7.1f} s")
    print(f"  {len(calls)} one-shot infer calls      {infer_s:7.1f} s")
    print(f"  ratio infer / batch          {infer_s / batch_s:7.1f}x")
    print(f"  batch scores: {json.dumps(summary['scores'])} ({summary['ok']} ok, {summary['errors']} errors)")
    print(f"  run folder: {work / 'run'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
