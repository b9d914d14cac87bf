"""Heads fitted directly on fixed states (full batch), where joint training moved them too slowly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import TRAIN_STREAM, sample, sample_batch, scene_rng
from .sam_prompts import COLOR_NAMES
from .shapes_model import init_seg_head, shape_word_ids
from .steps import lm_forward


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
    init_seg_head(model)
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
