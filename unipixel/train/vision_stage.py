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
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import load_model
from ..model import processing as P
from .sam_prompts import COLOR_NAMES
from .scenes import SHAPES, make_scene
from .stage_log import StageLog, stage_parser
from .trainer import TRAIN_STREAM, lr_at, save_checkpoint, scene_rng

VISION_STAGE_SEED = 11  # its own seed within the training stream


def object_embeddings(model, vision: dict, masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame embeddings the language model reads [N, d] and one `<|mem|>` embedding per object
    mask [K, d] (image scenes: one temporal slot each), from the processor's output `vision`."""
    features = model.encode_video(vision["pixel_values_videos"], vision["video_grid_thw"])
    return features.embeds, model.encode_mem_masks(masks, features)


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

    def forward(self, mem: torch.Tensor, scene) -> dict:
        shapes = torch.tensor([SHAPES.index(o.shape) for o in scene.objects])
        colors = torch.tensor([COLOR_NAMES.index(o.color) for o in scene.objects])
        mem = self.norm(mem)
        shape_logits, color_logits = self.shape(mem), self.color(mem)
        return {
            "shape": F.cross_entropy(shape_logits, shapes, reduction="sum"),
            "color": F.cross_entropy(color_logits, colors, reduction="sum"),
            "shape_acc": (shape_logits.argmax(-1) == shapes).float().sum().detach(),
            "color_acc": (color_logits.argmax(-1) == colors).float().sum().detach(),
        }


def run(init: str | Path, out_dir: str | Path, steps: int, batch_size: int = 16, lr: float = 5e-4,
        warmup: int = 20, keep: float = 1.0, objects: int = 4, max_minutes: float | None = None,
        log_every: int = 10) -> Path:  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(str(init), device="cpu", dtype=torch.float32)
    teacher, _ = load_model(str(init), device="cpu", dtype=torch.float32)
    teacher.requires_grad_(False)
    model.eval()
    torch.manual_seed(VISION_STAGE_SEED)
    probe = Probe(model.config.text_config.hidden_size)
    params = list(model.model.visual.parameters()) + list(model.msk_proj.parameters())
    # The fresh classifiers learn 10x faster, so their early random gradients barely move the tower.
    groups = [{"params": params, "scale": 1.0}, {"params": list(probe.parameters()), "scale": 10.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, log = 0, StageLog(out_dir / "vision_stage_log.jsonl", max_minutes)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * lr_at(step, steps, lr, warmup, log.spent())
        rng = scene_rng(TRAIN_STREAM, VISION_STAGE_SEED, step)
        totals, labelled = {}, 0
        for _ in range(batch_size):
            scene = make_scene(rng, 1, num_objects=objects)  # the most labels per image
            vision = P.encode_frames(processor, scene.frames)  # once for the model and its reference
            masks = [torch.from_numpy(o.masks) for o in scene.objects]
            embeds, mem = object_embeddings(model, vision, masks)
            with torch.no_grad():
                kept_embeds, kept_mem = object_embeddings(teacher, vision, masks)
            parts = probe(mem, scene)
            parts["keep"] = (relative_mse(embeds, kept_embeds) + relative_mse(mem, kept_mem)) * len(mem)
            totals = {k: totals.get(k, 0.0) + v for k, v in parts.items()}
            labelled += len(mem)
        losses = {k: v / labelled for k, v in totals.items()}  # per object
        loss = losses["shape"] + losses["color"] + keep * losses["keep"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(probe.parameters()), 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == steps:
            log.write(step, loss, losses)
        if log.out_of_time(step):
            break
    log.close()
    return save_checkpoint(model, processor, optimizer, step, out_dir)


def main(argv=None) -> int:
    parser = stage_parser("python -m unipixel.train.vision_stage", __doc__, "the checkpoint whose vision tower to train",
                          steps=600, lr=5e-4, batch_help="images per step (every object is classified)")  # fmt: skip
    parser.add_argument("--keep", type=float, default=1.0, help="weight of the feature-keeping term")
    parser.add_argument("--objects", type=int, default=4, help="shapes per image")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = run(args.init, args.out_dir, args.steps, args.batch_size, args.lr, args.warmup, args.keep, args.objects,
               args.max_minutes)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
