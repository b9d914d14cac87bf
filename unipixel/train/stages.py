"""What starts a stage: surgery on the weights it starts from (`trainer --init-from` and its flags).

Each operation keeps what still works and starts afresh, or fits by hand, the part that training
could not fix (the lab notes in NOTES.md say what each one fixed).
"""
from __future__ import annotations

import torch

from ..model import PixelQwen2_5_VLForConditionalGeneration
from ..model.sam2_video import build_sam2
from .fits import SPELLINGS, fit_seg_head, fit_shape_head, refit_seg_head, seg_states, shape_states
from .identity_read import open_identity_read
from .ref_route import calibrate_place, route_ref_place
from .scenes import SHAPES
from .shapes_model import init_seg_head, shape_word_ids


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
    init_seg_head(fresh)
    for name in LANGUAGE_SIDE:
        model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())


def start_stage(model, processor, seed: int, say, draw: dict, color_prompts: torch.Tensor | None = None, *,
                reset_llm: bool = False, untie: bool = False, redraw_head: bool = False, fit_shape: str | None = None,
                fresh_decoder: bool = False, route_ref: float | None = None, calibrate: bool = False,
                identity_read: bool = False, refit_seg: bool = False, fit_seg: bool = False) -> None:
    """Apply the asked-for operations to `model`, in the order a stage needs them. `draw`: how the
    stage draws its conversations (`sample_batch`'s options), which the fits sample states from;
    `say` reports each result (every process computes the same, one prints)."""
    if reset_llm:
        reset_language_side(model, seed)
    if untie:
        untie_word_embeddings(model, processor.tokenizer, seed=seed)
    if redraw_head:
        redraw_shape_head(model, processor.tokenizer, seed)
    if fit_shape:
        states, targets = shape_states(model, processor, seed, **draw)
        spellings = SPELLINGS if fit_shape == "all" else (fit_shape,)
        accuracies = fit_shape_head(model, processor.tokenizer, states, targets, spellings)
        say(f"shape-word head rows fitted on {len(states)} states: held-out accuracy {accuracies}")
    if fresh_decoder:
        fresh_mask_decoder(model, seed)
    if route_ref is not None:
        say(f"ref place routed: {route_ref_place(model, processor, seed, gain=route_ref)}")
    if calibrate:
        say(f"seg prompt place calibrated (scale, shift): {calibrate_place(model, processor, seed)}")
    if identity_read:
        say(f"SAM 2's prompt tokens read the object under them: {open_identity_read(model, seed)}")
    if refit_seg or fit_seg:
        states, colors = seg_states(model, processor, seed, num=640 if fit_seg else 48, turns=draw.get("turns"))
        share = refit_seg_head(model, states)
        say(f"seg head refitted: the varying part is {share:.1%} of the seg state")
        if fit_seg:  # every process fits the same head on the same states
            error = fit_seg_head(model, states, colors, color_prompts)
            say(f"seg head fitted to the color prompts: squared error {error:.3f}")
