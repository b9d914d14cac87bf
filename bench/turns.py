"""What the per-media caches of a Session save, measured in one run (UniPixel spec §4, `<|seg|>` note 4).

(a) Turn 1 and turn 2 of one Session (turn 2 mentions [1], a point object added after turn 1)
    against a reference-style path that recomputes everything per turn: a fresh Session each turn
    (processor encode + vision tower again) with uncached SAM 2 frame features.
(b) Decoding a 3-object answer vs a 1-object answer in one teacher-forced prefill: the cached path
    (one shared SAM 2 propagation over cached frame features) against the reference style (a fresh
    uncached SAM 2 video per `<|seg|>`, every frame re-encoded per token), and the playground's
    streamed path (cached features, one propagation per object as each `<|seg|>` is written).

Answers are forced token by token with a logits processor, so every path does the same work
(random weights would otherwise answer with whatever tokens they like); all compute is real.

    PYTHONPATH=. python bench/turns.py [--frames 16] [--repeats 3] [--device cpu] [--models tiny 3b]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unipixel import load_model  # noqa: E402
from unipixel.calls import media_cache  # noqa: E402
from unipixel.media import media_from_frames  # noqa: E402
from unipixel.model import PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration  # noqa: E402
from unipixel.model import processing as P  # noqa: E402
from unipixel.model.tiny import build_processor, build_tiny_checkpoint, build_tokenizer, pixel_config  # noqa: E402
from unipixel.session import Session, VisualPrompt  # noqa: E402

TURN1 = ("Please describe the video.", "It is a video of two squares.")
TURN2_TEXT = ("What is [1] doing?", "[1] is moving to the right.")
TURN2_SEG = ("What is [1] doing? Please segment what it follows.", "[1] is following <|seg|>.")
ONE_OBJECT = "[1] <|seg|>"
THREE_OBJECTS = "[1] <|seg|> [2] <|seg|> [3] <|seg|>"


# ---- fixtures ----------------------------------------------------------------------------------
def synthetic_video(num_frames: int, height: int = 480, width: int = 640) -> np.ndarray:
    """Two squares moving over a gradient, so frames differ (no cache can hide behind equal frames)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = np.stack([(x + 8 * t) % 256, (y + 4 * t) % 256, np.full_like(x, 96)], -1)
        a, b = 40 + 20 * t, 300 - 10 * t
        frames[t, 100:200, a : a + 100] = (230, 25, 75)
        frames[t, 260:340, b : b + 80] = (0, 130, 200)
    return frames


def config_3b(tokenizer) -> PixelQwen2_5_VLConfig:
    """UniPixel-3B sizes (UniPixel spec §1); token ids are those of the tokenizer we have offline."""
    return pixel_config(
        tokenizer,
        text={
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "max_position_embeddings": 128000,
        },
        vision={
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "tokens_per_second": 2,
        },
        sam2_config="configs/sam2.1_hiera_b+",
        sam2_image_size=768,
    )  # fmt: skip


def build_3b(device: str, dtype: torch.dtype = torch.bfloat16):
    """The full UniPixel-3B architecture with random weights (no checkpoint is reachable offline)."""
    tokenizer = build_tokenizer()
    config = config_3b(tokenizer)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = PixelQwen2_5_VLForConditionalGeneration(config)
    return model.to(device, dtype).eval(), build_processor(tokenizer)


def build_tiny(device: str, workdir: Path):
    path = build_tiny_checkpoint(workdir / "tiny", seed=0)
    return load_model(str(path), device=device)


# ---- helpers -----------------------------------------------------------------------------------
class ForceTokens(LogitsProcessor):
    """Greedy decoding that emits exactly `ids` (then end-of-turn): same work on every path."""

    def __init__(self, ids: list[int]):
        self.ids, self.start = ids, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        k = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[k]] = 0
        return forced


def steering(processor, text: str) -> dict:
    """Generate arguments that make the real model answer `text` (a fresh processor per answer)."""
    ids = processor.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"logits_processor": LogitsProcessorList([ForceTokens(ids)])}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def encode_media(session: Session, cache_sam2: bool) -> None:
    """What a session computes once per media; here recomputed on demand (reference style)."""
    with torch.inference_mode():
        cache = media_cache(session.model, session.processor, session.media.frames, None)
    cache.sam2 = session.model.prepare_sam2_video(session.media.frames, cache=cache_sam2)
    session.cache = cache


# ---- (a) turns ---------------------------------------------------------------------------------
def session_turns(model, processor, media, device, point) -> dict:
    """Turn 1, then a point object [1], then turn 2 (text answer) and turn 2' (answer with a mask)."""
    session = Session(model, processor, media, max_new_tokens=64)
    out = {}
    session.generate_kwargs = steering(processor, TURN1[1])
    out["turn 1"], _ = timed(lambda: session.ask(TURN1[0]), device)
    session.add_object(VisualPrompt("point", frame=0, points=[(*point, True)]))
    history = (copy.deepcopy(session.bank), list(session._messages), list(session._mem_cells))
    kv = copy.deepcopy(session.cache.kv)  # the conversation's keys and values after turn 1

    def restore(keys_and_values):
        session.bank, session._messages, session._mem_cells = copy.deepcopy(history[0]), list(history[1]), list(history[2])
        session.cache.kv = copy.deepcopy(keys_and_values)

    for name, (question, answer) in (("turn 2, text answer", TURN2_TEXT), ("turn 2, mask answer", TURN2_SEG)):
        restore(kv)
        session.generate_kwargs = steering(processor, answer)
        out[name], result = timed(lambda: session.ask(question), device)
        assert result.raw_answer == P.clean_answer(answer), result.raw_answer
    # Time to the first token of turn 2 as a user sees it: from the question to the first streamed
    # text (`on_text`), with its new tokens only or the whole conversation prefilled; what `ask`
    # does after that token (bookkeeping, the turn's record) is not waited for by the user.
    # The prefill's length is kept too: it bounds the ratio (the LLM's work grows with it).
    session.max_new_tokens = 1
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for name, keys_and_values in (("turn 2, first token", kv), ("turn 2, first token, whole prefill", None)):
            restore(keys_and_values)
            session.generate_kwargs = steering(processor, TURN2_TEXT[1])
            fed.clear()
            first = []

            def on_text(_text):
                if not first:
                    sync(device)
                    first.append(time.perf_counter())

            sync(device)
            start = time.perf_counter()
            session.ask(TURN2_TEXT[0], on_text=on_text)
            out[name] = first[0] - start
            out[f"{name} [tokens]"] = fed[0]
    finally:
        hook.remove()
    return out, history


def reference_turns(model, processor, media, device, history) -> dict:
    """The same turns, each in a fresh Session that re-encodes the media, SAM 2 features uncached."""

    def turn(question, answer, state=None):
        def run():
            session = Session(model, processor, media, max_new_tokens=64, generate_kwargs=steering(processor, answer))
            if state is not None:
                session.bank, session._messages, session._mem_cells = copy.deepcopy(state[0]), list(state[1]), list(state[2])
            encode_media(session, cache_sam2=False)
            return session.ask(question)

        return timed(run, device)[0]

    return {
        "turn 1": turn(*TURN1),
        "turn 2, text answer": turn(*TURN2_TEXT, history),
        "turn 2, mask answer": turn(*TURN2_SEG, history),
    }


# ---- (b) 1 vs 3 objects ------------------------------------------------------------------------
def decode_answer(model, processor, session: Session, answer: str, mode: str, device) -> float:
    """Teacher-forced prefill of `answer` and its masks; mode: warm / cold cache, streamed (warm, one
    SAM 2 propagation per object, as the playground segments each `<|seg|>` when it is written), or
    reference."""
    with torch.inference_mode():
        cache = media_cache(model, processor, session.media.frames, session.cache)
    vision, warm_video = cache.vision, cache.sam2
    messages = [
        P.user_message("Please segment the squares.", with_video=True),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    inputs = P.tokenize_chat(processor, messages, vision["video_grid_thw"], add_generation_prompt=False)
    n = answer.count(P.SEG)

    def run():
        with torch.inference_mode():
            if mode == "reference":
                out = model(**inputs, **vision, logits_to_keep=1)
                masks = [
                    model.decode_seg_masks(out.seg_hidden[i : i + 1], model.prepare_sam2_video(session.media.frames, cache=False))
                    for i in range(n)
                ]
                return torch.cat(masks)
            if mode == "streamed":
                out = model(**inputs, **vision, logits_to_keep=1)
                return torch.cat([model.decode_seg_masks(out.seg_hidden[i : i + 1], warm_video) for i in range(n)])
            video = warm_video if mode == "warm" else model.prepare_sam2_video(session.media.frames)
            return model(**inputs, **vision, sam2_video=video, logits_to_keep=1).masks

    seconds, masks = timed(run, device)
    assert masks.shape[0] == n, masks.shape
    return seconds


# ---- report ------------------------------------------------------------------------------------
def median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def bench_model(name: str, model, processor, frames: np.ndarray, device: str, repeats: int) -> dict:
    media = media_from_frames(frames, fps=2.0)
    point = (media.width * 0.15, media.height * 0.3)  # on the red square of frame 0
    turns, refs, decode = [], [], []
    for r in range(repeats + 1):  # the first round warms up (lazy init, kernels, allocator)
        ours, history = session_turns(model, processor, media, device, point)
        theirs = reference_turns(model, processor, media, device, history)
        session = Session(model, processor, media, generate_kwargs=steering(processor, ONE_OBJECT))
        session.ask("Please segment the squares.")  # warms the SAM 2 cache as a first turn would
        row = {}
        for objects, answer in ((1, ONE_OBJECT), (3, THREE_OBJECTS)):
            for mode in ("warm", "cold", "reference", "streamed"):
                row[(objects, mode)] = decode_answer(model, processor, session, answer, mode, device)
        if r:
            turns.append(ours), refs.append(theirs), decode.append(row)
        print(f"  [{name}] round {r}{' (warm-up)' if not r else ''} done", file=sys.stderr)
    return {"turns": median(turns), "reference": median(refs), "decode": median(decode), "media": media}


def print_report(name: str, device: str, result: dict, repeats: int) -> bool:
    """Print the tables; True when every target is met."""
    media, turns, refs, dec = result["media"], result["turns"], result["reference"], result["decode"]
    print(f"\n== {name} on {device}: {media.num_frames} frames of {media.height}x{media.width}, median of {repeats} ==")
    print("(a) turns                  session [s]  reference [s]  reference/session")
    for key in refs:
        print(f"    {key:<22} {turns[key]:>11.3f}  {refs[key]:>13.3f}  {refs[key] / turns[key]:>16.2f}x")
    for key in ("turn 2, first token", "turn 2, first token, whole prefill"):
        print(f"    {key:<36} {turns[key]:>8.3f}  (prefills {turns[key + ' [tokens]']:.0f} tokens)")
    modes = ("warm", "cold", "reference", "streamed")
    print("(b) teacher-forced answer  cached, warm [s]  cached, cold [s]  reference [s]  streamed [s]")
    for objects in (1, 3):
        print(f"    {objects} object(s){'':<13}" + "".join(f"{dec[(objects, m)]:>{w}.3f}" for m, w in zip(modes, (16, 18, 15, 14))))
    ratio = {mode: dec[(3, mode)] / dec[(1, mode)] for mode in modes}
    print(f"    3 / 1 objects{'':<10}" + "".join(f"{ratio[m]:>{w}.2f}x" for m, w in zip(modes, (15, 17, 14, 13))))
    t2 = {k: refs[k] / turns[k] for k in ("turn 2, text answer", "turn 2, mask answer")}
    first = turns["turn 2, first token, whole prefill"] / turns["turn 2, first token"]
    targets = [
        ("turn 2 first token: whole prefill / new tokens only", first, first >= 5, ">= 5x"),
        *((f"turn2_reference / turn2_session ({key[8:]})", value, value >= 3, ">= 3x") for key, value in t2.items()),
        ("3-object / 1-object cost (cached, warm)", ratio["warm"], ratio["warm"] <= 1.3, "<= 1.3x"),
        ("3-object / 1-object cost (cached, cold)", ratio["cold"], ratio["cold"] <= 1.3, "<= 1.3x"),
    ]
    print("ratios measured in this run:")
    for label, value, met, target in targets:
        print(f"    {label}: {value:.2f}x  (target {target}: {'met' if met else 'MISSED'})")
    return all(met for _, _, met, _ in targets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cpu for the tiny model, cuda for the 3B")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 steadies timings on a shared machine)")
    parser.add_argument("--models", nargs="+", choices=("tiny", "3b"), default=None, help="default: tiny, and 3b when CUDA is available")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["tiny", "3b"] if torch.cuda.is_available() else ["tiny"])
    if "3b" not in models:
        print("note: the UniPixel-3B architecture runs only with CUDA (bf16); this run measures the tiny model", file=sys.stderr)
    frames = synthetic_video(args.frames, args.height, args.width)
    met = True
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            device = args.device or ("cpu" if name == "tiny" else "cuda")
            torch.manual_seed(0)
            model, processor = build_tiny(device, Path(workdir)) if name == "tiny" else build_3b(device)
            result = bench_model(name, model, processor, frames, device, args.repeats)
            title = "tiny checkpoint" if name == "tiny" else "UniPixel-3B architecture, random weights, bf16"
            met &= print_report(title, device, result, args.repeats)
            del model
    return 0 if met else 1  # a missed target fails the run


if __name__ == "__main__":
    raise SystemExit(main())
