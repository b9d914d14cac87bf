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
import functools
import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sam2.modeling.sam.prompt_encoder import PromptEncoder

from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..model import PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration, RefPrompt
from ..model import processing as P
from ..model.sam2_video import build_sam2
from ..model.tiny import build_processor, build_tokenizer, pixel_config
from .conversations import make_conversation
from .losses import lm_loss, total_mask_loss
from .keep_segs import WriteGuard, seg_read_directions
from .own_masks import OwnMasks
from .parallel import agreed_spent, average_gradients, spawn
from .sam_prompts import (COLOR_NAMES, color_prompts_of, load_color_prompts, place_dims, ref_tokens, scene_losses,
                          track_with_grad)
from .scenes import SHAPES, make_scene

TRAIN_STREAM = 0  # seed-sequence tags: training scenes and held-out evaluation scenes never overlap
EVAL_STREAM = 1
SAM_SIZE = 192
FRAMES = (8, 8, 8, 8, 10, 12, 16)  # frame counts training videos are drawn from (mostly 8)


def train_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def scene_rng(stream: int, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, index])


def sample(rng: np.random.Generator, num_frames: int = 1, qa_prob: float = 0.0, turns: tuple[int, int] | None = None,
           pixelqa_prob: float = 0.0, mem_noise: float = 0.0, own_masks=None):
    """A scene of `num_frames` frames and a conversation about it: `turns` (lo, hi) turns, else 1-4.
    With probability `qa_prob`, a cheap one: 2-4 questions about mask-prompted objects (follow-ups
    and region descriptions), no `<|seg|>`, so no SAM 2 work. With probability `pixelqa_prob`, the
    playground's PixelQA: `[1]` from a point or box as the first turn, then 0-2 follow-ups.
    `mem_noise`: how often a follow-up's memory mask looks like SAM 2's rather than the truth;
    `own_masks`: the model's own predicted tracks for follow-ups (`own_masks.OwnMasks`)."""
    memory = {"mem_noise": mem_noise, "own_masks": own_masks}
    scene = make_scene(rng, num_frames)
    if pixelqa_prob and rng.random() < pixelqa_prob:  # no draw when off: earlier stages' data stays the same
        return scene, make_conversation(scene, rng, tasks=["pixelqa"] + ["followup"] * int(rng.integers(0, 3)),
                                        **memory)
    if rng.random() < qa_prob:
        tasks = [str(t) for t in rng.choice(["followup", "region"], size=int(rng.integers(2, 5)), p=[0.6, 0.4])]
        return scene, make_conversation(scene, rng, tasks=tasks, **memory)
    num_turns = int(rng.integers(turns[0], turns[1] + 1)) if turns else None
    return scene, make_conversation(scene, rng, num_turns=num_turns, **memory)


def sample_batch(rng: np.random.Generator, size: int, video_prob: float = 0.5, frames=FRAMES,
                 qa_prob: float = 0.0, turns: tuple[int, int] | None = None, pixelqa_prob: float = 0.0,
                 mem_noise: float = 0.0, own_masks=None) -> list[tuple]:
    """`size` conversations about images, or (with probability `video_prob`) size/4 about videos of
    one frame count: one length class per batch keeps padding small."""
    if rng.random() < video_prob:
        num_frames, size = int(rng.choice(frames)), max(1, size // 4)
    else:
        num_frames = 1
    return [sample(rng, num_frames, qa_prob, turns, pixelqa_prob, mem_noise, own_masks) for _ in range(size)]


# ---- model ---------------------------------------------------------------------------------------
def shapes_tokenizer(vocab_size: int = 640):
    """BPE on the training wording (conversations of seeded scenes) plus UniPixel's own phrases."""
    rng = np.random.default_rng([TRAIN_STREAM, 999])
    corpus = []
    for i in range(600):
        scene = make_scene(rng, int(rng.choice((8, 16))) if rng.random() < 0.5 else 1)
        for m in make_conversation(scene, rng).messages:
            corpus.append(m["content"][-1]["text"])
    return build_tokenizer(vocab_size, corpus=corpus)


def shapes_config(tokenizer, sam_size: int = SAM_SIZE) -> PixelQwen2_5_VLConfig:
    # A window of 1792 px (64 merged tokens a side) holds a whole frame, so the vision tower's
    # window order equals raster order for every frame the processor can produce.
    return pixel_config(
        tokenizer,
        text={
            "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}, "max_position_embeddings": 8192,
        },
        vision={
            "depth": 4, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "out_hidden_size": 256,
            "fullatt_block_indexes": [1, 3], "window_size": 1792, "tokens_per_second": 2,
        },
        sam2_config="unipixel/sam2_shapes",
        sam2_image_size=sam_size,
    )  # fmt: skip


def build_model(seed: int = 0):
    """A freshly initialised model and its processor.

    transformers' `post_init` gives every Linear/Conv/Embedding std 0.02 (right for the LLM); the
    small SAM 2 learns from scratch far better with its own initialisation, and the seg tokens
    should start at the scale of SAM's prompt embeddings (about 1), so those are re-initialised.
    """
    tokenizer = shapes_tokenizer()
    config = shapes_config(tokenizer)
    torch.manual_seed(seed)
    model = PixelQwen2_5_VLForConditionalGeneration(config)
    size, s = config.sam2_image_size, model.sam2.hidden_dim
    model.sam2.load_state_dict(build_sam2(config.sam2_config, size).state_dict())
    native = PromptEncoder(embed_dim=s, image_embedding_size=(size // 16,) * 2, input_image_size=(size,) * 2,
                           mask_in_chans=16)  # fmt: skip
    model.ref_encoder.load_state_dict(native.state_dict())
    _init_seg_head(model)
    model.config.use_cache = True
    return model, build_processor(tokenizer)


def untie_word_embeddings(model, tokenizer, words=SHAPES, seed: int = 0) -> list[int]:
    """Give the LM head weights of its own (a copy of the tied ones) and re-draw the input embeddings
    of every token that spells one of `words`.

    With tied embeddings, words the model cannot yet predict (the shapes, before the vision tower
    sees shape) are pulled together by the output gradient until their input embeddings are nearly
    the same vector (cosine 0.9 and more): the model can then neither copy a shape from the question
    nor learn it from the image. Untied, the input side keeps them apart. Returns the re-drawn ids.
    """
    emb = model.get_input_embeddings()
    model.lm_head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().lower() in words]
    generator = torch.Generator().manual_seed(seed)
    fresh = torch.randn(len(ids), emb.weight.shape[1], generator=generator) * emb.weight.std()
    emb.weight.data[ids] = fresh.to(emb.weight)
    return ids


def redraw_shape_head(model, tokenizer, seed: int = 0, spread: float = 0.7) -> None:
    """Give the LM head rows of the shape words (` circle`, `Circle`, ...) distinct directions again.

    Untied, the output rows collapsed instead: while no answer could name a shape, the gradient pulled
    the five rows of each spelling toward their mean (cosine 0.90-0.93, each 0.11-0.20 from the mean,
    where the color words' rows are 0.6-0.8 from theirs), and a hidden state can then barely tell
    the shapes apart in the logits, even for a shape it copies from the question. Each spelling keeps
    its mean row (the "a shape word comes next" part) plus fresh parts at right angles to it and
    (before centring) to each other, of norm `spread`: the color words' geometry."""
    head = model.lm_head.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ids in shape_word_ids(tokenizer).view(2, -1):
            mean = head[ids].mean(0)
            basis = torch.linalg.qr(torch.cat([mean[:, None].cpu(), torch.randn(head.shape[1], len(ids), generator=generator)], 1)).Q
            parts = spread * basis[:, 1:].T
            head[ids] = mean + (parts - parts.mean(0)).to(head)  # centred: the mean row stays


def _init_seg_head(model) -> None:
    d = model.config.text_config.hidden_size
    torch.nn.init.normal_(model.seg_head[1].weight, std=d**-0.5)
    torch.nn.init.normal_(model.seg_head[3].weight, std=1.5 * d**-0.5)


def fresh_mask_decoder(model, seed: int = 0) -> None:
    """Re-initialise SAM 2's mask decoder, keeping its image encoder and memory parts: a decoder
    whose first (residual-free) self-attention has collapsed onto a fixed token ignores every prompt,
    and nothing that flows back through it can teach the prompt to matter."""
    torch.manual_seed(seed)
    fresh = build_sam2(model.config.sam2_config, model.config.sam2_image_size)
    model.sam2.sam_mask_decoder.load_state_dict(fresh.sam_mask_decoder.state_dict())


# The language side: what `reset_language_side` starts afresh.
LANGUAGE_SIDE = ("model.language_model", "seg_head", "ref_proj_single", "ref_proj_double", "ref_proj", "tem_emb",
                 "tem_proj", "msk_proj")  # fmt: skip


def reset_language_side(model, seed: int = 0) -> None:
    """Re-initialise the language model and the heads that feed or read it, keeping the vision tower,
    SAM 2 and `ref_encoder`: a language model whose attention has collapsed onto fixed positions
    (attention sinks) does not recover, while the visual parts remain worth keeping."""
    torch.manual_seed(seed)
    fresh = PixelQwen2_5_VLForConditionalGeneration(model.config)
    _init_seg_head(fresh)
    for name in LANGUAGE_SIDE:
        model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())


# ---- one sample ----------------------------------------------------------------------------------
def tokenize_with_labels(processor, messages: list[dict], grid) -> dict:
    """`tokenize_chat` of the whole conversation, plus a mask of the assistant tokens (with their
    `<|im_end|>`). Special tokens split the text, so prefixes tokenize as prefixes."""
    inputs = P.tokenize_chat(processor, messages, grid, add_generation_prompt=False)
    labels = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for k in range(1, len(messages), 2):
        start = P.tokenize_chat(processor, messages[:k], grid, add_generation_prompt=True)["input_ids"].shape[1]
        end = P.tokenize_chat(processor, messages[: k + 1], grid, add_generation_prompt=False)["input_ids"].shape[1]
        labels[0, start : end - 1] = True  # up to <|im_end|>, not the newline after it
    inputs["label_mask"] = labels
    return inputs


def _pad(rows: list[torch.Tensor], value) -> torch.Tensor:
    """[1, L_i, ...] tensors -> [B, max L, ...], right-padded."""
    out = rows[0].new_full((len(rows), max(r.shape[1] for r in rows), *rows[0].shape[2:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[1]] = r[0]
    return out


def lm_forward(model, processor, batch: list[tuple], attentions: bool = False):
    """The language model once over a right-padded batch of (scene, conversation) pairs.

    Each conversation's vision features and `<|ref|>`/`<|mem|>` embeddings are built on its own.
    Returns the output, the padded ids and assistant-token mask, and the last hidden states
    (before the final norm: what `seg_head` reads). `attentions` asks for every layer's attention
    probabilities (`out.attentions`; the model must run eager attention).
    """
    device = model.device
    rows, grids, mm_embeds, seconds = [], [], [], []
    for scene, conv in batch:
        vision = P.encode_frames(processor, scene.frames)
        grid = vision["video_grid_thw"]
        features = model.encode_video(vision.pop("pixel_values_videos").to(device), grid.to(device))
        inputs = {k: v.to(device) for k, v in tokenize_with_labels(processor, conv.messages, grid).items()}
        h, w = scene.frames.shape[1:3]
        size = model.config.sam2_image_size
        refs = [RefPrompt.from_pixels(r.frame, h, w, size, point=r.point, box=r.box) for r in conv.refs]
        mems = [torch.from_numpy(m) for m in conv.mem_masks]
        inputs["inputs_embeds"] = model.build_inputs_embeds(inputs["input_ids"], features, refs or None, mems or None)
        rows.append(inputs)
        grids.append(features.grid_thw)
        mm_embeds.append(features.embeds)
        seconds.append(vision["second_per_grid_ts"])
    pad_id = processor.tokenizer.pad_token_id
    ids = _pad([r["input_ids"] for r in rows], pad_id)
    label_mask = _pad([r["label_mask"] for r in rows], False)
    with model._record_prenorm() as states:
        out = Qwen2_5_VLForConditionalGeneration.forward(
            model,
            input_ids=ids,
            attention_mask=_pad([r["attention_mask"] for r in rows], 0),
            mm_token_type_ids=_pad([r["mm_token_type_ids"] for r in rows], 0),
            inputs_embeds=_pad([r["inputs_embeds"] for r in rows], 0.0),
            video_grid_thw=torch.cat(grids),
            second_per_grid_ts=torch.cat(seconds),
            mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(torch.cat(mm_embeds),))},
            output_attentions=attentions,
        )
    return out, ids, label_mask, states[0]


MEM_TASKS = ("region", "followup")  # the turns answered from a `<|mem|>` prefix in their own question


def lookups(ids: torch.Tensor, label_mask: torch.Tensor, batch: list[tuple], config, copied: torch.Tensor):
    """What each answer must look up: (row, query positions, key positions, kind) for every
    mask-prompt turn (kind "mem": the positions that predict its answer, its question's `<|mem|>`
    tokens), every PixelQA `<|seg|>` (kind "ref": the position whose next token is that seg, the
    `<|ref|>` of the same object in its question) and every word of `copied` that a referring
    answer repeats from its question (kind "copy": the position that predicts it, the word there)."""
    for b, (_, conv) in enumerate(batch):
        answer = label_mask[b].nonzero()[:, 0]
        spans = torch.tensor_split(answer, ((torch.diff(answer) > 1).nonzero()[:, 0] + 1).tolist())
        previous_end = 0
        for task, span in zip(conv.tasks, spans):
            asked = torch.arange(previous_end, int(span[0]), device=ids.device)
            if task in MEM_TASKS:
                own = asked[ids[b, asked] == config.mem_token_id]
                if len(own):
                    yield b, span - 1, own, "mem"
            elif task == "referring":
                for query in span[torch.isin(ids[b, span], copied)] - 1:
                    same = asked[ids[b, asked] == ids[b, query + 1]]
                    if len(same):
                        yield b, query[None], same, "copy"
            elif task == "pixelqa":
                refs = asked[ids[b, asked] == config.ref_token_id]
                segs = span[ids[b, span] == config.seg_token_id]
                for ref, seg in zip(refs, segs):
                    yield b, seg[None] - 1, ref[None], "ref"
            previous_end = int(span[-1])


def lookup_attention_loss(attention: torch.Tensor, found: list[tuple]) -> torch.Tensor | None:
    """-log of the attention one head ([B, L, L] probabilities) puts on what each answer must look up
    (`lookups`), averaged over the query positions; None without any.

    The shape word of `A red circle.` is predicted where no head looked at `<|mem|>`, and the LM loss
    alone did not teach one to: the answer ignored the `<|mem|>` embedding entirely (replacing it by
    the word embeddings of the right color and shape changed no prediction). Likewise no PixelQA seg
    state had learned to read its `<|ref|>`, and referring answers did not copy the shape word from
    the question (which matters once the shape words are told apart: the seg state follows the
    word said). With one head held on them, the rest of the model gets a path to the answer."""
    terms = [attention[b, queries][:, keys].sum(-1) for b, queries, keys, _ in found]
    if not terms:
        return None
    return -torch.log(torch.cat(terms) + 1e-6).mean()


def batch_losses(model, processor, batch: list[tuple], color_prompts: torch.Tensor | None = None,
                 distill: float = 0.0, ref_targets: bool = False, attend_mem: float = 0.0,
                 attend_head: tuple[int, int] = (1, 2), place: float = 0.0, teacher=None) -> dict:
    """LM + mask losses of a batch of (scene, conversation) pairs.

    The language model runs once over the padded batch (`lm_forward`; small batches of one
    conversation are too noisy for its attention to learn to look anything up). The LM loss averages
    over all assistant tokens of the batch, the mask losses over the conversations that have
    `<|seg|>` targets.

    With `distill` > 0, every seg prompt is also pulled (mean squared error, that weight) toward the
    SAM stage's learned prompt for its object's color (`color_prompts` [colors, k, s]): a SAM 2 that
    answers to those prompts gives the mask loss no slope from a prompt far from them, so without a
    target the seg prompts settle on one that segments the whole foreground.
    With `attend_mem` > 0, head `attend_head` (layer, head) is also pulled (that weight) onto what
    each answer must look up (`lookup_attention_loss`).
    With `ref_targets`, a PixelQA seg prompt whose `<|ref|>` is on frame 0 (the frame the seg
    tokens prompt) is pulled instead toward SAM 2's own tokens of that point or box: a copy of
    where the object is, which a SAM 2 with `sam_stage --point-channel` answers, where the color
    target asks the language model to look up the object under the point itself.
    With a `teacher` (the weights the stage started from, frozen), every seg is pulled instead toward
    the teacher's own prompt for it: the seg prompts stay where they were, a hand-built route
    (`ref_route`) included, while the rest of the language model learns.
    """
    device = model.device
    out, ids, label_mask, states = lm_forward(model, processor, batch, attentions=attend_mem > 0)
    kept = teacher_seg_prompts(teacher, processor, batch) if teacher is not None and distill else {}
    losses = {"lm": lm_loss(out.logits, ids, label_mask)}
    words = shape_word_ids(processor.tokenizer).to(ids.device)
    found = list(lookups(ids, label_mask, batch, model.config, words))
    with torch.no_grad():  # teacher-forced accuracy of the assistant tokens and of the shape words, for the log
        right = out.logits[:, :-1].argmax(-1) == ids[:, 1:]
        keep = label_mask[:, 1:]
        losses["acc"] = right[keep].float().mean()
        shapes = keep & torch.isin(ids[:, 1:], words)
        from_mem = torch.zeros_like(shapes)
        for b, queries, _, kind in found:
            if kind == "mem":
                from_mem[b, queries] = True
        for name, where in (("shape_acc", shapes & ~from_mem), ("mem_shape_acc", shapes & from_mem)):
            if where.any():  # shape words the question names, and those only the memory shows
                losses[name] = right[where].float().mean()
    if attend_mem:
        term = lookup_attention_loss(out.attentions[attend_head[0]][:, attend_head[1]], found)
        if term is not None:
            losses["attend"] = term
    mask_parts, seg_id = defaultdict(float), model.config.seg_token_id
    segmented, seg_prompts, wanted, from_ref = 0, [], [], []
    for b, (scene, conv) in enumerate(batch):
        if not conv.seg_objects:
            continue
        hidden = states[b, :-1][ids[b, 1:] == seg_id]
        tokens = model.seg_head(hidden).view(len(conv.seg_objects), model.config.sam2_hidden_tokens, -1)
        if distill:
            seg_prompts.append(tokens)
            wanted.append(distill_targets(model, scene, conv, color_prompts, ref_targets) if teacher is None
                          else kept[b].view_as(tokens))
            targeted = ref_targeted(conv) if ref_targets else {}
            from_ref += [i in targeted for i in range(len(conv.seg_objects))]
        images = model.prepare_sam2_video(scene.frames, cache=False).images
        targets = torch.from_numpy(np.stack([o.masks for o in conv.seg_objects])).float().to(device)
        for k, v in track_with_grad(model, images, tokens, targets, *scene.frames.shape[1:3]).items():
            mask_parts[k] = mask_parts[k] + v
        segmented += 1
    if segmented:
        losses.update({k: v / segmented for k, v in mask_parts.items()})
        losses["mask"] = total_mask_loss(losses)
        losses["jaccard"] = losses["jaccard"].detach()
    if seg_prompts:
        losses["distill"] = F.mse_loss(torch.cat(seg_prompts), torch.cat(wanted))
        if any(from_ref):  # how near the PixelQA seg prompts are to SAM 2's own tokens, for the log
            chosen = torch.tensor(from_ref, device=device)
            got, due = torch.cat(seg_prompts)[chosen], torch.cat(wanted)[chosen]
            losses["ref_distill"] = F.mse_loss(got, due).detach()
            dims = place_dims(model.sam2.sam_prompt_encoder)
            losses["place"] = F.mse_loss(got[..., dims], due[..., dims])
    losses["total"] = (losses["lm"] + losses.get("mask", 0.0) + distill * losses.get("distill", 0.0)
                       + attend_mem * losses.get("attend", 0.0) + place * losses.get("place", 0.0))
    return losses


@functools.cache
def shape_word_ids(tokenizer) -> torch.Tensor:
    """The first token of each shape word as answers write it (`A red circle.`, `Circle.`)."""
    forms = [f" {s}" for s in SHAPES] + [s.capitalize() for s in SHAPES]
    return torch.tensor([tokenizer.encode(w, add_special_tokens=False)[0] for w in forms])


@torch.no_grad()
def teacher_seg_prompts(teacher, processor, batch: list[tuple]) -> dict:
    """The teacher's seg prompts [segs, tokens * s] of each conversation that has segs (batch index ->
    prompts); the teacher runs over those conversations only (a batch is often half follow-ups)."""
    rows = [b for b, (_, conv) in enumerate(batch) if conv.seg_objects]
    if not rows:
        return {}
    _, ids, _, states = lm_forward(teacher, processor, [batch[b] for b in rows])
    at_segs = ids[:, 1:] == teacher.config.seg_token_id
    return {b: teacher.seg_head(states[k, :-1][at_segs[k]]) for k, b in enumerate(rows)}


@torch.no_grad()
def distill_targets(model, scene, conv, color_prompts: torch.Tensor, ref_targets: bool) -> torch.Tensor:
    """The prompt [n, k, s] each seg of `conv` is pulled toward (see `batch_losses`)."""
    wanted = color_prompts_of(conv.seg_objects, color_prompts).clone()
    if ref_targets:
        for i, spec in ref_targeted(conv).items():
            wanted[i] = ref_tokens(model.sam2, spec, *scene.frames.shape[1:3])
    return wanted


def ref_targeted(conv) -> dict:
    """The segs `ref_targets` pulls toward SAM 2's own tokens: PixelQA segs whose `<|ref|>` is on
    frame 0, the frame the seg tokens prompt (seg index -> its `RefSpec`)."""
    return {i: spec for i, spec in conv.seg_refs.items() if spec.frame == 0}


def seg_states(model, processor, seed: int = 0, num: int = 48, chunk: int = 32, turns: tuple[int, int] | None = None):
    """The language model's last states at the seg positions of `num` image conversations as the
    trainer draws them (`turns`), and the color index (`COLOR_NAMES`) of the object each one must
    segment. Conversations without a seg are drawn again."""
    rng = scene_rng(TRAIN_STREAM, seed, 10**9)  # an index no training step reaches
    states, colors = [], []
    for start in range(0, num, chunk):
        batch = []
        while len(batch) < min(chunk, num - start):
            scene, conv = sample(rng, 1, turns=turns)
            if conv.seg_objects:
                batch.append((scene, conv))
        with torch.no_grad():
            _, ids, _, last = lm_forward(model, processor, batch)
        states.append(last[:, :-1][ids[:, 1:] == model.config.seg_token_id].float())
        colors += [COLOR_NAMES.index(o.color) for _, conv in batch for o in conv.seg_objects]
    return torch.cat(states), torch.tensor(colors)


def refit_seg_head(model, states: torch.Tensor) -> float:
    """Re-initialise `seg_head` to read the part of the seg states that varies; returns that part's share.

    The language model's last state at a seg position is nearly the same vector in every
    conversation (a few dimensions of magnitude ~70 dominate; what names the object is ~3% of the
    norm), so after the head's RMSNorm every seg prompt was about the same, SAM 2 learned to
    segment the whole foreground, and the gradient into the language model was ~30x too small to
    change that. The first linear layer now drops the states' mean direction and scales the rest to
    unit size, as a freshly initialised layer expects.
    """
    _init_seg_head(model)
    with torch.no_grad():
        x = model.seg_head[0](states)
        mean = x.mean(0)
        varying = x - mean
        u = mean / mean.norm()
        project = torch.eye(len(u)) - torch.outer(u, u)
        linear = model.seg_head[1]
        linear.weight.copy_(linear.weight @ project / varying.pow(2).mean().sqrt())
        linear.bias.zero_()
    return float(varying.norm(dim=1).mean() / x.norm(dim=1).mean())


def fit_seg_head(model, states: torch.Tensor, colors: torch.Tensor, color_prompts: torch.Tensor,
                 steps: int = 400, lr: float = 1e-3) -> float:
    """Train `seg_head` alone (full batch, Adam) to map the seg states onto the color prompts of their
    objects; returns the final mean squared error.

    Inside the joint training the head moved too slowly to reach those prompts (its error stayed at
    the spread of the prompts, 0.84, for 120 steps at `--distill` 1 or 20) while SAM 2, getting
    about the same prompt for every object, drifted back to the foreground. From fixed states the
    head gets as close as the states allow within seconds (0.29 on one-turn referring states, 0.59
    on states of 3-7-turn conversations).
    """
    wanted = color_prompts[colors].to(states)
    return full_batch_adam(list(model.seg_head.parameters()),
                           lambda: F.mse_loss(model.seg_head(states).view_as(wanted), wanted), steps, lr)


def full_batch_adam(params: list[torch.Tensor], loss_fn, steps: int, lr: float) -> float:
    """Minimise `loss_fn()` over `params` alone for `steps` Adam steps on fixed data; returns the
    last loss. No gradient is left on `params` afterwards."""
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def shape_states(model, processor, seed: int = 0, batches: int = 40, **draw) -> tuple[torch.Tensor, torch.Tensor]:
    """The normed last states (what the LM head reads) at the positions that predict a shape word in
    `batches` batches of 8 conversations drawn as the trainer draws them (`draw`: `sample_batch`'s
    options), and the shape-word token each predicts."""
    rng = scene_rng(TRAIN_STREAM, seed, 10**9 + 1)  # an index no training step reaches
    words = shape_word_ids(processor.tokenizer).to(model.device)
    states, targets = [], []
    for _ in range(batches):
        batch = sample_batch(rng, 8, **draw)
        with torch.no_grad():
            _, ids, label_mask, last = lm_forward(model, processor, batch)
            normed = model.model.language_model.norm(last)
        where = label_mask[:, 1:] & torch.isin(ids[:, 1:], words)
        states.append(normed[:, :-1][where].float())
        targets.append(ids[:, 1:][where])
    return torch.cat(states), torch.cat(targets)


SPELLINGS = ("lowercase", "capitalized")  # ` circle` inside sentences, `Circle.` as a one-word answer


def fit_shape_head(model, tokenizer, states: torch.Tensor, targets: torch.Tensor, spellings=SPELLINGS,
                   decay: float = 0.01, steps: int = 400, lr: float = 3e-2) -> dict[str, float]:
    """Fit the LM head rows of the shape words (of the `spellings` asked for) to the states that
    predict them; returns each spelling's accuracy among its five words on the last quarter of the
    states (held out).

    Once a head looks at `<|mem|>` (`--attend-mem`), a linear probe reads the shape from the state
    before the answer's shape word about half the time, yet 80-140 more CPU steps of the LM loss
    left the answers at chance: the shape is a small part of a state whose large parts decide the
    other words, and the head rows move too slowly to find it. Fitted directly (a 5-way logistic
    regression per spelling, weight decay `decay`, the rows' common mean kept so that a shape word
    still comes where one is due), the rows read it, and the LM loss can then make it larger. The
    decay keeps the rows small enough that the other answer tokens stay as they were (measured:
    97.5% of them right before, 97.3% after)."""
    head = model.lm_head.weight
    accuracies = {}
    for spelling, group in zip(SPELLINGS, shape_word_ids(tokenizer).view(2, -1).to(targets.device)):
        if spelling not in spellings:
            continue
        chosen = torch.isin(targets, group)
        x, y = states[chosen], (targets[chosen][:, None] == group[None]).float().argmax(1)
        fit = len(x) * 3 // 4
        w = torch.zeros(len(group), x.shape[1], device=x.device, requires_grad=True)
        full_batch_adam([w], lambda: F.cross_entropy(x[:fit] @ w.T, y[:fit]) + decay * w.pow(2).sum(), steps, lr)
        w = (w - w.mean(0)).detach()
        accuracies[spelling] = float(((x[fit:] @ w.T).argmax(1) == y[fit:]).float().mean())
        with torch.no_grad():
            head[group] = (head[group].mean(0) + w).to(head)
    return accuracies


# ---- the loop ------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, warmup: int, spent: float = 0.0) -> float:
    """Linear warmup, then a cosine down to a tenth of `base`. `spent` is the share of a time budget
    used so far: the decay ends with the steps or the budget, whichever runs out first."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), spent))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    hold = hold or {}
    device = train_device()
    if color_prompts is not None:  # fixed prompts SAM 2 must keep answering to (see sam_stage)
        color_prompts = load_color_prompts(color_prompts).to(device)
    last = latest_checkpoint(out_dir) if resume else None
    if last is not None or init_from is not None:
        from ..model import load_model

        model, processor = load_model(str(last or init_from), device=device, dtype=torch.float32)
        start, state = 0, None
        if last is not None:  # resume; `init_from` only starts a new stage from its weights
            state = torch.load(last / "trainer_state.pt", weights_only=False)
            start = state["step"]
            torch.set_rng_state(state["torch_rng"])
        else:
            if reset_llm:
                reset_language_side(model, seed)
            if untie:
                untie_word_embeddings(model, processor.tokenizer, seed=seed)
            if redraw_head:
                redraw_shape_head(model, processor.tokenizer, seed)
            if fit_shape:
                states, targets = shape_states(model, processor, seed, video_prob=video_prob, frames=frames,
                                               qa_prob=qa_prob, turns=turns)
                spellings = SPELLINGS if fit_shape == "all" else (fit_shape,)
                accuracies = fit_shape_head(model, processor.tokenizer, states, targets, spellings)
                if lead:
                    print(f"shape-word head rows fitted on {len(states)} states: held-out accuracy {accuracies}",
                          flush=True)  # fmt: skip
            if fresh_decoder:
                fresh_mask_decoder(model, seed)
            if route_ref is not None:
                from .ref_route import route_ref_place

                report = route_ref_place(model, processor, seed, gain=route_ref)
                if lead:
                    print(f"ref place routed: {report}", flush=True)
            if calibrate:
                from .ref_route import calibrate_place

                fits = calibrate_place(model, processor, seed)
                if lead:
                    print(f"seg prompt place calibrated (scale, shift): {fits}", flush=True)
            if identity_read:
                from .identity_read import open_identity_read

                report = open_identity_read(model, seed)
                if lead:
                    print(f"SAM 2's prompt tokens read the object under them: {report}", flush=True)
            if refit_seg or fit_seg:
                states, colors = seg_states(model, processor, seed, num=640 if fit_seg else 48, turns=turns)
                share = refit_seg_head(model, states)
                if lead:
                    print(f"seg head refitted: the varying part is {share:.1%} of the seg state", flush=True)
                if fit_seg:  # every process fits the same head on the same states
                    error = fit_seg_head(model, states, colors, color_prompts)
                    if lead:
                        print(f"seg head fitted to the color prompts: squared error {error:.3f}", flush=True)
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


def export(checkpoint: str | Path, out_dir: str | Path, sam_from: str | Path | None = None,
           vision_from: str | Path | None = None) -> Path:
    """Ship a training checkpoint: parameters stored in float16 (buffers stay float32), no optimizer.

    `sam_from` takes SAM 2 from another checkpoint: a SAM stage run beside a language stage that held
    SAM 2, both anchored on the same fixed color prompts. `vision_from` likewise takes the vision
    tower and the `<|mem|>` projector (a vision stage run on after the language stage branched off).
    `load_model` reads the result back in the dtype it is asked for (float32 on CPU)."""
    from ..model import load_model

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
