"""A route for a PixelQA object's place, built by hand: from its `<|ref|>` to the seg prompt.

The seg prompt of `[1] <|seg|>` must tell SAM 2 where the object under the point or box is, and the
shipped SAM 2 finds an object from the place its own point tokens carry (`sam_stage
--point-channel`: 4 numbers per token, the sine and cosine of two frequencies). Measured on stage 18:
- the `<|ref|>` embedding carries the place only weakly: a linear probe reads those numbers with
  R^2 0.6-0.9, and only without any ridge;
- at the position before `<|seg|>`, nothing of it is left after layer 0 (R^2 0.00 at every layer),
  though layer 0's head 3 puts 0.65 of its attention on that `<|ref|>`;
- 110 CPU steps that trained the path's parameters under a loss on the place left it at R^2 0. The
  write and the read each wait for the other, so neither gets a gradient.

The route, every link linear (GELU is linear within 0.004 beyond `OFFSET`):
1. the ref encoder gives up its two weakest frequencies for SAM 2's two, so the place comes out as
   SAM 2's numbers;
2. 8 ref-projection features carry them for the prompt's two tokens, and 2 more say whether the
   `<|ref|>` is a point or a box; the ref embedding writes the 10 along directions of the layer-0
   input that no token uses;
3. 10 value dimensions of layer 0's second key-value head (the least used) read those directions;
   head 3 writes them into 10 directions of the residual stream that the last states (all of them,
   and those at segs) use least, and head 2, which shares the values, drops them;
4. 8 hidden units of `seg_head` (the least used) read the place and write the seg prompt's place
   dimensions;
5. beside the place, SAM 2 finds the object as well from the mean of its own tokens of that kind as
   from the tokens themselves (0.775 box IoU either way), but a fitted head gave PixelQA segs a
   prompt that wandered with the rest of the state (0.670). So the two kind signals push every other
   hidden unit far below zero (GELU then gives 0), and 2 kind units, each on unless its own kind is
   looked at, give the rest of the prompt: a constant for each kind, whatever the attention.
The rest of `seg_head` is fitted (full batch) around these links: onto the mean of SAM 2's own
tokens of the kind for the PixelQA segs, onto its own prompts for every other seg, which weigh more:
referring masks stand on them.

Head 3 puts only 0.71-0.79 of its attention on a lone `<|ref|>` (the rest on an early sink token), so
the place arrives shrunk by about that much; `calibrate_place` scales it back.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import TRAIN_STREAM, sample
from .fits import full_batch_adam
from .sam_prompts import place_dims, ref_tokens
from .steps import lm_forward, ref_targeted

WIDTH = 8  # 4 place numbers for each of the seg prompt's 2 tokens
KINDS = 2  # and whether the `<|ref|>` is a point or a box
OFFSET = 4.0
HEAD, KV_HEAD = 3, 1  # layer 0's head that looks up the `<|ref|>` (`--attend-head 0 3`), and its values


def prompt_place(model) -> list[int]:
    """The place dimensions of the seg prompt, as indices into `seg_head`'s flat output (tokens x s)."""
    s, dims = model.sam2.hidden_dim, place_dims(model.sam2.sam_prompt_encoder)
    return [t * s + d for t in range(model.config.sam2_hidden_tokens) for d in dims]


def _least(scores: torch.Tensor) -> torch.Tensor:
    return scores.argsort()[: WIDTH + KINDS]


def _quiet_directions(x: torch.Tensor, center: bool, also: torch.Tensor | None = None) -> torch.Tensor:
    """The WIDTH + KINDS unit directions [d, WIDTH + KINDS] along which the rows of `x` vary least
    (and those of `also`, each set's spread counted relative to its total)."""
    spread = 0
    for rows in (x,) if also is None else (x, also):
        if center:
            rows = rows - rows.mean(0)
        covariance = rows.T @ rows / len(rows)
        spread = spread + covariance / covariance.trace()
    return torch.linalg.eigh(spread)[1][:, : WIDTH + KINDS]


def _draw(rng, count: int, pixelqa_prob: float):
    return [sample(rng, int(rng.choice((8, 12))) if rng.random() < 0.2 else 1, qa_prob=0.2, turns=(3, 7),
                   pixelqa_prob=pixelqa_prob) for _ in range(count)]  # fmt: skip


@torch.no_grad()
def _statistics(model, processor, batches: list) -> dict:
    """Layer 0's inputs and values and the last states at every token, and the ref features that
    enter `ref_proj`'s linear layer."""
    layer = model.model.language_model.layers[0]
    seen = {"x": [], "v": [], "last": [], "ref": [], "seg": []}
    current = {}  # this batch's padded layer-0 tensors
    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda m, a: current.__setitem__("x", a[0])),
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: current.__setitem__("v", out)),
        model.ref_proj[0].register_forward_hook(lambda m, a, out: seen["ref"].append(out)),
    ]
    try:
        for batch in batches:
            _, ids, _, current["last"] = lm_forward(model, processor, batch)
            real = ids != processor.tokenizer.pad_token_id
            for key in ("x", "v", "last"):
                seen[key].append(current[key][real])
            seen["seg"].append(current["last"][:, :-1][ids[:, 1:] == model.config.seg_token_id])
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def lone_refs(rng, count: int) -> list:
    """`count` PixelQA conversations that open on one `<|ref|>` on frame 0 (images and 8 or 12 frames)."""
    drawn = []
    while len(drawn) < count:
        scene, conv = sample(rng, int(rng.choice((8, 12))) if rng.random() < 0.5 else 1, pixelqa_prob=1.0)
        if len(conv.refs) == 1 and conv.refs[0].frame == 0:
            drawn.append((scene, conv))
    return drawn


@torch.no_grad()
def _seg_data(model, processor, batches: list):
    """Last states at every seg of `batches`, the prompt each must give (SAM 2's own tokens for a
    PixelQA seg whose `<|ref|>` is on frame 0, what `seg_head` gives now for the others), which are
    the former, and which of those come from a box."""
    states, wanted, from_ref, boxes = [], [], [], []
    for batch in batches:
        _, ids, _, last = lm_forward(model, processor, batch)
        for b, (scene, conv) in enumerate(batch):
            if not conv.seg_objects:
                continue
            here = last[b, :-1][ids[b, 1:] == model.config.seg_token_id]
            tokens = model.seg_head(here).view(len(here), model.config.sam2_hidden_tokens, -1)
            targeted = ref_targeted(conv)
            for i, spec in targeted.items():
                tokens[i] = ref_tokens(model.sam2, spec, *scene.frames.shape[1:3])
            states.append(here)
            wanted.append(tokens.flatten(1))
            from_ref += [i in targeted for i in range(len(here))]
            boxes += [i in targeted and targeted[i].box is not None for i in range(len(here))]
    return torch.cat(states), torch.cat(wanted), torch.tensor(from_ref), torch.tensor(boxes)


def _route_ref_encoder(model, stats: dict) -> torch.Tensor:
    """Link 1 and the ref-projection half of link 2 (module docstring); returns the 8 ref features
    taken over, which `ref_proj`'s linear layer must then write into the residual stream."""
    sam_encoder, s = model.sam2.sam_prompt_encoder, model.sam2.hidden_dim
    dims = place_dims(sam_encoder)
    frequencies = model.ref_encoder.pe_layer.positional_encoding_gaussian_matrix
    half = frequencies.shape[1]
    weak = frequencies.norm(dim=0).argsort()[:2]
    frequencies[:, weak] = sam_encoder.pe_layer.positional_encoding_gaussian_matrix[:, :2]
    source = [d for i in weak.tolist() for d in (i, half + i)]  # in `place_dims` order
    taken = _least(model.ref_proj[1].weight[:, : 3 * s].norm(dim=0) * stats["ref"][:, : 3 * s].std(0))
    model.ref_proj[1].bias += model.ref_proj[1].weight[:, taken] @ stats["ref"][:, taken].mean(0)
    for kind, (proj, labels) in enumerate(((model.ref_proj_single, (1, -1)), (model.ref_proj_double, (2, 3)))):
        proj.weight[taken] = 0
        for k, feature in enumerate(taken[WIDTH:].tolist()):
            proj.bias[feature] = OFFSET + float(k == kind)
        for k, feature in enumerate(taken[:WIDTH].tolist()):
            token, j = divmod(k, 4)
            label = labels[token]
            # A point's second token is the padding point: no place, SAM 2's not-a-point embedding.
            sam_label = (sam_encoder.not_a_point_embed if label < 0 else sam_encoder.point_embeddings[label]).weight[0]
            proj.bias[feature] = OFFSET + sam_label[dims[j]]
            if label >= 0:
                proj.weight[feature, token * s + source[j]] = 1.0
                proj.bias[feature] -= model.ref_encoder.point_embeddings[label].weight[0, source[j]]
    return taken


def _route_seg_head(head, states, from_ref, residual, place: list[int], gain: float, gate: float,
                    sense: float) -> torch.Tensor:
    """Links 4 and 5 (module docstring) in `seg_head`, on units the head uses least now; returns them
    (the place units first)."""
    hidden = head[2](head[1](head[0](states)))
    units = _least(head[3].weight.norm(dim=0) * hidden.std(0))
    head[3].bias += head[3].weight[:, units] @ hidden[:, units].mean(0)
    head[3].weight[:, units] = 0
    head[3].weight[place] = 0
    head[3].bias[place] = -OFFSET
    size = float(states.pow(2).mean(-1).sqrt().mean())  # what the head's RMSNorm divides by
    # reads[k] . normed state ~ the attention on the `<|ref|>` x the k-th routed number
    reads = (residual / head[0].weight[:, None] * size / gain).T
    for k, unit in enumerate(units[:WIDTH].tolist()):
        head[1].weight[unit] = reads[k]
        head[1].bias[unit] = OFFSET
        head[3].weight[place[k], unit] = 1.0
    # A kind signal is about 0.75 at a PixelQA seg of that kind (the attention on its `<|ref|>`), at
    # most 0.06 elsewhere. Each kind unit is off (GELU of -sense x 0.45) where its kind is looked at
    # and steady elsewhere, and the gate puts every other unit at -gate x 0.75: the prompt of a point
    # (box) is then the bias plus the box (point) unit's steady output, whatever the state.
    kind_reads = reads[WIDTH:]
    baseline = (head[0](states[~from_ref]) @ kind_reads.T).median(0).values  # where no `<|ref|>` is looked at
    for k, unit in enumerate(units[WIDTH:].tolist()):
        head[1].weight[unit] = -sense * kind_reads[k]
        head[1].bias[unit] = sense * (0.3 + baseline[k])
    others = torch.ones(head[1].out_features, dtype=torch.bool)
    others[units] = False
    head[1].weight[others] -= gate * kind_reads.sum(0)
    head[1].bias[others] += gate * baseline.sum()
    return units


def _fit_around(head, units, place: list[int], states, wanted, weight, steps: int) -> None:
    """Fit `seg_head` (full batch) to `wanted` under squared error x `weight`; the route's own
    parameters get zero gradient, so Adam leaves them as built."""
    fixed_rows = torch.zeros(head[1].out_features, 1, dtype=torch.bool)
    fixed_rows[units] = True
    fixed_out = torch.zeros_like(head[3].weight, dtype=torch.bool)
    fixed_out[place] = True
    fixed_out[:, units[:WIDTH]] = True
    free = {head[1].weight: ~fixed_rows, head[1].bias: ~fixed_rows[:, 0], head[3].weight: ~fixed_out,
            head[3].bias: ~fixed_out.all(1)}
    hooks = [param.register_hook(lambda g, m=m: g * m) for param, m in free.items()]
    try:
        with torch.enable_grad():
            full_batch_adam(list(free), lambda: ((head(states) - wanted).pow(2) * weight).mean(), steps, 1e-3)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def route_ref_place(model, processor, seed: int = 0, gain: float = 3.0, batches: int = 24, fit_steps: int = 3000,
                    keep: float = 5.0, gate: float = 30.0, sense: float = 10.0) -> dict:
    """Build the route (module docstring) into `model`; returns how closely the seg prompts of the
    fitting data follow SAM 2's place numbers (correlation per number) and the squared error of the
    other dimensions, for the PixelQA segs and the others.

    `gain` scales what head 3 writes into the residual stream. More makes the PixelQA states easier
    for the fit to tell from the others, but the write also reaches the positions after `<|seg|>`:
    at 12 the answers there went wrong (teacher-forced accuracy 0.93 -> 0.85), at 3 they stay."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, 10**9 + 11])  # a stream no training step draws
    stats = _statistics(model, processor, [_draw(rng, 16, 0.5) for _ in range(3)])
    taken = _route_ref_encoder(model, stats)
    x = stats["x"] / stats["x"].pow(2).mean(-1, keepdim=True).sqrt()  # what layer 0's RMSNorm sees
    unused = _quiet_directions(x, center=False)
    scale = float(model.ref_proj[1](stats["ref"]).pow(2).mean(-1).sqrt().mean())  # a ref embedding's RMS
    model.ref_proj[1].weight[:, taken] = scale * unused
    model.ref_proj[1].bias -= scale * unused.sum(1) * OFFSET

    attention = model.model.language_model.layers[0].self_attn
    head_dim = attention.head_dim
    values = slice(KV_HEAD * head_dim, (KV_HEAD + 1) * head_dim)
    out = attention.o_proj.weight
    readers = [(HEAD - 1) * head_dim, HEAD * head_dim]  # the two query heads on that key-value head
    use = stats["v"][:, values].std(0) * sum(out[:, r : r + head_dim].norm(dim=0) for r in readers)
    channels = _least(use)
    # Quiet at every token (later layers read them everywhere) and at the seg states (the head reads them).
    residual = _quiet_directions(stats["last"], center=True, also=stats["seg"])
    norm_gain = model.model.language_model.layers[0].input_layernorm.weight
    for k, c in enumerate(channels.tolist()):
        attention.v_proj.weight[values.start + c] = unused[:, k] / norm_gain
        attention.v_proj.bias[values.start + c] = 0
        out[:, readers[0] + c] = 0
        out[:, readers[1] + c] = gain * residual[:, k]

    states, wanted, from_ref, boxes = _seg_data(model, processor, [_draw(rng, 16, 0.4) for _ in range(batches)])
    head, place = model.seg_head, prompt_place(model)
    rest = torch.ones(wanted.shape[1])
    rest[place] = 0
    # Beyond the place, SAM 2 finds the object as well from the mean of its own tokens of that kind
    # (box or point) as from the tokens themselves; their other frequencies vary with the place in
    # ways no state predicts.
    for kind in (boxes, from_ref & ~boxes):
        wanted[kind] = torch.where(rest.bool(), wanted[kind].mean(0), wanted[kind])
    units = _route_seg_head(head, states, from_ref, residual, place, gain, gate, sense)
    # The gate reads a signal of about 2 in the last state; bfloat16 rounds every direction of it by
    # about 0.17, which moves every other unit by 2.7 (float16: 8 times less).
    model.config.half_precision = False
    # The other segs weigh `keep` times as much: their prompts are what referring masks stand on.
    _fit_around(head, units, place, states, wanted, rest * torch.where(from_ref, 1.0, keep)[:, None], fit_steps)
    prompts = head(states)
    got, due = prompts[from_ref][:, place], wanted[from_ref][:, place]
    error = ((prompts - wanted).pow(2) * rest).sum(1) / rest.sum()
    return {"place_correlation": [round(float(torch.corrcoef(torch.stack([got[:, k], due[:, k]]))[0, 1]), 3)
                                  for k in range(len(place))],
            "error_pixelqa": round(float(error[from_ref].mean()), 4),
            "error_other": round(float(error[~from_ref].mean()), 4),
            "segs": len(states), "pixelqa_segs": int(from_ref.sum())}  # fmt: skip


@torch.no_grad()
def calibrate_place(model, processor, seed: int = 0, batches: int = 12) -> list[tuple[float, float]]:
    """Scale and shift each place number of the seg prompt (the rows of `seg_head`'s last layer) so that,
    on first-turn PixelQA questions about one object on frame 0 (the playground's first `[1]`), it
    matches SAM 2's own tokens in least squares. Returns each number's (scale, shift)."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, 10**9 + 13])  # a stream no training step draws
    states, wanted, from_ref, _ = _seg_data(model, processor, [lone_refs(rng, 8) for _ in range(batches)])
    place = prompt_place(model)
    last = model.seg_head[3]
    got, due = model.seg_head(states[from_ref])[:, place], wanted[from_ref][:, place]
    fits = []
    for k, row in enumerate(place):
        if due[:, k].std() < 1e-6:  # a point's padding token: SAM 2's constant not-a-point numbers
            scale, shift = 0.0, float(due[:, k].mean())
        else:
            design = torch.stack([got[:, k], torch.ones_like(got[:, k])], 1)
            scale, shift = torch.linalg.lstsq(design, due[:, k : k + 1]).solution[:, 0].tolist()
        last.weight[row] *= scale
        last.bias[row] = scale * last.bias[row] + shift
        fits.append((round(scale, 3), round(shift, 3)))
    return fits
