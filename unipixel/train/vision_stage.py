"""A stage for the vision tower alone: make the `<|mem|>` features tell shapes apart.

    python -m unipixel.train.vision_stage INIT_CHECKPOINT OUT_DIR [--steps N] [--batch-size B]

After the stages before it, a linear probe on the `<|mem|>` embedding of an object (its mask-pooled
vision features, projected) read the color 97% of the time and the shape 34% (chance is 20%). The
LM loss on the one shape word of an answer had not taught the small vision tower shapes, so region
and follow-up answers guessed them. Here the vision tower and the `<|mem|>` projector learn under
a linear classifier of shape and color on each object's `<|mem|>` embedding. The classifier is
thrown away afterwards. A keeping term holds the frame embeddings and the `<|mem|>` embeddings near
the starting model's: mean squared error, divided by the starting embeddings' variance. Without
it, the language model and the seg prompts would lose what they already read from those
embeddings. The output is a whole-model checkpoint to `--init-from`.

Each step's images go through the vision tower in one call, and `--loaders N` draws them in N
processes: on a GPU the stage is bound by drawing scenes (one H200 with 14 loaders: 64 images in
0.22 s, about 20 times the 2-core CPU's rate).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import load_model
from ..model import processing as P
from ..model.visual_prompts import mem_slot_cells
from .checkpoints import save_checkpoint
from .data import TRAIN_STREAM, scene_rng
from .sam_prompts import COLOR_NAMES
from .scenes import SHAPES, make_scene
from .stage_log import StageLog, stage_parser
from .trainer import lr_at, train_device

VISION_STAGE_SEED = 11  # its own seed within the training stream
SHARPEN_STEPS = 10**6  # `sharpen_shapes` measures on steps of that seed no run reaches


def batch_embeddings(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame embeddings the language model reads [sum N, d] and the `<|mem|>` embeddings [K, d]
    of every object (image scenes: one temporal slot each), image after image, from one
    vision-tower call over a whole batch (`SceneBatches`).

    Each image is one window (the window covers a whole frame), so the merger inputs of the batch
    are the images' raster-ordered rows one after another; each object's are averaged over its cells.
    """
    features = model.encode_video(batch["pixels"], batch["grid"])
    rows = features.merger_inputs.split([P.num_video_tokens(grid[None]) for grid in batch["grid"]])
    weights = [c.flatten(1).to(r) for c, r in zip(batch["cells"], rows)]
    pooled = torch.cat([(w @ r) / w.sum(1, keepdim=True) for w, r in zip(weights, rows)])
    return features.embeds, model.msk_proj(pooled)


class SceneBatches(torch.utils.data.IterableDataset):
    """Each step's images, drawn from that step's seed and encoded for the vision tower, with each
    object's merged-token cells and labels. Loader processes take the steps in turn, so a step's
    batch and the order of the batches do not depend on how many there are."""

    def __init__(self, processor, steps: int, batch_size: int, objects: int, first: int = 0):
        self.processor, self.steps, self.first = processor, steps, first
        self.batch_size, self.objects = batch_size, objects

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.first + worker, self.first + self.steps, workers):
            yield self.draw(step)

    def draw(self, step: int) -> dict:
        rng = scene_rng(TRAIN_STREAM, VISION_STAGE_SEED, step)
        pixels, grids, cells, shapes, colors = [], [], [], [], []
        for _ in range(self.batch_size):
            scene = make_scene(rng, 1, num_objects=self.objects)  # the most labels per image
            vision = P.encode_frames(self.processor, scene.frames)
            grid = vision["video_grid_thw"]
            pixels.append(vision["pixel_values_videos"])
            grids.append(grid)
            cells.append(torch.stack([mem_slot_cells(torch.from_numpy(o.masks), grid[0])[0] for o in scene.objects]))
            shapes += [SHAPES.index(o.shape) for o in scene.objects]
            colors += [COLOR_NAMES.index(o.color) for o in scene.objects]
        return {"pixels": torch.cat(pixels), "grid": torch.cat(grids), "cells": cells,
                "shapes": torch.tensor(shapes), "colors": torch.tensor(colors)}  # fmt: skip


def sharpen_shapes(models, processor, gain: float, batches: int = 40, shrink: float = 0.3) -> torch.Tensor:
    """Scale by `gain` the part of the `<|mem|>` embeddings that tells shapes apart, in place.

    After the vision stage the five shapes' mean embeddings are 11-31 from the overall mean where
    the colors' are 98-175 (spread 136): the shape is there for a linear probe, but too small a part
    of the token for the language model to learn to name it. The part is spanned by the shapes'
    linear discriminant directions (the shape means through the inverse within-shape covariance,
    shrunk toward its average variance by `shrink`, so that color, which varies within a shape, is
    mostly left out), measured on the first model over `batches` batches of 8 images; the scaling
    is folded into the last layer of each model's `msk_proj`, which stays one linear map. Returns
    the span's orthonormal basis [d, 4].
    """
    draws = SceneBatches(processor, 0, 8, 4)
    mems, shapes = [], []
    with torch.no_grad():
        for i in range(batches):
            batch = draws.draw(SHARPEN_STEPS + i)
            mems.append(batch_embeddings(models[0], batch)[1])
            shapes.append(batch["shapes"])
    mem, shape = torch.cat(mems), torch.cat(shapes)
    mean = mem.mean(0)
    shape_means = torch.stack([mem[shape == k].mean(0) for k in range(len(SHAPES))]) - mean
    within = mem - mean - shape_means[shape]
    cov = within.T @ within / len(mem)
    cov += shrink * cov.trace() / len(cov) * torch.eye(len(cov), device=cov.device)
    directions = torch.linalg.solve(cov, shape_means.T)
    basis = torch.linalg.svd(directions, full_matrices=False).U[:, : len(SHAPES) - 1]
    lift = (gain - 1) * basis @ basis.T
    for model in models:
        last = model.msk_proj[-1]
        lift_ = lift.to(last.weight)
        last.weight.data += lift_ @ last.weight.data
        last.bias.data += lift_ @ (last.bias.data - mean.to(last.bias))
    return basis


def one_thread(_worker: int) -> None:
    """Loader processes draw one scene at a time; more threads each would only oversubscribe the CPU."""
    torch.set_num_threads(1)


def relative_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, target) / target.var().clamp_min(1e-8)


class Probe(torch.nn.Module):
    """Linear shape and color classifiers on a `<|mem|>` embedding (only for this stage), after a
    normalisation so that they start on an even footing with embeddings of any scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.shape = torch.nn.Linear(dim, len(SHAPES))
        self.color = torch.nn.Linear(dim, len(COLOR_NAMES))

    def forward(self, mem: torch.Tensor, shapes: torch.Tensor, colors: torch.Tensor) -> dict:
        mem = self.norm(mem)
        shape_logits, color_logits = self.shape(mem), self.color(mem)
        return {
            "shape": F.cross_entropy(shape_logits, shapes),
            "color": F.cross_entropy(color_logits, colors),
            "shape_acc": (shape_logits.argmax(-1) == shapes).float().mean().detach(),
            "color_acc": (color_logits.argmax(-1) == colors).float().mean().detach(),
        }


def run(init: str | Path, out_dir: str | Path, steps: int, batch_size: int = 16, lr: float = 5e-4,
        warmup: int = 20, keep: float = 1.0, objects: int = 4, max_minutes: float | None = None,
        log_every: int = 10, loaders: int = 0, sharpen: float | None = None, repeat: int = 1,
        first_batch: int = 0) -> Path:  # fmt: skip
    """`first_batch`: the first batch drawn; a continued run starts past its predecessors' batches, so
    its images are new to the model. `loaders`: processes that draw and encode the scenes (0: this
    one), so that a GPU is fed.
    `sharpen`: first `sharpen_shapes` by that gain (with `steps` 0, only that).
    `repeat`: optimizer steps on each drawn batch. A GPU waits on the loaders (64 images in 0.22 s
    with 14 of them); with 3, one H200 took 385 steps a minute against 274 with 1."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = train_device()
    model, processor = load_model(str(init), device=device, dtype=torch.float32)
    teacher, _ = load_model(str(init), device=device, dtype=torch.float32)
    teacher.requires_grad_(False)
    model.eval()
    if sharpen is not None:
        sharpen_shapes([model, teacher], processor, sharpen)
    torch.manual_seed(VISION_STAGE_SEED)
    probe = Probe(model.config.text_config.hidden_size).to(device)
    params = list(model.model.visual.parameters()) + list(model.msk_proj.parameters())
    # The fresh classifiers learn 10x faster, so their early random gradients barely move the tower.
    groups = [{"params": params, "scale": 1.0}, {"params": list(probe.parameters()), "scale": 10.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    log = StageLog(out_dir / "vision_stage_log.jsonl", max_minutes)
    draws = SceneBatches(processor, -(-steps // repeat), batch_size, objects, first_batch)
    batches = torch.utils.data.DataLoader(draws, batch_size=None,
                                          num_workers=loaders, prefetch_factor=4 if loaders else None,
                                          worker_init_fn=one_thread)  # fmt: skip
    step = 0
    for batch in batches:
        batch = {k: [c.to(device) for c in v] if k == "cells" else v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            kept_embeds, kept_mem = batch_embeddings(teacher, batch)
        for seen in range(min(repeat, steps - step)):
            for group in optimizer.param_groups:
                group["lr"] = group["scale"] * lr_at(step, steps, lr, warmup, log.spent)
            embeds, mem = batch_embeddings(model, batch)
            losses = probe(mem, batch["shapes"], batch["colors"])
            losses["keep"] = relative_mse(embeds, kept_embeds) + relative_mse(mem, kept_mem)
            loss = losses["shape"] + losses["color"] + keep * losses["keep"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + list(probe.parameters()), 1.0)
            optimizer.step()
            step += 1
            if step % log_every == 0 or step == steps:
                log.write(step, loss, losses, seen=seen)  # seen 0: accuracies on images new to the model
        if log.out_of_time(step):
            break
    log.close()
    return save_checkpoint(model, processor, optimizer, step, out_dir)


def main(argv=None) -> int:
    parser = stage_parser("python -m unipixel.train.vision_stage", __doc__, "the checkpoint whose vision tower to train",
                          steps=600, lr=5e-4, batch_help="images per step (every object is classified)")  # fmt: skip
    parser.add_argument("--keep", type=float, default=1.0, help="weight of the feature-keeping term")
    parser.add_argument("--objects", type=int, default=4, help="shapes per image")
    parser.add_argument("--loaders", type=int, default=0, help="processes that draw the scenes (to feed a GPU)")
    parser.add_argument("--sharpen-shapes", type=float, default=None, metavar="GAIN",
                        help="first scale the shape part of the <|mem|> embeddings by GAIN (--steps 0: only that)")
    parser.add_argument("--repeat", type=int, default=1, help="optimizer steps on each drawn batch")
    parser.add_argument("--first-batch", type=int, default=0,
                        help="first batch drawn (a continued run: past its predecessors', for new images)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = run(args.init, args.out_dir, args.steps, args.batch_size, args.lr, args.warmup, args.keep, args.objects,
               args.max_minutes, loaders=args.loaders, sharpen=args.sharpen_shapes, repeat=args.repeat,
               first_batch=args.first_batch)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
