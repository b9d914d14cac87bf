"""Train a small UniPixel end to end on synthetic shape scenes.

    python -m unipixel.train.trainer OUT_DIR [--steps N] [--batch-size B] [--workers W] [--max-minutes M]
    python -m unipixel.train.trainer OUT_DIR --export assets/unipixel-shapes

One step = a batch of conversations (each about its own scene, 1-4 turns unless `--turns` says
otherwise) in every worker: the LM loss on the assistant tokens plus the SAM 2 mask losses on
every `<|seg|>`. The `<|seg|>` masks are decoded the way inference decodes
them (spec §4): the seg tokens join the sparse prompt of frame 0 only (the predictor's own forward
hook), then SAM 2 tracks frames 1..T-1 with its memory, here with gradients flowing through it.
Checkpoints are Hugging Face folders (`checkpoint-STEP/`, plus `trainer_state.pt` to resume).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..model import load_model
from .checkpoints import export, latest_checkpoint, save_checkpoint
from .data import FRAMES, TRAIN_STREAM, sample_batch, scene_rng
from .fits import SPELLINGS
from .keep_segs import WriteGuard, seg_read_directions
from .losses import total_mask_loss
from .own_masks import OwnMasks
from .parallel import agreed_spent, average_gradients, spawn
from .sam_prompts import load_color_prompts, scene_losses
from .scenes import make_scene
from .shapes_model import build_model
from .stages import start_stage
from .steps import batch_losses


def train_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def lr_at(step: int, total: int, base: float, warmup: int, spent: float = 0.0) -> float:
    """Linear warmup, then a cosine down to a tenth of `base`. `spent` is the share of a time budget
    used so far: the decay ends with the steps or the budget, whichever runs out first."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), spent))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out_dir: str | Path, steps: int, workers: int = 1, **options) -> Path:
    """Train (or resume) into `out_dir`. With `workers` > 1, that many processes of one thread each
    train on different conversations and average their gradients every step (see `parallel`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn(_train, workers, out_dir, steps, **options)
    return latest_checkpoint(out_dir)


def _train(out_dir: Path, steps: int, seed: int = 0, lr: float = 1e-3, warmup: int = 200, accum: int = 1,
           save_every: int = 250, resume: bool = True, log_every: int = 10, max_minutes: float | None = None,
           video_prob: float = 0.5, frames=FRAMES, qa_prob: float = 0.0, pixelqa_prob: float = 0.0,
           turns: tuple[int, int] | None = None, init_from: str | Path | None = None, batch_size: int = 1,
           reset_llm: bool = False, untie: bool = False, hold: dict[str, int] | None = None,
           refit_seg: bool = False, fit_seg: bool = False, fresh_decoder: bool = False, color_prompts: str | Path | None = None,
           prompted: int = 4, distill: float = 0.0, ref_targets: bool = False, attend_mem: float = 0.0,
           attend_head: tuple[int, int] = (1, 2), redraw_head: bool = False, fit_shape: str | None = None,
           place: float = 0.0, train_only: tuple[str, ...] = (), route_ref: float | None = None,
           calibrate: bool = False, mem_noise: float = 0.0, mem_own: float = 0.0, keep_segs: int = 0,
           identity_read: bool = False, rank: int = 0, workers: int = 1) -> None:
    lead = rank == 0  # the process that logs and saves

    def say(line: str) -> None:
        if lead:
            print(line, flush=True)

    hold = hold or {}
    device = train_device()
    if color_prompts is not None:  # fixed prompts SAM 2 must keep answering to (see sam_stage)
        color_prompts = load_color_prompts(color_prompts).to(device)
    last = latest_checkpoint(out_dir) if resume else None
    if last is not None or init_from is not None:
        model, processor = load_model(str(last or init_from), device=device, dtype=torch.float32)
        start, state = 0, None
        if last is not None:  # resume; `init_from` only starts a new stage from its weights
            state = torch.load(last / "trainer_state.pt", weights_only=False)
            start = state["step"]
            torch.set_rng_state(state["torch_rng"])
        else:
            draw = {"video_prob": video_prob, "frames": frames, "qa_prob": qa_prob, "turns": turns}
            start_stage(model, processor, seed, say, draw, color_prompts,
                        reset_llm=reset_llm, untie=untie, redraw_head=redraw_head, fit_shape=fit_shape,
                        fresh_decoder=fresh_decoder, route_ref=route_ref, calibrate=calibrate,
                        identity_read=identity_read, refit_seg=refit_seg, fit_seg=fit_seg)  # fmt: skip
    else:
        model, processor = build_model(seed)
        model.to(device)
        start, state = 0, None
    # Eval mode throughout: no dropout anywhere, and SAM 2 takes its inference code paths.
    model.eval()
    if attend_mem:  # only eager attention hands out its probabilities
        model.set_attn_implementation("eager")
    if train_only:  # the rest gets no gradient at all (cheaper than --hold, which still computes one)
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in train_only))
    params = [p for p in model.parameters() if p.requires_grad]
    own_masks = OwnMasks(model, processor, mem_own) if mem_own else None
    teacher = copy.deepcopy(model).requires_grad_(False) if keep_segs else None
    guard = WriteGuard(model, seg_read_directions(model, keep_segs)) if keep_segs else None
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    log = open(out_dir / "train_log.jsonl", "a") if lead else None
    if lead:
        print(f"training from step {start} to {steps} on {device} ({workers} process(es)); "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters", flush=True)  # fmt: skip
    began, meter, counts = time.time(), defaultdict(float), defaultdict(int)
    step, spent = start, 0.0
    if steps == 0 and lead:  # only what --init-from changes (a fit, a redraw), saved as a checkpoint
        save_checkpoint(model, processor, optimizer, 0, out_dir)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, spent)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            rng = scene_rng(TRAIN_STREAM, seed, (step * workers + rank) * accum + micro)
            batch = sample_batch(rng, batch_size, video_prob, frames, qa_prob, turns, pixelqa_prob, mem_noise, own_masks)
            losses = batch_losses(model, processor, batch, color_prompts, distill, ref_targets, attend_mem, attend_head,
                                  place, teacher)
            if color_prompts is not None and prompted:
                parts = [scene_losses(model, make_scene(rng, 1), "color", color_prompts, rng) for _ in range(prompted)]
                losses["prompted"] = total_mask_loss({k: sum(q[k] for q in parts) / prompted for k in parts[0]})
                losses["total"] = losses["total"] + losses["prompted"]
            if losses["total"].requires_grad:  # with --train-only, a batch without segs may give nothing to learn
                (losses["total"] / accum).backward()
            for k, v in losses.items():
                meter[k] += float(v.detach())
                counts[k] += 1
            meter["n_" + ("video" if batch[0][0].is_video else "image")] += len(batch)
        if workers > 1:
            average_gradients(params, workers)
        for name, until in hold.items():  # AdamW leaves parameters without a gradient as they are
            if step < until:
                for p in model.get_submodule(name).parameters():
                    p.grad = None
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if guard is not None:
            guard()
        step += 1
        meter["steps"] += 1
        if lead and (step % log_every == 0 or step == steps):
            meter.pop("steps")
            row = {"step": step, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - began, 1)}
            row.update({k: round(v / counts[k], 4) if not k.startswith("n_") else v for k, v in meter.items()})
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
            meter.clear()
            counts.clear()
        spent = agreed_spent((time.time() - began) / (60 * max_minutes) if max_minutes is not None else 0.0, workers)
        out_of_time = spent > 1
        if lead and (step % save_every == 0 or step == steps or out_of_time):
            save_checkpoint(model, processor, optimizer, step, out_dir)
        if out_of_time:
            if lead:
                print(f"stopping at step {step}: {max_minutes} minutes are up", flush=True)
            break
    if log is not None:
        log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unipixel.train.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2, help="threads of a single process")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel processes of one thread each")
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES),
                        help="frame counts that training videos are drawn from")
    parser.add_argument("--qa-prob", type=float, default=0.0, help="share of cheap mask-prompt-only conversations")
    parser.add_argument("--pixelqa-prob", type=float, default=0.0,
                        help="share of conversations that open with PixelQA, as the playground does")
    parser.add_argument("--video-prob", type=float, default=0.5)
    parser.add_argument("--turns", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="turns per conversation (default: 1-4)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="start a new stage from these weights (fresh optimizer and schedule)")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per forward (videos: a quarter)")
    parser.add_argument("--reset-llm", action="store_true",
                        help="with --init-from: keep its vision tower and SAM 2, start the language side afresh")
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="with --init-from: give the LM head its own weights, re-draw the shape words' embeddings")
    parser.add_argument("--hold", nargs="+", default=[], metavar="MODULE=STEPS",
                        help="keep a module as it is for the first STEPS steps, e.g. sam2=100 seg_head=1000")
    parser.add_argument("--refit-seg-head", action="store_true",
                        help="with --init-from: re-initialise seg_head to read what varies in the seg state")
    parser.add_argument("--fit-seg-head", action="store_true",
                        help="with --init-from and --color-prompts: refit seg_head, then train it alone onto the color prompts")
    parser.add_argument("--fresh-decoder", action="store_true",
                        help="with --init-from: re-initialise SAM 2's mask decoder (image encoder and memory kept)")
    parser.add_argument("--color-prompts", type=Path, default=None, metavar="PT",
                        help="color_tokens.pt of the SAM stage: each step also segments --prompted images by them")
    parser.add_argument("--prompted", type=int, default=4, help="color-prompted images per step and process")
    parser.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                        help="with --color-prompts: pull each seg prompt toward its object's color prompt")
    parser.add_argument("--ref-targets", action="store_true",
                        help="with --distill: pull PixelQA seg prompts toward SAM 2's own tokens of their point or box")
    parser.add_argument("--route-ref-place", type=float, nargs="?", const=3.0, default=None, metavar="GAIN",
                        help="with --init-from: build the route that carries a <|ref|>'s place into the seg prompt "
                             "(unipixel/train/ref_route.py)")
    parser.add_argument("--calibrate-place", action="store_true",
                        help="with --init-from: rescale the seg prompt's place numbers to SAM 2's own (calibrate_place)")
    parser.add_argument("--place", type=float, default=0.0, metavar="WEIGHT",
                        help="with --ref-targets: that extra weight on the dimensions of the seg prompt that carry the place")
    parser.add_argument("--train-only", nargs="+", default=[], metavar="PREFIX",
                        help="train only the parameters whose names start with one of these")
    parser.add_argument("--redraw-shape-head", action="store_true",
                        help="with --init-from: give the LM head rows of the shape words distinct directions again")
    parser.add_argument("--fit-shape-head", nargs="?", const="all", choices=("all", *SPELLINGS), default=None,
                        help="with --init-from: fit the LM head rows of the shape words (all, or one spelling) to "
                             "the states before them; with --steps 0, only that")
    parser.add_argument("--attend-mem", type=float, default=0.0, metavar="WEIGHT",
                        help="pull one head's attention onto the <|mem|> tokens of mask-prompt answers, "
                             "from each PixelQA <|seg|> onto its <|ref|> and from a referring answer's shape "
                             "word onto the question's")
    parser.add_argument("--attend-head", type=int, nargs=2, default=(1, 2), metavar=("LAYER", "HEAD"),
                        help="the head --attend-mem pulls")
    parser.add_argument("--mem-noise", type=float, default=0.0, metavar="P",
                        help="how often a follow-up's memory mask is grown or shrunk and shifted like SAM 2's masks")
    parser.add_argument("--keep-segs", type=int, default=0, metavar="K",
                        help="with --distill: pull every seg prompt toward that of the starting weights (no "
                             "--color-prompts needed) and keep the trained layers from writing along the K "
                             "directions seg_head reads hardest, so training keeps the route and the referring prompts")
    parser.add_argument("--mem-own", type=float, default=0.0, metavar="P",
                        help="how often a follow-up's memory is the model's own track of the object from a point or "
                             "box (made by the weights being trained, as the playground makes it)")
    parser.add_argument("--identity-read", action="store_true",
                        help="with --init-from: two more heads of SAM 2's first token-to-image attention read "
                             "the object under a point or box (identity_read.py)")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="instead of training, write the latest checkpoint of OUT_DIR to DIR in float16")
    parser.add_argument("--sam-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="with --export: take SAM 2 from this checkpoint (a SAM stage run in parallel)")
    parser.add_argument("--vision-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="with --export: take the vision tower and <|mem|> projector from this checkpoint")
    args = parser.parse_args(argv)
    if ((args.distill and not args.keep_segs) or args.fit_seg_head) and args.color_prompts is None:
        parser.error("--distill and --fit-seg-head need the SAM stage's --color-prompts")
    torch.set_num_threads(args.threads)
    if args.export is not None:
        print(export(latest_checkpoint(args.out_dir), args.export, args.sam_from, args.vision_from))
        return 0
    train(args.out_dir, args.steps, workers=args.workers, seed=args.seed, lr=args.lr, warmup=args.warmup,
          accum=args.accum, save_every=args.save_every, resume=not args.no_resume, max_minutes=args.max_minutes,
          qa_prob=args.qa_prob, pixelqa_prob=args.pixelqa_prob, video_prob=args.video_prob, frames=tuple(args.frames),
          turns=tuple(args.turns) if args.turns else None, init_from=args.init_from, batch_size=args.batch_size,
          reset_llm=args.reset_llm, untie=args.untie_embeddings,
          hold={name: int(until) for name, until in (h.split("=") for h in args.hold)}, refit_seg=args.refit_seg_head, fit_seg=args.fit_seg_head,
          fresh_decoder=args.fresh_decoder,
          color_prompts=args.color_prompts, prompted=args.prompted, distill=args.distill,
          ref_targets=args.ref_targets, attend_mem=args.attend_mem, attend_head=tuple(args.attend_head),
          redraw_head=args.redraw_shape_head, fit_shape=args.fit_shape_head, place=args.place,
          train_only=tuple(args.train_only), route_ref=args.route_ref_place,
          calibrate=args.calibrate_place, mem_noise=args.mem_noise, mem_own=args.mem_own,
          keep_segs=args.keep_segs, identity_read=args.identity_read)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
