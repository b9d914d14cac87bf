"""The language stage's loop (`trainer`), what starts a stage (`stages`, `fits`, `ref_route`,
`identity_read`) and the shipped export."""
import json

import numpy as np
import pytest
import torch

from shapes_support import SHIPPED, needs_shipped


def test_the_schedule_ends_with_the_steps_or_the_time_budget():
    from unipixel.train.trainer import lr_at

    assert lr_at(0, 100, 1.0, 10, spent=0.9) == pytest.approx(0.1)  # warmup counts steps, not time
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, spent=0.2) == pytest.approx(0.55)  # half the steps done
    assert lr_at(10, 100, 1.0, 10, spent=0.5) == pytest.approx(0.55)  # half the time spent
    assert lr_at(10, 100, 1.0, 10, spent=1.0) == pytest.approx(0.1)


def test_two_workers_train_like_one_process_with_accumulation(tiny_checkpoint, tmp_path):
    """Data-parallel training (gradients all-reduced across processes) takes the same step as one
    process accumulating the same two conversations, and its checkpoint resumes."""
    from safetensors.torch import load_file

    from unipixel.train.trainer import train

    options = dict(init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0, turns=(1, 2), save_every=1)
    parallel = train(tmp_path / "parallel", 1, workers=2, **options)
    single = train(tmp_path / "single", 1, accum=2, **options)
    assert parallel.name == single.name == "checkpoint-1"
    a, b = load_file(parallel / "model.safetensors"), load_file(single / "model.safetensors")
    before = load_file(next(tiny_checkpoint.glob("*.safetensors")))
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
        moved += int(key in before and not torch.equal(a[key], before[key].to(a[key].dtype)))
    assert moved > 10  # the step changed the weights
    rows = [json.loads(line) for line in (tmp_path / "parallel" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["total"])
    resumed = train(tmp_path / "parallel", 2, **options)  # picks up checkpoint-1, trains step 2
    assert resumed.name == "checkpoint-2"


def test_untied_embeddings_keep_apart_and_survive_a_reload(tiny_checkpoint, tmp_path):
    from unipixel import load_model
    from unipixel.train.stages import untie_word_embeddings

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    before = model.get_input_embeddings().weight.detach().clone()
    words = {processor.tokenizer.decode([i]).strip().lower() for i in (300, 301)}  # two ordinary tokens
    ids = untie_word_embeddings(model, processor.tokenizer, words=words)
    after = model.get_input_embeddings().weight
    assert set(ids) >= {300, 301}
    assert model.lm_head.weight.data_ptr() != after.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, before)  # the output side starts where it was
    assert not torch.equal(after[ids], before[ids])
    assert torch.equal(after[[i for i in range(len(after)) if i not in ids]], before[[i for i in range(len(after)) if i not in ids]])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path), device="cpu")
    assert not again.config.tie_word_embeddings
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert torch.equal(again.get_input_embeddings().weight, after)


def test_hold_keeps_modules_while_the_rest_trains(tiny_checkpoint, tmp_path):
    from unipixel import load_model
    from unipixel.train.trainer import train

    out = train(tmp_path, 1, init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0, turns=(2, 3),
                batch_size=2, hold={"sam2": 1, "seg_head": 1})  # fmt: skip
    before = load_model(str(tiny_checkpoint), device="cpu")[0].state_dict()
    after = load_model(str(out), device="cpu")[0].state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and not any(k.startswith(("sam2.", "seg_head.")) for k in moved)
    assert any(k.startswith("model.language_model.") for k in moved)

    only = train(tmp_path / "only", 1, init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0, turns=(2, 3),
                 batch_size=2, train_only=("seg_head", "model.language_model.layers.0.self_attn"))  # fmt: skip
    after = load_model(str(only), device="cpu")[0].state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("seg_head.") for k in moved)
    assert all(k.startswith(("seg_head.", "model.language_model.layers.0.self_attn.")) for k in moved)

    # Training SAM 2 alone on conversations without a seg: nothing to learn, nothing moves.
    no_segs = train(tmp_path / "no_segs", 1, init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0,
                    qa_prob=1.0, turns=(1, 1), batch_size=2, train_only=("sam2.sam_mask_decoder",))  # fmt: skip
    after = load_model(str(no_segs), device="cpu")[0].state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_color_prompted_images_join_each_training_step(tiny_checkpoint, tmp_path):
    """With the SAM stage's color prompts, every step also segments images by those prompts and
    logs that loss next to the others."""
    from unipixel.train.sam_stage import run
    from unipixel.train.trainer import train

    run(tiny_checkpoint, tmp_path / "sam", steps=1, batch_size=1, warmup=1)
    prompts = tmp_path / "sam" / "color_tokens.pt"
    train(tmp_path / "joint", 1, init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0, turns=(1, 2),
          color_prompts=prompts, prompted=2)  # fmt: skip
    row = json.loads((tmp_path / "joint" / "train_log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["prompted"]) and row["prompted"] > 0
    assert np.isfinite(row["lm"]) and row["total"] > row["prompted"]


def test_refit_seg_head_reads_what_varies_in_the_seg_states(tiny_checkpoint):
    """After the refit, the head's first layer ignores the states' common direction (its output
    averages to zero over the states) and gives the varying part unit size."""
    from unipixel import load_model
    from unipixel.train.fits import refit_seg_head, seg_states

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    states, colors = seg_states(model, processor, num=6, chunk=4)
    assert colors.shape == states.shape[:1] and 0 <= int(colors.min()) and int(colors.max()) < 8
    assert states.ndim == 2 and states.shape[0] >= 6 and states.shape[1] == model.config.text_config.hidden_size
    share = refit_seg_head(model, states)
    assert 0.0 < share < 1.0
    with torch.no_grad():
        first = model.seg_head[1](model.seg_head[0](states))
    assert first.mean(0).abs().max() < 1e-3 * first.abs().max()
    assert 0.3 < float(first.std()) < 3.0


def test_fit_seg_head_maps_seg_states_onto_their_color_prompts(tiny_checkpoint):
    """The fit moves only seg_head, and brings its prompts from the seg states well below the error of
    the refitted head toward each object's color prompt."""
    from unipixel import load_model
    from unipixel.train.sam_prompts import COLOR_NAMES
    from unipixel.train.fits import fit_seg_head, refit_seg_head, seg_states

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    states, colors = seg_states(model, processor, num=24)
    refit_seg_head(model, states)
    prompts = torch.randn(len(COLOR_NAMES), model.config.sam2_hidden_tokens, model.sam2.hidden_dim,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    wanted = prompts[colors]
    with torch.no_grad():
        before = float((model.seg_head(states).view_as(wanted) - wanted).pow(2).mean())
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("seg_head.")}
    error = fit_seg_head(model, states, colors, prompts, steps=200, lr=3e-3)
    with torch.no_grad():
        after = float((model.seg_head(states).view_as(wanted) - wanted).pow(2).mean())
    assert after == pytest.approx(error, rel=0.05) and after < 0.5 * before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())


@needs_shipped
def test_the_shape_word_rows_are_redrawn_and_fitted_alone():
    """`redraw_shape_head` keeps each spelling's mean row and gives the five words orthogonal parts
    of the color words' size; `fit_shape_head` fits those rows (and no other) to states that tell
    the shapes apart, and reports the held-out accuracy; asked for one spelling, it leaves the other."""
    from unipixel import load_model
    from unipixel.train.fits import fit_shape_head, shape_states
    from unipixel.train.shapes_model import shape_word_ids
    from unipixel.train.stages import redraw_shape_head

    model, processor = load_model(str(SHIPPED), device="cpu")
    head = model.lm_head.weight
    words = shape_word_ids(processor.tokenizer)
    assert len(set(words.tolist())) == 10
    others = torch.ones(len(head), dtype=torch.bool)
    others[words] = False
    before = head.detach().clone()
    redraw_shape_head(model, processor.tokenizer, spread=0.7)
    for group in words.view(2, -1):
        parts = head[group] - head[group].mean(0)
        assert torch.allclose(head[group].mean(0), before[group].mean(0), atol=1e-5)
        assert torch.allclose(parts @ parts.T, 0.49 * torch.eye(5) - 0.49 / 5, atol=1e-4)
    assert torch.equal(head[others], before[others])

    states, targets = shape_states(model, processor, batches=1, video_prob=0.0, qa_prob=1.0)
    assert states.shape == (len(targets), model.config.text_config.hidden_size) and torch.isin(targets, words).all()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=gen)
    directions = torch.randn(10, states.shape[1], generator=gen)
    synthetic = torch.randn(400, states.shape[1], generator=gen) + 3 * directions[labels]
    accuracies = fit_shape_head(model, processor.tokenizer, synthetic, words[labels])
    assert set(accuracies) == {"lowercase", "capitalized"} and min(accuracies.values()) > 0.9
    spelling = words.view(2, -1)[labels[300:] // 5]  # the five words of each held-out state's spelling
    with torch.no_grad():
        scores = torch.einsum("nd,nkd->nk", synthetic[300:], head[spelling])
    assert (spelling.gather(1, scores.argmax(1, keepdim=True))[:, 0] == words[labels[300:]]).float().mean() > 0.9
    assert torch.equal(head[others], before[others])
    fitted = head.detach().clone()
    assert set(fit_shape_head(model, processor.tokenizer, synthetic[:40], words[labels[:40]], ("capitalized",))) == {"capitalized"}
    assert torch.equal(head[words[:5]], fitted[words[:5]]) and not torch.equal(head[words[5:]], fitted[words[5:]])


def test_the_ref_route_changes_only_the_links_it_builds(tiny_checkpoint):
    """`route_ref_place` rewrites the ref encoder's frequencies, the ref projections, layer 0's
    values and output and `seg_head`, and nothing else; `calibrate_place` then only rescales the seg
    prompt's place rows; the ref encoder gives SAM 2's place numbers among its own."""
    from unipixel import load_model
    from unipixel.train.ref_route import calibrate_place, route_ref_place
    from unipixel.train.sam_prompts import place_dims

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.config.half_precision
    report = route_ref_place(model, processor, seed=1, batches=2, fit_steps=20)
    assert report["segs"] > 0 and len(report["place_correlation"]) == 8
    assert not model.config.half_precision  # the route needs float32 (see the shipped model's test)
    built = ("ref_encoder.pe_layer", "ref_proj", "seg_head", "model.language_model.layers.0.self_attn.v_proj",
             "model.language_model.layers.0.self_attn.o_proj")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(built) for k in changed)
    assert any(k.startswith("model.language_model.layers.0.self_attn.v_proj") for k in changed)

    routed = {k: v.clone() for k, v in model.state_dict().items()}
    fits = calibrate_place(model, processor, seed=1, batches=1)
    again = calibrate_place(model, processor, seed=1, batches=1)  # the same data: nothing left to correct
    assert len(fits) == 8
    assert all(abs(b[0] - 1) < 0.02 and abs(b[1]) < 0.02 for a, b in zip(fits, again) if a[0] != 0)
    assert {k for k, v in model.state_dict().items() if not torch.equal(v, routed[k])} <= {"seg_head.3.weight",
                                                                                           "seg_head.3.bias"}

    encoders = (model.ref_encoder, model.sam2.sam_prompt_encoder)
    point = torch.tensor([[[30.0, 50.0], [7.0, 12.0]]])
    with torch.no_grad():
        codes = [e.pe_layer.forward_with_coords(point, e.input_image_size)[0] for e in encoders]
    for d in place_dims(model.sam2.sam_prompt_encoder):  # SAM 2's place numbers are among the ref encoder's
        assert any(torch.allclose(codes[0][:, j], codes[1][:, d], atol=1e-5) for j in range(codes[0].shape[1]))


def test_discriminant_directions_find_what_separates_the_classes():
    """Fisher's directions ignore a wide dimension that is the same for every class and find the
    narrow one the classes differ along, scaled to unit variance."""
    from unipixel.train.identity_read import discriminant_directions

    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(3), 200)
    feats = torch.randn(600, 6, generator=g) * torch.tensor([50.0, 1, 1, 1, 1, 0])  # one dimension always 0
    feats[:, 2] += torch.from_numpy(labels).float() * 3
    d = discriminant_directions(feats, labels, 1)
    assert d.shape == (1, 6)
    assert abs(float(d[0, 2] / d[0].norm())) > 0.99
    assert abs(float(((feats - feats.mean(0)) @ d.T).std()) - 1) < 1e-4


@needs_shipped
def test_identity_read_changes_the_shipped_sam2_only_by_its_two_idle_heads():
    """Before training, the opened heads add nothing (their output projection is zero), so SAM 2's
    masks are those of the shipped model with those two heads removed; they attend exactly like the
    place head, and what they read names the color of the object under a point (chance 1/8)."""
    from unipixel import load_model
    from unipixel.train.conversations import ref_spec
    from unipixel.train.eval import eval_scene
    from unipixel.train.identity_read import HEADS, PLACE_HEAD, open_identity_read
    from unipixel.train.sam_prompts import ref_tokens

    model, _ = load_model(str(SHIPPED), device="cpu")
    sam = model.sam2
    attention = sam.sam_mask_decoder.transformer.layers[0].cross_attn_token_to_image
    size = attention.internal_dim // attention.num_heads
    scenes = [eval_scene(i, 5) for i in range(0, 12, 2)]
    specs = [ref_spec(s.objects[0], 0, kind, np.random.default_rng(i)) for i, (s, kind) in
             enumerate(zip(scenes, ["point", "box"] * 3))]  # fmt: skip

    videos = [model.prepare_sam2_video(scene.frames) for scene in scenes]  # frame features encoded once
    tokens = [ref_tokens(sam, spec, *scene.frames.shape[1:3])[None] for scene, spec in zip(scenes, specs)]

    def masks():
        return [sam.segment(video, t) for video, t in zip(videos, tokens)]

    with torch.no_grad():
        for h in HEADS:
            attention.out_proj.weight[:, h * size : (h + 1) * size] = 0
    without_heads = masks()
    report = open_identity_read(model, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(masks(), without_heads))
    place = slice(PLACE_HEAD * size, (PLACE_HEAD + 1) * size)
    for h in HEADS:
        for proj in (attention.q_proj, attention.k_proj):
            assert torch.equal(proj.weight[h * size : (h + 1) * size], proj.weight[place])
    assert report["color_probe"] >= 0.6


def test_export_takes_sam2_and_the_vision_side_from_other_stages(tiny_checkpoint, tmp_path):
    """A language stage that held SAM 2, a SAM stage run beside it and a vision stage ship as one
    model: SAM 2 from the SAM stage, the vision tower and `<|mem|>` projector from the vision stage,
    everything else from the language stage, in float16."""
    from unipixel import load_model
    from unipixel.train import sam_stage, vision_stage
    from unipixel.train.checkpoints import export
    from unipixel.train.trainer import train

    lm = train(tmp_path / "lm", 1, init_from=tiny_checkpoint, lr=1e-3, warmup=1, video_prob=0.0, turns=(2, 3),
               batch_size=2, hold={"sam2": 1})  # fmt: skip
    sam = sam_stage.run(tiny_checkpoint, tmp_path / "sam", steps=1, batch_size=2, warmup=1)
    vision = vision_stage.run(tiny_checkpoint, tmp_path / "vision", steps=1, batch_size=2, warmup=1, lr=1e-2)
    shipped = export(lm, tmp_path / "ship", sam_from=sam, vision_from=vision)
    shipped = load_model(str(shipped), device="cpu")[0].state_dict()
    states = {name: load_model(str(path), device="cpu")[0].state_dict() for name, path in
              (("lm", lm), ("sam", sam), ("vision", vision))}  # fmt: skip
    # Each part differs between the stages, so the check below can tell where it came from.
    for a, b, prefix in (("lm", "sam", "sam2."), ("lm", "vision", "model.visual."), ("sam", "lm", "model.language_model.")):
        assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a] if k.startswith(prefix)), prefix
    for key, value in shipped.items():
        source = "sam" if key.startswith("sam2.") else "vision" if key.startswith(("model.visual.", "msk_proj.")) else "lm"
        assert torch.allclose(value, states[source][key], rtol=1e-3, atol=1e-3), key
