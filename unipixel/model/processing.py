"""Turning frames and text into model inputs the way the reference does (UniPixel spec §3-§5)."""
from __future__ import annotations

import re
import threading

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

MIN_PIXELS = 128 * 28 * 28
FPS = 2.0
VIDEO_PAD = "<|video_pad|>"
SEG = "<|seg|>"
REF = "<|ref|>"
MEM = "<|mem|>"
PIXELQA_SUFFIX = " Please localize the relevant objects with IDs."
# Private-use marks around text a user typed: inside them special tokens are plain characters.
_TYPED = re.compile("\ue000(.*?)\ue001", re.S)


def max_pixels(num_frames: int, requested: int = 16) -> int:
    """Pixel budget of one LLM frame: 256*28*28*int(S / n) for S frames asked and n sampled (spec §3).

    n <= S always (a video is sampled to at most S), so the factor is at least 1; a media that
    does not say what was asked counts as S = max(16, n), the default setting or more."""
    return 256 * 28 * 28 * int(max(requested, num_frames) / num_frames)


def llm_frames(frames: np.ndarray) -> list[Image.Image]:
    """Smart-resize every frame (sides multiples of 28) and pad the list to an even length."""
    t, h, w = frames.shape[:3]
    rh, rw = smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=max_pixels(t))
    out = [Image.fromarray(f).resize((rw, rh), Image.BICUBIC) for f in frames]
    if len(out) % 2:
        out.append(out[-1])
    return out


def video_grid(processor, frames_shape: tuple[int, ...]) -> torch.Tensor:
    """`video_grid_thw` [1, 3] that `encode_frames` gives frames of this shape, without encoding them."""
    t, h, w = frames_shape[:3]
    rh, rw = smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=max_pixels(t))
    video = processor.video_processor
    return torch.tensor([[(t + t % 2) // video.temporal_patch_size, rh // video.patch_size, rw // video.patch_size]])


def encode_frames(processor, frames: np.ndarray) -> dict:
    """Vision inputs of one media: pixel_values_videos, video_grid_thw, second_per_grid_ts."""
    # Frames are already resized (spec §3), so no per-frame pixel cap applies.
    out = processor.video_processor(
        videos=[llm_frames(frames)], do_resize=False, cap_pixels_per_frame=False, return_tensors="pt"
    )
    return {
        "pixel_values_videos": out["pixel_values_videos"],
        "video_grid_thw": out["video_grid_thw"],
        "second_per_grid_ts": torch.tensor([processor.video_processor.temporal_patch_size / FPS]),
    }


def num_video_tokens(grid_thw: torch.Tensor, merge_size: int = 2) -> int:
    return int(grid_thw[0].prod()) // merge_size**2


def tokenize_chat(processor, messages: list[dict], grid_thw: torch.Tensor, add_generation_prompt: bool = True,
                  memo: dict | None = None) -> dict:
    """Chat template -> input_ids with the video placeholder expanded (batch of one).

    `memo`: a conversation's own dict (a session's), where the ids of each piece of its chat are
    kept: each turn re-tokenizes the chat, all of it but the new turn seen before."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Even pieces are ours (control tokens allowed), odd pieces were typed (spec §3: typed is text).
    # Typed text sits between a newline or special token and `<|im_end|>`, so the cut changes no merge.
    ids: list[int] = []
    for k, piece in enumerate(_TYPED.split(text)):
        ids += _piece_ids(processor.tokenizer, piece, k % 2 == 1, memo)
    # The placeholder becomes one token per merged vision token; expanding ids, not text, spares the
    # tokenizer thousands of special-token matches every turn (and the expansion is made as a tensor:
    # a Python list of thousands of ids costs more to convert than the rest of the call).
    video_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    if video_id in ids:
        k = ids.index(video_id)
        before, after = torch.tensor(ids[:k], dtype=torch.long), torch.tensor(ids[k + 1 :], dtype=torch.long)
        ids = torch.cat([before, torch.full((num_video_tokens(grid_thw),), video_id), after])[None]
    else:
        ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == video_id).long() * 2,  # 0 text, 1 image, 2 video
    }


# A fast tokenizer's `split_special_tokens` is one switch on the shared Rust tokenizer, set before each
# encode: sessions tokenizing at once on other threads would read each other's setting (a typed
# "<|seg|>" read as the control token, or our "<|mem|>" split into characters).
_ENCODING = threading.Lock()


def encode(tokenizer, text: str, typed: bool) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `typed`: special tokens in it are read as characters."""
    with _ENCODING:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=typed)["input_ids"]


def _piece_ids(tokenizer, piece: str, typed: bool, memo: dict | None) -> list[int]:
    """Token ids of one piece of a chat (typed: special tokens read as characters), from `memo` when
    it holds them: tokenizing is a function of the piece alone, so they are exactly its ids."""
    ids = None if memo is None else memo.get((piece, typed))
    if ids is None:
        ids = encode(tokenizer, piece, typed)
        if memo is not None:
            memo[(piece, typed)] = ids
    return ids


def typed(text: str) -> str:
    """Mark text a user typed, so that `tokenize_chat` reads any special token in it as characters."""
    return "\ue000" + text.replace("\ue000", "").replace("\ue001", "") + "\ue001"


def user_message(text: str, with_video: bool) -> dict:
    content = [{"type": "video"}] if with_video else []
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def mem_prefix(objects: list[tuple[int, list[int]]], num_frames: int) -> str:
    """Text that introduces mask-prompted objects: (id, non-empty temporal slots) each (spec §4)."""
    if num_frames == 1:
        lines = "".join(f"[{i}]: <1> {MEM}\n" for i, _ in objects)
        return "Here is an image with the following highlighted regions:\n" + lines
    head = (
        f"Here is a video with {num_frames} frames denoted as <1> to <{num_frames}>. "
        "The highlighted regions are as follows:\n"
    )
    lines = "".join(
        f"[{i}]: " + " ".join(f"<{2 * s + 1}>-<{2 * s + 2}> {MEM}" for s in slots) + "\n" for i, slots in objects
    )
    return head + lines


def clean_answer(text: str) -> str:
    """Remove the space before or after `<|seg|>` (spec §5)."""
    return re.sub(r" ?<\|seg\|> ?", SEG, text)
