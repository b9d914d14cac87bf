"""`python -m unipixel`: build the tiny offline checkpoint, ask one question about one media file, run a prompt set, compare two runs.

    python -m unipixel tiny OUT_DIR [--seed N]
    python -m unipixel infer MEDIA "PROMPT" [--point X,Y[@F]] [--box X1,Y1,X2,Y2[@F]] [--mask PNG[@F]] ...
    python -m unipixel batch PROMPTS.jsonl --model M --out RUN/
    python -m unipixel compare RUN_A RUN_B --html report.html

Coordinates are pixels of the original media; F is a sampled-frame index (default 0).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError, UniPixelError

EXIT_ERROR = 2  # a UniPixelError: bad media, prompt or checkpoint (argparse uses 2 for bad flags too)
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---- flag parsing ------------------------------------------------------------------------------
def _split_frame(text: str) -> tuple[str, int]:
    """'VALUE@F' -> (VALUE, F); no '@F' means frame 0."""
    value, at, frame = text.rpartition("@")
    if not at:
        return text, 0
    if not frame.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the frame after '@' must be a non-negative integer")
    return value, int(frame)


def _numbers(text: str, count: int, form: str) -> tuple[tuple[float, ...], int]:
    value, frame = _split_frame(text)
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != count:
        raise argparse.ArgumentTypeError(f"{text!r} is not {form}")
    return numbers, frame


def parse_point(text: str) -> tuple[float, float, int]:
    (x, y), frame = _numbers(text, 2, "X,Y[@F]")
    return x, y, frame


def parse_box(text: str) -> tuple[tuple[float, float, float, float], int]:
    return _numbers(text, 4, "X1,Y1,X2,Y2[@F]")


def parse_mask(text: str) -> tuple[Path, int]:
    value, at, frame = text.rpartition("@")
    if at and frame.isdigit():  # a file name may itself contain '@'
        return Path(value), int(frame)
    return Path(text), 0


@dataclass
class DrawnPrompt:
    """One flag as typed: kind 'point' (positive or not), 'box' or 'mask'."""

    kind: str
    frame: int
    value: object
    positive: bool = True


class _AppendPrompt(argparse.Action):
    """Collect --point/--neg-point/--box/--mask in command-line order, so objects get ids in that order."""

    def __init__(self, *args, kind: str, positive: bool = True, **kwargs):
        self.kind, self.positive = kind, positive
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.kind == "point":
            x, y, frame = value
            value = (x, y)
        else:
            value, frame = value
        prompts = list(getattr(namespace, self.dest) or [])
        prompts.append(DrawnPrompt(self.kind, frame, value, self.positive))
        setattr(namespace, self.dest, prompts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unipixel", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny", help="write the tiny offline checkpoint (random weights, for tests)")
    tiny.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    tiny.add_argument("--seed", type=int, default=0)

    infer = commands.add_parser(
        "infer",
        help="ask one question about an image or a video",
        description="Ask one question about an image or a video, with optional drawn objects. Coordinates "
        "are pixels of the original media; @F picks a sampled frame (default 0). Positive and negative "
        "points on the same frame form one object; each box and each mask is one object. Objects get ids "
        "[1], [2], ... in command-line order, so the prompt can mention them.",
    )
    infer.add_argument("media", type=Path, metavar="MEDIA", help="image or video file")
    infer.add_argument("prompt", metavar="PROMPT", help='the question, e.g. "Please segment the red circle."')
    infer.add_argument("--model", default=None, help="hub id or checkpoint folder (default: the published UniPixel-3B)")
    infer.add_argument("--frames", type=int, default=16, help="frames sampled from a video (default 16)")
    add = functools.partial(infer.add_argument, dest="prompts", action=_AppendPrompt)
    add("--point", type=parse_point, kind="point", metavar="X,Y[@F]", help="positive click (repeatable)")
    add("--neg-point", type=parse_point, kind="point", positive=False, metavar="X,Y[@F]", help="negative click")
    add("--box", type=parse_box, kind="box", metavar="X1,Y1,X2,Y2[@F]", help="box, top-left and bottom-right")
    add("--mask", type=parse_mask, kind="mask", metavar="PNG[@F]", help="mask image, white (>= 128) is the object")
    infer.add_argument("--out", type=Path, default=None, help="output folder (default: ./outputs/<media stem>)")
    _track_flags(infer)
    _model_flags(infer)

    batch = commands.add_parser(
        "batch",
        help="run a prompt set (JSON Lines) over many media and score it",
        description="Run every item of a prompt set (the README documents the format) through a session and "
        "write RUN/results.jsonl, overlays, RUN/manifest.json and RUN/summary.json. Rerun with the same --out "
        "to resume: finished items are skipped.",
    )
    batch.add_argument("prompts", type=Path, metavar="PROMPTS.jsonl")
    batch.add_argument("--model", default=None, help="hub id or checkpoint folder (default: the published UniPixel-3B)")
    batch.add_argument("--out", type=Path, required=True, help="run folder (created; reused to resume)")
    batch.add_argument("--frames", type=int, default=16, help="frames sampled from a video when an item gives no num_frames")
    _track_flags(batch)
    _model_flags(batch)

    compare = commands.add_parser("compare", help="put two runs of the same prompt set side by side in one HTML file")
    compare.add_argument("run_a", type=Path, metavar="RUN_A")
    compare.add_argument("run_b", type=Path, metavar="RUN_B")
    compare.add_argument("--html", type=Path, required=True, help="the report to write (self-contained)")

    convert = commands.add_parser("convert", help="make a prompt set from a benchmark's layout")
    layouts = convert.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    refcoco = layouts.add_parser("refcoco", help="RefCOCO/+/g: COCO instances.json + refs(unc).p + images")
    refcoco.add_argument("--instances", type=Path, required=True)
    refcoco.add_argument("--refs", type=Path, required=True, help="refs(*).p (pickle) or the same list as JSON")
    refcoco.add_argument("--images", type=Path, required=True, help="the COCO image folder")
    refcoco.add_argument("--split", default=None, help="keep one split, e.g. val")
    refvos = layouts.add_parser("refvos", help="Ref-YouTube-VOS / MeViS / ReVOS: a split folder with meta_expressions.json")
    refvos.add_argument("root", type=Path, metavar="SPLIT_DIR")
    refvos.add_argument("--frames", type=int, default=16, help="num_frames of each item (default 16)")
    for layout in (refcoco, refvos):
        layout.add_argument("--out", type=Path, required=True, help="the prompt set to write (PROMPTS.jsonl)")
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=512)


# ---- infer -------------------------------------------------------------------------------------
def group_prompts(prompts: list[DrawnPrompt], load_mask) -> list:
    """Drawn flags -> VisualPrompts: all points of one frame are one object, placed at its first point."""
    from .session import VisualPrompt

    objects, points_by_frame = [], {}
    for p in prompts:
        if p.kind == "point":
            if p.frame not in points_by_frame:
                points_by_frame[p.frame] = VisualPrompt("point", frame=p.frame)
                objects.append(points_by_frame[p.frame])
            points_by_frame[p.frame].points.append((*p.value, p.positive))
        elif p.kind == "box":
            objects.append(VisualPrompt("box", frame=p.frame, box=p.value))
        else:
            objects.append(VisualPrompt("mask", frame=p.frame, mask=load_mask(p.value)))
    return objects


def check_prompts(objects: list, media) -> None:
    """Frame and coordinate checks that the session repeats, done here before the slow model load."""
    h, w = media.height, media.width
    for p in objects:
        if not 0 <= p.frame < media.num_frames:
            raise PromptError(f"frame {p.frame} is outside the {media.num_frames} sampled frames (use @0 to @{media.num_frames - 1})")
        if p.kind == "point" and not any(positive for _, _, positive in p.points):
            raise PromptError(f"the points on frame {p.frame} are all negative: add a --point on the object")
        corners = [(x, y) for x, y, _ in p.points] + ([p.box[:2], p.box[2:]] if p.box is not None else [])
        for x, y in corners:
            if not (0 <= x < w and 0 <= y < h):
                raise PromptError(f"prompt coordinate ({x:g}, {y:g}) is outside the {w}x{h} frame")
        if p.mask is not None and p.mask.shape != (h, w):
            raise PromptError(f"the mask is {p.mask.shape[1]}x{p.mask.shape[0]} pixels, the media {w}x{h}")


def check_device(device: str | None) -> None:
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise UniPixelError(f"--device {device}: no CUDA device is available here (try --device cpu)")


class ProgressBar:
    """One tqdm bar over all slow steps, fed by the session's (fraction, text) progress callback."""

    def __init__(self, steps: int):
        from tqdm import tqdm

        self._bar = tqdm(total=steps, file=sys.stderr, bar_format="{desc:<26}{percentage:3.0f}%|{bar}| {elapsed}")
        self._step = 0

    def report(self, fraction: float, text: str) -> None:
        self._bar.set_description_str(text)
        self._bar.update(max(0.0, self._step + fraction - self._bar.n))

    def next_step(self) -> None:
        self._step += 1
        self._bar.update(max(0.0, self._step - self._bar.n))

    def close(self) -> None:
        self._bar.close()


def _use_color(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def format_answer(result, bank, color: bool) -> str:
    """The answer with each target's [id] in its object's color (ANSI 24-bit) when `color`."""
    if not color:
        return result.answer
    out, last = [], 0
    for target in result.targets:
        r, g, b = bank.get(target.object_id).color
        out += [result.answer[last : target.start], f"\033[1;38;2;{r};{g};{b}m", result.answer[target.start : target.end], "\033[0m"]
        last = target.end
    return "".join(out) + result.answer[last:]


def write_outputs(out_dir: Path, media, session, result, model_path: str, offline: bool) -> list[Path]:
    from .export import export_masks_png, export_overlay, export_rle_json, playback_fps

    out_dir.mkdir(parents=True, exist_ok=True)
    bank = session.bank
    written = [export_overlay(media.frames, bank, out_dir, fps=playback_fps(media), source=media)]
    written += export_masks_png(bank, out_dir / "masks")
    written.append(export_rle_json(bank, out_dir / "masks.json", media.frame_indices))
    written.append(bank.save(out_dir / "memory.json"))
    answer = {
        "question": result.question,
        "answer": result.answer,
        "raw_answer": result.raw_answer,
        "targets": [{"id": t.object_id, "start": t.start, "end": t.end} for t in result.targets],
        "objects": [{"id": o.id, "source": o.source_text, "frames": o.span, "area": o.area} for o in bank],
        "model": model_path,
        "offline_model": offline,
        "seconds": round(result.seconds, 3),
    }
    written.append(out_dir / "answer.json")
    written[-1].write_text(json.dumps(answer, indent=2))
    return written


def _track_flags(parser) -> None:
    from .media import DEFAULT_MAX_TRACKED_FRAMES

    parser.add_argument("--track-source-frames", action="store_true",
                        help="videos: SAM 2 tracks the masks through every source frame (the model reads the sampled "
                             "frames), as the authors' evaluation does; overlay and masks at the source frame rate")
    parser.add_argument("--max-tracked-frames", type=int, default=DEFAULT_MAX_TRACKED_FRAMES, metavar="N",
                        help=f"past N source frames, track every k-th one (default {DEFAULT_MAX_TRACKED_FRAMES})")


def load_for(args):
    """(resolved model, model, processor) for the --model, --device and --dtype flags."""
    from .hub import resolve_model
    from .model import load_model

    check_device(args.device)
    resolved = resolve_model(os.path.expanduser(args.model) if args.model else None)
    if resolved.offline:
        why = f"{resolved.reason}; " if resolved.reason else ""
        print(f"warning: {why}using the offline model (a small stand-in for UniPixel: answers are not meaningful)", file=sys.stderr)
    model, processor = load_model(resolved.path, device=args.device, dtype=None if args.dtype == "auto" else args.dtype)
    return resolved, model, processor


def run_infer(args) -> int:
    from .media import load_media
    from .promptset import read_mask_png
    from .session import Session

    if args.frames < 1 or args.max_new_tokens < 1 or args.max_tracked_frames < 1:
        raise PromptError("--frames, --max-new-tokens and --max-tracked-frames must be at least 1")
    # Cheap checks first, so a bad file or mask fails before the slow model load.
    media = load_media(args.media, num_frames=args.frames)
    objects = group_prompts(args.prompts or [], read_mask_png)
    check_prompts(objects, media)
    if not args.prompt.strip():
        raise PromptError("the prompt is empty: give a question or an instruction")

    resolved, model, processor = load_for(args)
    session = Session(model, processor, media, max_new_tokens=args.max_new_tokens,
                      track_source_frames=args.track_source_frames, max_tracked_frames=args.max_tracked_frames)
    if session.tracking_note:
        print(f"note: {session.tracking_note}", file=sys.stderr)

    bar = ProgressBar(steps=len(objects) + 2)  # each object, the answer, the files
    try:
        for prompt in objects:
            session.add_object(prompt, progress=bar.report)
            bar.next_step()
        result = session.ask(args.prompt, progress=bar.report)
        bar.next_step()
        bar.report(0.0, "writing files")
        out_dir = args.out or Path("outputs") / args.media.stem
        write_outputs(out_dir, media, session, result, resolved.path, resolved.offline)
        bar.report(1.0, "done")
    finally:
        bar.close()

    print(format_answer(result, session.bank, _use_color(sys.stdout)))
    if not result.answer:
        print("(the model gave an empty answer)", file=sys.stderr)
    for obj in session.bank:
        where = f"frames {obj.span[0]}-{obj.span[1]}" if obj.span else "no frame (empty mask)"
        print(f"  {obj.label} {obj.source_text}: {obj.area} px on {where}", file=sys.stderr)
    print(f"outputs written to {out_dir}", file=sys.stderr)
    return 0


def run_batch(args) -> int:
    from .batch import run_batch as run

    if args.frames < 1 or args.max_new_tokens < 1 or args.max_tracked_frames < 1:
        raise PromptError("--frames, --max-new-tokens and --max-tracked-frames must be at least 1")
    if not args.prompts.is_file():
        raise PromptError(f"the prompt set '{args.prompts}' does not exist")
    resolved, model, processor = load_for(args)
    summary = run(args.prompts, model, processor, args.out, model_path=resolved.path,
                  max_new_tokens=args.max_new_tokens, default_frames=args.frames,
                  track_source_frames=args.track_source_frames, max_tracked_frames=args.max_tracked_frames)  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(f"results written to {args.out}", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from .compare import write_report

    print(write_report(args.run_a, args.run_b, args.html))
    return 0


def run_convert(args) -> int:
    from .converters import refcoco_to_prompt_set, refvos_to_prompt_set

    if args.layout == "refcoco":
        out = refcoco_to_prompt_set(args.instances, args.refs, args.images, args.out, split=args.split)
    else:
        out = refvos_to_prompt_set(args.root, args.out, num_frames=args.frames)
    print(out)
    return 0


def run_tiny(args) -> int:
    from .model.tiny import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.out_dir, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"tiny": run_tiny, "infer": run_infer, "batch": run_batch, "compare": run_compare, "convert": run_convert}[args.command](args)
    except UniPixelError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
