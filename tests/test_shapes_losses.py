"""One training step's losses: the language model over a padded batch, the mask losses through
SAM 2's tracking, and the extra pulls (distillation, kept seg prompts, lookup attention)."""
import numpy as np
import pytest
import torch

from unipixel.model import processing as P
from unipixel.train.conversations import make_conversation
from unipixel.train.data import scene_rng
from unipixel.train.sam_prompts import track_with_grad
from unipixel.train.scenes import make_scene
from unipixel.train.steps import batch_losses, lm_forward, tokenize_with_labels

from shapes_support import SHIPPED, needs_shipped


def test_training_path_matches_the_inference_masks(tiny_model):
    """The differentiable SAM 2 path gives exactly the masks of `PixelSAM2VideoPredictor.segment`."""
    model, _ = tiny_model
    scene = make_scene(np.random.default_rng(1), 6, num_objects=2, hw=(224, 288))
    video = model.prepare_sam2_video(scene.frames)
    tokens = torch.randn(2, 2, model.sam2.hidden_dim, generator=torch.Generator().manual_seed(0)) * 3
    seen = []

    def spy(module, args, out):
        seen.append(out)

    hook = model.sam2.sam_mask_decoder.register_forward_hook(spy)
    try:
        with torch.no_grad():
            targets = torch.from_numpy(np.stack([o.masks for o in scene.objects])).float()
            track_with_grad(model, video.images, tokens, targets, 224, 288)
    finally:
        hook.remove()
    train_masks = []
    for masks, ious, _, score in seen:
        best = masks[torch.arange(2), ious.argmax(1)]
        best = torch.where(score[:, :, None] > 0, best, torch.full_like(best, -1024.0))
        up = torch.nn.functional.interpolate(best[:, None].float(), size=(224, 288), mode="bilinear")
        train_masks.append(up[:, 0] > 0)
    with torch.no_grad():
        inference = model.sam2.segment(video, tokens)
    assert torch.equal(torch.stack(train_masks, 1), inference)


def test_one_training_sample_backpropagates(tiny_model):
    model, processor = tiny_model
    rng = scene_rng(0, 0, 5)
    scene = make_scene(rng, 4, num_objects=2)
    conv = make_conversation(scene, rng, tasks=["referring", "pixelqa", "followup"])
    try:
        losses = batch_losses(model, processor, [(scene, conv)])
        losses["total"].backward()
        assert all(torch.isfinite(v).all() for v in losses.values())
        assert {"lm", "focal", "dice", "iou", "score"} <= set(losses)
        assert model.seg_head[3].weight.grad.abs().sum() > 0  # the mask losses reach the LLM side
        assert model.ref_proj[1].weight.grad.abs().sum() > 0
        assert model.msk_proj[2].weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_a_padded_batch_scores_each_conversation_as_alone(tiny_model):
    """The batched training forward (right padding, per-row 3D positions) gives the LM loss of each
    conversation run alone, averaged over all assistant tokens, and the mean of their mask losses."""
    model, processor = tiny_model
    batch = []
    for i, (frames, tasks) in enumerate([(1, ["referring", "followup"]), (4, ["pixelqa"]), (1, ["region"])]):
        rng = scene_rng(0, 3, i)
        scene = make_scene(rng, frames, num_objects=2)
        batch.append((scene, make_conversation(scene, rng, tasks=tasks)))
    with torch.no_grad():
        together = batch_losses(model, processor, batch)
        alone = [batch_losses(model, processor, [b]) for b in batch]
    tokens = []
    for scene, conv in batch:
        grid = P.encode_frames(processor, scene.frames)["video_grid_thw"]
        tokens.append(int(tokenize_with_labels(processor, conv.messages, grid)["label_mask"][0, 1:].sum()))
    expected_lm = sum(n * a["lm"] for n, a in zip(tokens, alone)) / sum(tokens)
    torch.testing.assert_close(together["lm"], expected_lm, atol=1e-4, rtol=1e-4)
    segmented = [a for a in alone if "mask" in a]
    assert len(segmented) == 2  # the region conversation has no <|seg|>
    torch.testing.assert_close(together["mask"], sum(a["mask"] for a in segmented) / 2, atol=1e-4, rtol=1e-4)


def test_distill_pulls_each_seg_prompt_toward_its_color_prompt(tiny_model):
    """`distill` adds the mean squared distance between each seg prompt and the color prompt of the
    object it must segment; the total counts it at that weight, and its gradient reaches seg_head."""
    from unipixel.train.sam_prompts import COLOR_NAMES

    model, processor = tiny_model
    rng = scene_rng(0, 0, 11)
    scene = make_scene(rng, 1, num_objects=3)
    conv = make_conversation(scene, rng, tasks=["referring", "referring"])
    prompts = torch.randn(len(COLOR_NAMES), model.config.sam2_hidden_tokens, model.sam2.hidden_dim)
    try:
        plain = batch_losses(model, processor, [(scene, conv)])
        pulled = batch_losses(model, processor, [(scene, conv)], prompts, distill=0.5)
        assert "distill" not in plain
        _, ids, _, states = lm_forward(model, processor, [(scene, conv)])
        seg = model.seg_head(states[0, :-1][ids[0, 1:] == model.config.seg_token_id]).view(2, 2, -1)
        wanted = prompts[[COLOR_NAMES.index(o.color) for o in conv.seg_objects]]
        assert torch.allclose(pulled["distill"], (seg - wanted).pow(2).mean(), rtol=1e-4)
        assert torch.allclose(pulled["total"], plain["total"] + 0.5 * pulled["distill"], rtol=1e-4)
        model.zero_grad(set_to_none=True)
        pulled["distill"].backward()
        assert model.seg_head[3].weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_ref_targets_pull_pixelqa_seg_prompts_toward_sam2s_own_tokens(tiny_model):
    """With `ref_targets`, a PixelQA seg (its `<|ref|>` on frame 0) is pulled toward SAM 2's own
    tokens of that point or box, every other seg toward its color prompt."""
    from unipixel.train.sam_prompts import COLOR_NAMES, place_dims, ref_tokens
    from unipixel.train.steps import distill_targets

    model, processor = tiny_model
    rng = scene_rng(0, 0, 12)
    scene = make_scene(rng, 1, num_objects=3)
    conv = make_conversation(scene, rng, tasks=["referring", "pixelqa"])
    assert conv.seg_refs and 0 not in conv.seg_refs and len(conv.seg_refs) == len(conv.refs)
    prompts = torch.randn(len(COLOR_NAMES), model.config.sam2_hidden_tokens, model.sam2.hidden_dim)
    colors = prompts[[COLOR_NAMES.index(o.color) for o in conv.seg_objects]]
    assert torch.equal(distill_targets(model, scene, conv, prompts, ref_targets=False), colors)
    wanted = distill_targets(model, scene, conv, prompts, ref_targets=True)
    for i in range(len(conv.seg_objects)):
        expected = ref_tokens(model.sam2, conv.seg_refs[i], *scene.frames.shape[1:3]) if i in conv.seg_refs else colors[i]
        assert torch.allclose(wanted[i], expected)

    # `place` weighs the dimensions of the PixelQA seg prompts that carry the place once more.
    plain = batch_losses(model, processor, [(scene, conv)], prompts, distill=1.0, ref_targets=True)
    placed = batch_losses(model, processor, [(scene, conv)], prompts, distill=1.0, ref_targets=True, place=3.0)
    _, ids, _, states = lm_forward(model, processor, [(scene, conv)])
    with torch.no_grad():
        seg = model.seg_head(states[0, :-1][ids[0, 1:] == model.config.seg_token_id]).view_as(wanted)
    chosen = sorted(conv.seg_refs)
    dims = place_dims(model.sam2.sam_prompt_encoder)
    assert torch.allclose(placed["place"], (seg[chosen][..., dims] - wanted[chosen][..., dims]).pow(2).mean(), rtol=1e-4)
    assert torch.allclose(placed["total"], plain["total"] + 3.0 * placed["place"], rtol=1e-4)


def test_keep_segs_holds_seg_prompts_to_the_starting_weights(tiny_model):
    """`--keep-segs`: each seg prompt is pulled toward the starting weights' own (a frozen teacher):
    no pull while the weights are the teacher's, a pull once a trained layer has moved."""
    import copy

    model, processor = tiny_model
    rng = scene_rng(0, 0, 12)
    scene = make_scene(rng, 1, num_objects=3)
    conv = make_conversation(scene, rng, tasks=["referring", "pixelqa"])
    student = copy.deepcopy(model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    same = batch_losses(student, processor, [(scene, conv)], distill=1.0, teacher=teacher)
    assert float(same["distill"].detach()) == 0.0
    with torch.no_grad():
        student.model.language_model.layers[1].mlp.down_proj.weight.mul_(3.0)
    moved = batch_losses(student, processor, [(scene, conv)], distill=1.0, teacher=teacher)
    _, ids, _, states = lm_forward(student, processor, [(scene, conv)])
    _, _, _, kept = lm_forward(teacher, processor, [(scene, conv)])
    at_segs = ids[0, 1:] == model.config.seg_token_id
    expected = (student.seg_head(states[0, :-1][at_segs]) - teacher.seg_head(kept[0, :-1][at_segs])).pow(2).mean()
    assert float(moved["distill"].detach()) > 0
    assert torch.allclose(moved["distill"], expected, rtol=1e-4)
    moved["distill"].backward()
    assert student.model.language_model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_write_guard_keeps_what_trained_layers_write_along_the_seg_reads(tiny_model):
    """`WriteGuard` undoes the part of a step that changes what an attention output or MLP down
    projection writes along `seg_head`'s hardest-read directions, and leaves the rest of the step."""
    import copy

    from unipixel.train.keep_segs import WriteGuard, seg_read_directions

    model = copy.deepcopy(tiny_model[0])
    u = seg_read_directions(model, 2)
    assert u.shape == (model.config.text_config.hidden_size, 2)
    assert torch.allclose(u.T @ u, torch.eye(2), atol=1e-5)
    layer = model.model.language_model.layers[1]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.language_model.layers.1."))
    guard = WriteGuard(model, u)
    assert len(guard.start) == 2  # o_proj and down_proj of the trained layer
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    guard()
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        change = dict(layer.named_parameters())[name] - before[name]
        assert (u.T @ change).abs().max() < 1e-5  # nothing new along the seg reads
        assert change.abs().max() > 1e-3  # the rest of the step stays
    assert not torch.equal(layer.self_attn.q_proj.weight, before["self_attn.q_proj.weight"])  # readers move freely


@needs_shipped
def test_lookups_pair_each_answer_with_the_memory_it_asks_about():
    """Mask-prompt answers look up their own question's `<|mem|>` tokens (not an earlier turn's),
    the position before each PixelQA `<|seg|>` the `<|ref|>` of the same object, and a referring
    answer's shape word that word in its question."""
    from unipixel import load_model
    from unipixel.train.shapes_model import shape_word_ids
    from unipixel.train.steps import _pad, lookups

    model, processor = load_model(str(SHIPPED), device="cpu")
    cfg, rng = model.config, scene_rng(0, 0, 21)
    batch = []
    for tasks in (["pixelqa", "followup", "region"], ["referring", "region"]):
        scene = make_scene(rng, 1, num_objects=3)
        batch.append((scene, make_conversation(scene, rng, tasks=tasks)))
    assert batch[1][1].messages[0]["content"][-1]["text"] == f"Please segment the {batch[1][1].seg_objects[0].name}."
    grid = torch.tensor([1, 16, 16])
    rows = [tokenize_with_labels(processor, conv.messages, grid) for _, conv in batch]
    ids, label_mask = _pad([r["input_ids"] for r in rows], 0), _pad([r["label_mask"] for r in rows], False)
    found = list(lookups(ids, label_mask, batch, cfg, shape_word_ids(processor.tokenizer)))
    assert [(b, kind) for b, _, _, kind in found] == [(0, "ref"), (0, "mem"), (0, "mem"), (1, "copy"), (1, "mem")]
    b, queries, keys, _ = found[0]
    assert ids[b, queries + 1].tolist() == [cfg.seg_token_id] and ids[b, keys].tolist() == [cfg.ref_token_id]
    mems = (ids[0] == cfg.mem_token_id).nonzero()[:, 0].tolist()
    assert len(mems) == 2 and found[1][2].tolist() == mems[:1] and found[2][2].tolist() == mems[1:]
    b, queries, keys, _ = found[3]
    shape = processor.tokenizer.encode(" " + batch[1][1].seg_objects[0].shape, add_special_tokens=False)
    assert ids[b, queries + 1].tolist() == shape and ids[b, keys].tolist() == shape and int(keys.max()) < int(queries.min())
    for b, queries, keys, kind in found[1:3] + found[4:]:
        assert bool(label_mask[b, queries + 1].all()) and int(keys.max()) < int(queries.min())
        assert ids[b, queries[-1] + 1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_lookup_loss_pulls_the_chosen_head_onto_the_memory(tiny_checkpoint):
    """`attend_mem` adds -log of the attention head (layer, head) puts on each lookup's keys; its
    gradient reaches that layer's query and key projections, and a head that looks only there
    scores zero."""
    from unipixel import load_model
    from unipixel.train.steps import lookup_attention_loss

    attention = torch.full((1, 6, 6), 0.1)
    attention[0, 4, 1] = attention[0, 5, 2] = 1.0
    assert float(lookup_attention_loss(attention, [(0, torch.tensor([4, 5]), torch.tensor([1, 2]), "mem")])) == pytest.approx(
        -np.log(1.1 + 1e-6), abs=1e-5)  # fmt: skip
    assert float(lookup_attention_loss(attention, [(0, torch.tensor([4]), torch.tensor([1]), "ref")])) == pytest.approx(0, abs=1e-5)
    assert lookup_attention_loss(attention, []) is None

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    model.set_attn_implementation("eager")
    rng = scene_rng(0, 0, 22)
    scene = make_scene(rng, 1, num_objects=2)
    conv = make_conversation(scene, rng, tasks=["region", "followup"])
    losses = batch_losses(model, processor, [(scene, conv)], attend_mem=2.0, attend_head=(1, 0))
    assert float(losses["attend"].detach()) > 0
    assert float(losses["total"].detach()) == pytest.approx(float(losses["lm"] + 2.0 * losses["attend"]), rel=1e-5)
    losses["attend"].backward()
    layers = model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[1].self_attn.o_proj.weight.grad is None  # the output side is left to the LM loss
