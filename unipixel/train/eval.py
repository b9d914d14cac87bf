"""`python -m unipixel.train.eval --model PATH [--n N] [--seed S]`: score a model on held-out scenes.

Scenes come from the evaluation seed stream, which training never draws from; even-numbered scenes
are images, odd-numbered ones videos of 8-16 frames. Everything goes through the real inference
path: `Session` (PixelQA: a point or box -> `[1] <|seg|>` by memory pre-filling, follow-up
questions with the memory injected; referring segmentation) and `model.generate` (region
description from a `<|mem|>` mask prompt, which `Session` does not phrase the reference way).
PixelQA is also split by whether the object touches another on the prompted frame, and follow-ups by
the quality of the track they are asked about: where the misses come from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np
import torch

from ..metrics import dilate, iou, j_and_f
from ..model import processing as P
from ..model.visual_prompts import mem_slots
from .conversations import DESCRIBE, ref_spec
from .data import EVAL_STREAM, scene_rng
from .own_masks import as_media, visual_prompt
from .scenes import COLORS, SHAPES, Scene, make_scene


OK_TRACK = 0.8  # a PixelQA track this good is named nearly as well as the true mask (NOTES.md)


# ---- where the misses come from -------------------------------------------------------------------
def touches(mask: np.ndarray, others: list[np.ndarray], gap: int = 3) -> bool:
    """Whether `mask` comes within `gap` pixels of any of `others` (where PixelQA masks go wrong:
    SAM 2 takes the touching object too)."""
    near = dilate(mask, gap)
    return any((near & o).any() for o in others)


def words(answer: str) -> list[str]:
    return re.findall(r"[a-z]+", answer.lower())


def first_of(answer: str, vocabulary) -> str | None:
    return next((w for w in words(answer) if w in vocabulary), None)


# ---- the evaluation ----------------------------------------------------------------------------------
def eval_scene(index: int, seed: int) -> Scene:
    rng = scene_rng(EVAL_STREAM, seed, index)
    return make_scene(rng, 1 if index % 2 == 0 else int(rng.integers(8, 17)))


def _generate(model, processor, vision: dict, text: str, mem_masks, max_new_tokens: int) -> str:
    inputs = P.tokenize_chat(processor, [P.user_message(text, with_video=True)], vision["video_grid_thw"])
    with torch.inference_mode():
        out = model.generate(**inputs, **vision, mem_masks=mem_masks, max_new_tokens=max_new_tokens)
    text = processor.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.strip()


def evaluate(model, processor, n: int, seed: int, max_new_tokens: int = 32, log=None) -> dict:
    from ..session import Session

    r = {k: [] for k in ("ref_image_iou", "ref_video_j", "ref_video_f", "qa_iou_point", "qa_iou_box",
                         "qa_iou_touching", "qa_iou_apart", "qa_ok_track", "qa_poor_track",
                         "qa_color", "qa_shape", "region_color", "region_shape", "region_both")}  # fmt: skip
    samples = []
    for i in range(n):
        scene = eval_scene(i, seed)
        rng = scene_rng(EVAL_STREAM, seed, 10**6 + i)  # the questions' own randomness
        session = Session(model, processor, as_media(scene), max_new_tokens=max_new_tokens)
        objs = scene.objects

        # PixelQA: [1] from a point or a box on frame 0, then two follow-ups about [1].
        obj = objs[rng.integers(len(objs))]
        kind = "point" if i % 4 < 2 else "box"
        added = session.add_object(visual_prompt(ref_spec(obj, 0, kind, rng)))
        track_iou = j_and_f(added.masks, obj.masks)[0]
        r[f"qa_iou_{kind}"].append(track_iou)
        contact = touches(obj.masks[0], [o.masks[0] for o in objs if o is not obj])
        r["qa_iou_touching" if contact else "qa_iou_apart"].append(track_iou)
        color = session.ask(f"What color is [{added.id}]?").answer
        shape = session.ask(f"What shape is [{added.id}]?").answer
        answers = [first_of(color, COLORS) == obj.color, first_of(shape, SHAPES) == obj.shape]
        r["qa_color"].append(answers[0])
        r["qa_shape"].append(answers[1])
        r["qa_ok_track" if track_iou >= OK_TRACK else "qa_poor_track"] += answers

        # Referring segmentation, in a fresh conversation on the same media.
        session.reset()
        target = objs[rng.integers(len(objs))]
        turn = session.ask(f"Please segment the {target.name}.")
        pred = turn.new_objects[0].masks if turn.new_objects else np.zeros_like(target.masks)
        if scene.is_video:
            j, f = j_and_f(pred, target.masks)
            r["ref_video_j"].append(j)
            r["ref_video_f"].append(f)
        else:
            r["ref_image_iou"].append(iou(pred[0], target.masks[0]))

        # Region description from the ground-truth mask through `<|mem|>` ([0], spec §4 wording).
        region = objs[rng.integers(len(objs))]
        vision = P.encode_frames(processor, scene.frames)
        with torch.inference_mode():
            features = model.encode_video(vision.pop("pixel_values_videos").to(model.device), vision["video_grid_thw"])
        vision["video_features"] = features
        slots = mem_slots(torch.from_numpy(region.masks), vision["video_grid_thw"][0])
        text = P.mem_prefix([(0, slots)], scene.num_frames) + DESCRIBE
        described = _generate(model, processor, vision, text, [torch.from_numpy(region.masks)], max_new_tokens)
        ok_color, ok_shape = first_of(described, COLORS) == region.color, first_of(described, SHAPES) == region.shape
        r["region_color"].append(ok_color)
        r["region_shape"].append(ok_shape)
        r["region_both"].append(ok_color and ok_shape)
        samples.append({"scene": i, "frames": scene.num_frames, "qa": [obj.name, kind, color, shape],
                        "referring": [target.name, turn.answer], "region": [region.name, described]})  # fmt: skip
        if log is not None and (i + 1) % max(1, n // 10) == 0:
            log(f"  {i + 1}/{n} scenes")
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    j, f = mean(r["ref_video_j"]), mean(r["ref_video_f"])
    metrics = {
        "scenes": n,
        "images": len(r["ref_image_iou"]),
        "videos": len(r["ref_video_j"]),
        "referring_image_miou": mean(r["ref_image_iou"]),
        "referring_video_j": j,
        "referring_video_f": f,
        "referring_video_jf": (j + f) / 2,
        "pixelqa_iou_point": mean(r["qa_iou_point"]),
        "pixelqa_iou_box": mean(r["qa_iou_box"]),
        "pixelqa_iou": mean(r["qa_iou_point"] + r["qa_iou_box"]),
        "followup_color_acc": mean(r["qa_color"]),
        "followup_shape_acc": mean(r["qa_shape"]),
        "followup_acc": mean(r["qa_color"] + r["qa_shape"]),
        # Where the misses are: objects touching another on the prompted frame, and poor tracks.
        "pixelqa_touching_share": len(r["qa_iou_touching"]) / n,
        "pixelqa_iou_touching": mean(r["qa_iou_touching"]),
        "pixelqa_iou_apart": mean(r["qa_iou_apart"]),
        "followup_ok_track_share": len(r["qa_ok_track"]) / (2 * n),
        "followup_acc_ok_track": mean(r["qa_ok_track"]),
        "followup_acc_poor_track": mean(r["qa_poor_track"]),
        "region_color_acc": mean(r["region_color"]),
        "region_shape_acc": mean(r["region_shape"]),
        "region_acc": mean(r["region_both"]),
    }
    return {"metrics": metrics, "samples": samples}


def format_table(m: dict, seed: int, seconds: float) -> str:
    rows = [
        ("referring segmentation", "image mIoU", m["referring_image_miou"], f"{m['images']} images"),
        ("", "video J&F", m["referring_video_jf"],
         f"J {m['referring_video_j']:.3f}, F {m['referring_video_f']:.3f}; {m['videos']} videos"),
        ("PixelQA [1] mask", "IoU (point + box)", m["pixelqa_iou"],
         f"point {m['pixelqa_iou_point']:.3f}, box {m['pixelqa_iou_box']:.3f}; touching another "
         f"{m['pixelqa_iou_touching']:.3f} ({m['pixelqa_touching_share']:.0%}), apart {m['pixelqa_iou_apart']:.3f}"),
        ("PixelQA follow-up", "exact match", m["followup_acc"],
         f"color {m['followup_color_acc']:.3f}, shape {m['followup_shape_acc']:.3f}; on tracks of IoU >= {OK_TRACK} "
         f"{m['followup_acc_ok_track']:.3f} ({m['followup_ok_track_share']:.0%}), below {m['followup_acc_poor_track']:.3f}"),
        ("region description", "color+shape acc", m["region_acc"],
         f"color {m['region_color_acc']:.3f}, shape {m['region_shape_acc']:.3f}"),
    ]  # fmt: skip
    lines = [f"eval-shapes: {m['scenes']} held-out scenes (seed {seed}), {seconds:.0f} s"]
    lines += [f"  {a:<24}{b:<20}{v:6.3f}   ({c})" for a, b, v, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unipixel.train.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, e.g. assets/unipixel-shapes")
    parser.add_argument("--n", type=int, default=500, help="number of held-out scenes (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (its own stream, never trained on)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (bfloat16: what a GPU runs by default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write metrics and per-scene answers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..model import load_model

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    start = time.time()
    result = evaluate(model, processor, args.n, args.seed, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result["metrics"], args.seed, time.time() - start))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "seed": args.seed, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
