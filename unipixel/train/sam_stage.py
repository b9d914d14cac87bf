"""A prompted stage for SAM 2 alone: learn to pick one shape out of several.

    python -m unipixel.train.sam_stage INIT_CHECKPOINT OUT_DIR [--steps N] [--batch-size B]

Trained only through `<|seg|>` tokens (uninformative while the language model was still learning),
the small SAM 2 of the shapes model settled on segmenting every shape of the frame at once: the
first self-attention of its mask decoder, which has no residual path in SAM's two-way transformer,
came to attend to one fixed output token whatever the prompt, so no prompt reached the mask and no
gradient reached the prompt (two different point prompts gave the same mask to 8 digits).
`--fresh-decoder` re-initialises the mask decoder (keeping the image encoder and the memory parts),
and every object of an image is then prompted directly, through the same frame-0 path the seg
tokens take (`track_with_grad`), by one of:
- SAM 2's own point or box embedding (two tokens, like the seg tokens): picking by place;
- a learned token pair for the object's color (not part of the model; saved as `color_tokens.pt`):
  picking by color, the way a referring seg token must.
Same mask losses as the full trainer. The output is a whole-model checkpoint to `--init-from`.
On the shapes model, 1,268 steps of 16 images (20 min, 2 CPU threads) brought color prompts to a
Jaccard of 0.89; point and box prompts stayed at 0.5 (the foreground) in that time.

`--video-prob` makes a share of the scenes short videos: the prompt conditions frame 0 and SAM 2
tracks the rest with its memory, which image scenes never train. `--color-prompts` starts from the
color prompts of an earlier SAM stage and keeps them fixed: a language model already distilled
toward them keeps its seg prompts valid while SAM 2 learns to track; `--feature-scale` first brings
the frame features SAM 2's memory reads back to the size of what they are added to and compared
with (stages 14-15 in NOTES.md), without which tracked frames showed every shape at once.
`--point-channel` gives the mask decoder a clean channel for where a point or box is (see
`open_point_channel`), without which point prompts never got past the foreground (stage 16).
`--workers W` runs W data-parallel processes (`parallel`): 14 on one H200 drew 41 scenes a second,
about 11 times one 2-core CPU process.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..model import load_model
from .checkpoints import latest_checkpoint, save_checkpoint
from .data import FRAMES, TRAIN_STREAM, scene_rng
from .losses import total_mask_loss
from .parallel import average_gradients, spawn
from .sam_prompts import COLOR_NAMES, KINDS, POINT_DIMS, load_color_prompts, place_dims, save_color_prompts, scene_losses
from .scenes import make_scene
from .stage_log import StageLog, stage_parser
from .stages import fresh_mask_decoder
from .trainer import lr_at, train_device

SAM_STAGE_SEED = 7  # its own seed within the training stream: scenes differ from the trainer's


@torch.no_grad()
def _scale_conv(conv: torch.nn.Conv2d, factor: float) -> None:
    """Multiply a convolution's output by `factor` (weight and bias)."""
    conv.weight.mul_(factor)
    conv.bias.mul_(factor)


def _stride16_convs(sam) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d]:
    """The FPN convolutions whose sum is the stride-16 frame features: that level's lateral one and
    the coarser one added into it."""
    neck = sam.image_encoder.neck
    return neck.convs[0].conv, neck.convs[1].conv


def scale_mask_memory(model, gain: float) -> None:
    """Scale the mask part of SAM 2's memory by `gain`.

    A memory is the sum of projected frame features and an embedding of the predicted mask. In the
    shapes model the features grew to about 23 times the norm of the mask embedding, and the part
    that tells one object's mask from another's was 1% of the memory. Alone it did not teach SAM 2
    to track (memory attention stayed saturated, see `scale_frame_features`); kept for comparison.
    """
    _scale_conv(model.sam2.memory_encoder.mask_downsampler.encoder[-1], gain)


def scale_frame_features(model, scale: float) -> None:
    """Scale the stride-16 frame features of SAM 2's image encoder (the FPN level the mask decoder,
    the memory encoder and memory attention read; the finer levels are left as they are).

    In the shapes model they grew to a norm of about 280 per position, against about 6 for the
    positional encodings and 8 for the normalised memory-conditioned features of tracked frames:
    the keys of memory attention then saturate its softmax on one or two memory positions for every
    query, so tracked frames get no object identity and no gradient to learn one.
    """
    for conv in _stride16_convs(model.sam2):
        _scale_conv(conv, scale)


def open_point_channel(model, freq: float = 0.45, gain: float = 7.4) -> None:
    """Give SAM 2's mask decoder a clean channel for where a point or box prompt is, and one head
    in each direction of its first layer that attends by that place alone.

    Trained from prompts, this small decoder never learned to find the object under a point (its
    Jaccard stayed at the foreground level, 0.5, over thousands of steps): its positional encodings
    were random frequencies added onto content of the same size, read through heads of 4
    dimensions. Here the prompt encoder's frequency matrix keeps two frequencies, one along x and
    one along y, low enough (`freq` < 0.5 cycles per unit of SAM's [-1, 1] coordinates) to change
    once across the frame, and every other column is zeroed, so the encodings of a prompt and of
    each frame position live in 4 dimensions (the sine and cosine of each). Those dimensions are
    cleared in everything else the first layer adds up there (the frame features of this level, the
    empty-memory and empty-mask embeddings, the label and output tokens, the first layer's norms).
    The first head of the token-to-image and image-to-token attentions (4 dimensions here; two
    heads of one frequency each where heads are smaller) then compares only those 4 dimensions,
    scaled by `gain`: its score is largest at the prompt's place, a cell away it is
    about 3 lower, so the prompt token reads the object under it and the frame around the prompt
    reads the prompt. The rest is left to training.
    """
    sam = model.sam2
    encoder, decoder = sam.sam_prompt_encoder, sam.sam_mask_decoder
    matrix = encoder.pe_layer.positional_encoding_gaussian_matrix
    dims = place_dims(encoder)
    with torch.no_grad():
        matrix.zero_()
        matrix[0, POINT_DIMS[0]], matrix[1, POINT_DIMS[1]] = freq, freq
        for conv in _stride16_convs(sam):
            conv.weight[dims] = 0
            conv.bias[dims] = 0
        layer = decoder.transformer.layers[0]
        cleared = [sam.no_mem_embed[0, 0], encoder.no_mask_embed.weight[0], encoder.not_a_point_embed.weight[0],
                   layer.norm1.weight, layer.norm1.bias, layer.norm3.weight, layer.norm3.bias,
                   *(e.weight.T for e in encoder.point_embeddings), decoder.iou_token.weight.T,
                   decoder.mask_tokens.weight.T, decoder.obj_score_token.weight.T]  # fmt: skip
        for t in cleared:
            t[dims] = 0
        for attention in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token):
            head = attention.internal_dim // attention.num_heads
            rows = -(-len(dims) // head) * head  # the first heads, as many as the 4 dimensions fill
            for proj in (attention.q_proj, attention.k_proj):
                proj.weight[:rows] = 0
                proj.bias[:rows] = 0
                proj.weight[list(range(len(dims))), dims] = gain


def draw_step(index: int, batch_size: int, kind_probs, video_prob: float, frames):
    """The prompt kinds and scenes of step `index`, and the generator that goes on to place their
    prompts. Seeded by the index alone, so a run continued from `first_step` meets new scenes."""
    rng = scene_rng(TRAIN_STREAM, SAM_STAGE_SEED, index)
    kinds = [str(k) for k in rng.choice(KINDS, size=batch_size, p=kind_probs)]
    scenes = [make_scene(rng, int(rng.choice(frames)) if rng.random() < video_prob else 1) for _ in kinds]
    return kinds, scenes, rng


def run(init: str | Path, out_dir: str | Path, steps: int, workers: int = 1, **options) -> Path:
    """Train the SAM 2 of `init` into `out_dir` (options: see `_stage`). With `workers` > 1, that
    many processes each draw `batch_size` scenes a step and average their gradients (`parallel`);
    the log's Jaccards are the first process's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn(_stage, workers, init, out_dir, steps, **options)
    return latest_checkpoint(out_dir)


def _stage(init: str | Path, out_dir: Path, steps: int, batch_size: int = 16, lr: float = 5e-4, warmup: int = 20,
           fresh_decoder: bool = False, max_minutes: float | None = None, log_every: int = 10,
           video_prob: float = 0.0, frames=FRAMES, color_prompts: str | Path | None = None,
           kind_probs=(0.5, 0.25, 0.25), mask_memory_gain: float = 1.0, feature_scale: float = 1.0,
           point_channel: bool = False, hold_encoder: bool = False, first_step: int = 0, rank: int = 0,
           workers: int = 1) -> None:  # fmt: skip
    """`first_step`: the step whose scenes are drawn first (a continued run: past its predecessors').
    Process `rank` of `workers` draws the scenes of step `first_step + step * workers + rank`."""
    lead = rank == 0  # the process that logs and saves
    device = train_device()
    model, processor = load_model(str(init), device=device, dtype=torch.float32)
    if fresh_decoder:
        fresh_mask_decoder(model, SAM_STAGE_SEED)
    scale_mask_memory(model, mask_memory_gain)  # both are no-ops at their default of 1
    scale_frame_features(model, feature_scale)
    if point_channel:
        open_point_channel(model)
    model.eval()  # SAM 2's inference code paths, as in the trainer
    # With the point channel the image encoder is held: the frame features keep its dimensions clear.
    hold_encoder = hold_encoder or point_channel
    params = [p for n, p in model.sam2.named_parameters() if not (hold_encoder and n.startswith("image_encoder."))]
    if color_prompts is not None:
        color_tokens = load_color_prompts(color_prompts).to(device)
    else:
        generator = torch.Generator().manual_seed(SAM_STAGE_SEED)
        start = torch.randn(len(COLOR_NAMES), 2, model.sam2.hidden_dim, generator=generator)
        color_tokens = torch.nn.Parameter(start.to(device))
        params.append(color_tokens)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, meter = 0, defaultdict(float)
    log = StageLog(out_dir / "sam_stage_log.jsonl", max_minutes, rank, workers)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, log.spent)
        kinds, scenes, rng = draw_step(first_step + step * workers + rank, batch_size, kind_probs, video_prob, frames)
        parts = [scene_losses(model, scene, k, color_tokens, rng) for scene, k in zip(scenes, kinds)]
        losses = {k: sum(p[k] for p in parts) / batch_size for k in parts[0]}
        loss = total_mask_loss(losses)
        for part, kind, scene in zip(parts, kinds, scenes):  # which ways of picking are learned, for the log
            for key in (kind, "video") if scene.is_video else (kind,):
                meter[key] += float(part["jaccard"])
                meter["n_" + key] += 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if workers > 1:
            average_gradients(params, workers)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if lead and (step % log_every == 0 or step == steps):
            scores = {f"jaccard_{k}": round(meter[k] / meter["n_" + k], 4) for k in (*KINDS, "video") if meter["n_" + k]}
            log.write(step, loss, losses, **scores)
            meter.clear()
        if log.out_of_time(step):
            break
    log.close()
    if lead:
        # Kept beside the checkpoint: prompts this SAM 2 answers to, for later stages that want them.
        save_color_prompts(color_tokens, out_dir / "color_tokens.pt")
        save_checkpoint(model, processor, optimizer, step, out_dir)


def main(argv=None) -> int:
    parser = stage_parser("python -m unipixel.train.sam_stage", __doc__,
                          "the checkpoint whose SAM 2 to train (the rest is kept as is)", steps=600, lr=5e-4,
                          batch_help="scenes per step (every object is prompted)")  # fmt: skip
    parser.add_argument("--fresh-decoder", action="store_true", help="re-initialise SAM 2's mask decoder first")
    parser.add_argument("--video-prob", type=float, default=0.0, help="share of scenes that are videos")
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES), help="frame counts of the videos")
    parser.add_argument("--color-prompts", type=Path, default=None, metavar="PT",
                        help="color_tokens.pt of an earlier SAM stage: start from them and keep them fixed")
    parser.add_argument("--kind-probs", type=float, nargs=3, default=[0.5, 0.25, 0.25], metavar=("COLOR", "POINT", "BOX"),
                        help="how often an object is prompted by its color, a point or a box")
    parser.add_argument("--mask-memory-gain", type=float, default=1.0,
                        help="scale the mask embedding of SAM 2's memory first (see scale_mask_memory)")
    parser.add_argument("--feature-scale", type=float, default=1.0,
                        help="scale SAM 2's stride-16 frame features first (see scale_frame_features)")
    parser.add_argument("--point-channel", action="store_true",
                        help="first give the mask decoder a channel for where prompts are (see open_point_channel)")
    parser.add_argument("--hold-encoder", action="store_true",
                        help="hold the image encoder (as --point-channel does): to train a SAM 2 that has the channel")
    parser.add_argument("--first-step", type=int, default=0,
                        help="step whose scenes are drawn first (a continued run: past its predecessors'; "
                             "a run of S steps in W workers draws S * W steps' scenes)")
    parser.add_argument("--workers", type=int, default=1,
                        help="data-parallel processes of one thread each, every one drawing --batch-size scenes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = run(args.init, args.out_dir, args.steps, args.workers, batch_size=args.batch_size, lr=args.lr,
               warmup=args.warmup, fresh_decoder=args.fresh_decoder, max_minutes=args.max_minutes,
               video_prob=args.video_prob, frames=tuple(args.frames), color_prompts=args.color_prompts,
               kind_probs=args.kind_probs, mask_memory_gain=args.mask_memory_gain,
               feature_scale=args.feature_scale, point_channel=args.point_channel,
               hold_encoder=args.hold_encoder, first_step=args.first_step)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
