"""One training step's losses: the language model over a padded batch of conversations, the mask
losses through SAM 2's tracking, and the extra pulls (distillation, lookup attention)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..model import RefPrompt
from ..model import processing as P
from .losses import lm_loss, total_mask_loss
from .sam_prompts import color_prompts_of, place_dims, ref_tokens, track_with_grad
from .shapes_model import shape_word_ids


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
