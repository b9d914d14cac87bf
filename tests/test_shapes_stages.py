"""The SAM 2 stage (`sam_stage`) and the vision stage (`vision_stage`): each trains its own part."""
import json

import numpy as np
import torch

from unipixel.model import processing as P
from unipixel.train.data import scene_rng
from unipixel.train.scenes import COLORS, SHAPES, make_scene


def test_the_prompted_sam_stage_moves_only_sam2(tiny_checkpoint, tmp_path):
    """One step of the prompted SAM 2 stage (color, point and box prompts through the seg-token
    path) trains SAM 2 and nothing else, logs finite losses and saves a checkpoint to start from."""
    from unipixel import load_model
    from unipixel.train.sam_prompts import object_tokens
    from unipixel.train.sam_stage import run

    model, _ = load_model(str(tiny_checkpoint), device="cpu")
    sam, scene = model.sam2, make_scene(np.random.default_rng(4), 1, num_objects=2)
    table = torch.randn(len(COLORS), 2, sam.hidden_dim)
    h, w = scene.frames.shape[1:3]
    tokens = {k: object_tokens(sam, scene.objects[0], k, table, np.random.default_rng(0), h, w) for k in ("color", "point", "box")}
    assert all(t.shape == (2, sam.hidden_dim) for t in tokens.values())
    assert torch.equal(tokens["color"], table[list(COLORS).index(scene.objects[0].color)])
    elsewhere = object_tokens(sam, scene.objects[1], "point", table, np.random.default_rng(0), h, w)
    assert not torch.allclose(elsewhere, tokens["point"])  # a point prompt says where

    out = run(tiny_checkpoint, tmp_path, steps=1, batch_size=2, warmup=1, fresh_decoder=True)
    assert out.name == "checkpoint-1"
    before = model.state_dict()
    after = load_model(str(out), device="cpu")[0].state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k.split(".")[1] for k in moved} >= {"image_encoder", "sam_mask_decoder", "sam_prompt_encoder"}
    assert all(k.startswith("sam2.") for k in moved)
    row = json.loads((tmp_path / "sam_stage_log.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and np.isfinite(row["loss"]) and 0 <= row["jaccard"] <= 1
    saved = torch.load(tmp_path / "color_tokens.pt")
    assert saved["colors"] == list(COLORS) and saved["tokens"].shape == (len(COLORS), 2, sam.hidden_dim)


def test_a_continued_sam_stage_draws_new_scenes():
    """A step's scenes depend on its index alone: the same index gives the same scenes and prompt
    kinds, and a run continued from `first_step` meets scenes its predecessor (from step 0) did not."""
    from unipixel.train.sam_stage import draw_step

    args = (4, (0.25, 0.45, 0.3), 0.5, (4, 8))
    kinds, scenes, rng = draw_step(5000, *args)
    again_kinds, again, again_rng = draw_step(5000, *args)
    assert kinds == again_kinds and len(scenes) == 4 and set(kinds) <= {"color", "point", "box"}
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(scenes, again))
    assert rng.random() == again_rng.random()  # the prompts placed next are the same too
    earlier = [draw_step(k, *args)[1] for k in range(3)]
    assert not any(np.array_equal(scenes[0].frames, e[0].frames) for e in earlier)


def test_two_sam_stage_workers_share_their_gradients(tiny_checkpoint, tmp_path):
    """In two processes the SAM stage's first process draws the scenes one process alone draws, yet
    its step differs from that process's: the second process's gradient reached it. Still only SAM 2
    moves, and one log row and one checkpoint come out."""
    from safetensors.torch import load_file

    from unipixel.train.sam_stage import run

    options = dict(batch_size=1, warmup=1, kind_probs=(0.0, 0.5, 0.5))
    single = run(tiny_checkpoint, tmp_path / "single", 1, **options)
    parallel = run(tiny_checkpoint, tmp_path / "parallel", 1, workers=2, **options)
    assert parallel.name == single.name == "checkpoint-1"
    a, b = load_file(parallel / "model.safetensors"), load_file(single / "model.safetensors")
    before = load_file(next(tiny_checkpoint.glob("*.safetensors")))
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    moved = {k for k in a if k in before and not torch.equal(a[k], before[k].to(a[k].dtype))}
    assert differ and all(k.startswith("sam2.") for k in differ | moved)
    assert all(torch.isfinite(a[k]).all() for k in differ)
    rows = (tmp_path / "parallel" / "sam_stage_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]


def test_the_sam_stage_tracks_videos_under_fixed_color_prompts(tiny_checkpoint, tmp_path):
    """With videos and the color prompts of an earlier SAM stage, the SAM stage trains tracking
    (scored on the video scenes) and hands the same prompts on unchanged."""
    from unipixel.train.sam_stage import run

    table = torch.randn(len(COLORS), 2, 32)
    torch.save({"colors": list(COLORS), "tokens": table}, tmp_path / "given.pt")
    run(tiny_checkpoint, tmp_path / "out", steps=1, batch_size=2, warmup=1, video_prob=1.0, frames=(3,),
        color_prompts=tmp_path / "given.pt", log_every=1)  # fmt: skip
    row = json.loads((tmp_path / "out" / "sam_stage_log.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["jaccard_video"] <= 1 and np.isfinite(row["loss"])
    assert torch.equal(torch.load(tmp_path / "out" / "color_tokens.pt")["tokens"], table)


def test_the_sam_stage_prompts_by_the_kinds_asked_for_and_can_rescale_sam2(tiny_checkpoint, tmp_path):
    """`kind_probs` picks how objects are prompted (the log scores only the kinds drawn);
    `scale_mask_memory` multiplies the mask embedding of SAM 2's memory, leaving the frame part;
    `scale_frame_features` multiplies the stride-16 frame features, leaving the finer levels."""
    from unipixel import load_model
    from unipixel.train.sam_stage import run, scale_frame_features, scale_mask_memory

    run(tiny_checkpoint, tmp_path, steps=1, batch_size=2, warmup=1, kind_probs=(0.0, 0.0, 1.0), log_every=1)
    row = json.loads((tmp_path / "sam_stage_log.jsonl").read_text().splitlines()[-1])
    assert {k for k in row if k.startswith("jaccard_")} == {"jaccard_box"}

    model, _ = load_model(str(tiny_checkpoint), device="cpu")
    encoder = model.sam2.memory_encoder
    mask = torch.randn(1, 1, 64, 64)
    pixels = torch.randn(1, model.sam2.hidden_dim, 4, 4)
    with torch.no_grad():
        before_mask, before_pixels = encoder.mask_downsampler(mask), encoder.pix_feat_proj(pixels)
        scale_mask_memory(model, 20.0)
        assert torch.allclose(encoder.mask_downsampler(mask), 20 * before_mask, rtol=1e-5, atol=1e-5)
        assert torch.equal(encoder.pix_feat_proj(pixels), before_pixels)

        frames = torch.randn(1, 3, model.sam2.image_size, model.sam2.image_size)
        before = model.sam2.forward_image(frames)["backbone_fpn"]
        scale_frame_features(model, 0.1)
        after = model.sam2.forward_image(frames)["backbone_fpn"]
    assert torch.allclose(after[-1], 0.1 * before[-1], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after[:-1], before[:-1]))


def test_the_point_channel_attends_to_the_place_of_a_point(tiny_checkpoint, tmp_path):
    """After `open_point_channel`, the first layer's positional head(s) score every frame position
    by its distance to the point alone: the largest score is at the cell under the point, whatever
    the frame shows, because the frame features no longer carry anything in those dimensions."""
    from unipixel import load_model
    from unipixel.train.sam_prompts import place_dims
    from unipixel.train.sam_stage import open_point_channel, run

    model, _ = load_model(str(tiny_checkpoint), device="cpu")
    open_point_channel(model)
    sam = model.sam2
    opened = {k: v.clone() for k, v in model.state_dict().items()}
    trained = load_model(str(run(tiny_checkpoint, tmp_path, steps=1, batch_size=2, warmup=1, kind_probs=(0.0, 1.0, 0.0),
                                 point_channel=True)), device="cpu")[0].state_dict()  # fmt: skip
    for key, value in trained.items():  # the stage opens the channel, then holds the image encoder
        if key.startswith("sam2.image_encoder.") or not key.startswith("sam2."):
            assert torch.equal(value, opened[key]), key
    head = "sam2.sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"
    assert not torch.equal(trained[head], opened[head])
    encoder, layer = sam.sam_prompt_encoder, sam.sam_mask_decoder.transformer.layers[0]
    size, grid = sam.image_size, encoder.image_embedding_size[0]
    frames = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = sam.forward_image(frames)["backbone_fpn"][-1] + sam.no_mem_embed[0, 0][:, None, None]
        keys = (features + encoder.get_dense_pe()).flatten(2)[0].T  # [cells, s], raster order
        attention = layer.cross_attn_token_to_image
        rows = 4  # the sine and cosine of the two frequencies, in the first head(s)
        for x, y in [(5.0, 7.0), (size - 9.0, 20.0), (size / 2, size - 3.0)]:
            token, _ = encoder(points=(torch.tensor([[[x, y]]]), torch.tensor([[1]])), boxes=None, masks=None)
            scores = attention.k_proj(keys)[:, :rows] @ attention.q_proj(token[0, 0])[:rows]
            cell = int(y // (size / grid)) * grid + int(x // (size / grid))
            assert int(scores.argmax()) == cell
    assert features[0, place_dims(encoder)].abs().max() == 0 and features.abs().max() > 0


def test_the_vision_stage_moves_only_the_vision_side(tiny_checkpoint, tmp_path):
    """The vision stage trains the vision tower and the `<|mem|>` projector under shape and color
    classifiers, on whole batches through one vision-tower call that give each image's embeddings
    as the inference path does; its keeping term starts at zero (the model is its own reference)
    and grows once the tower moves; the rest of the model stays as it was."""
    from unipixel import load_model
    from unipixel.train.data import TRAIN_STREAM
    from unipixel.train.vision_stage import VISION_STAGE_SEED, SceneBatches, batch_embeddings, run

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    # A batch through one vision-tower call gives each image's embeddings as the inference path does.
    batch = SceneBatches(processor, 4, batch_size=2, objects=3).draw(3)
    rng = scene_rng(TRAIN_STREAM, VISION_STAGE_SEED, 3)
    alone = []
    for _ in range(2):
        scene = make_scene(rng, 1, num_objects=3)
        masks = [torch.from_numpy(o.masks) for o in scene.objects]
        vision = P.encode_frames(processor, scene.frames)
        with torch.no_grad():
            features = model.encode_video(vision["pixel_values_videos"], vision["video_grid_thw"])
            alone.append((features.embeds, model.encode_mem_masks(masks, features)))
    with torch.no_grad():
        embeds, mem = batch_embeddings(model, batch)
    assert mem.shape == (6, model.config.text_config.hidden_size) and embeds.shape[1] == mem.shape[1]
    torch.testing.assert_close(embeds, torch.cat([e for e, _ in alone]))
    torch.testing.assert_close(mem, torch.cat([m for _, m in alone]), atol=1e-4, rtol=1e-4)
    assert batch["shapes"][-3:].tolist() == [SHAPES.index(o.shape) for o in scene.objects]

    out = run(tiny_checkpoint, tmp_path, steps=2, batch_size=2, warmup=1, lr=1e-2, log_every=1, loaders=2)
    rows = [json.loads(r) for r in (tmp_path / "vision_stage_log.jsonl").read_text().splitlines()]
    assert rows[0]["keep"] == 0 and rows[1]["keep"] > 0
    assert all(np.isfinite(r["shape"]) and 0 <= r["shape_acc"] <= 1 for r in rows)
    before = model.state_dict()
    after = load_model(str(out), device="cpu")[0].state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("model.visual.blocks.") for k in moved) and any(k.startswith("msk_proj.") for k in moved)
    assert all(k.startswith(("model.visual.", "msk_proj.")) for k in moved)


def test_the_vision_stage_repeats_each_drawn_batch(tiny_checkpoint, tmp_path):
    """`repeat` takes that many steps on each drawn batch and stops at `steps` in the middle of one:
    the log says which pass each step was, and the second pass on a batch starts from a moved tower."""
    from unipixel.train.vision_stage import run

    out = run(tiny_checkpoint, tmp_path, steps=3, batch_size=2, warmup=1, lr=1e-2, log_every=1, repeat=2)
    rows = [json.loads(r) for r in (tmp_path / "vision_stage_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["seen"]) for r in rows] == [(1, 0), (2, 1), (3, 0)]
    assert rows[0]["keep"] == 0 and rows[1]["keep"] > 0
    assert out.name == "checkpoint-3"


def test_a_continued_vision_stage_draws_new_batches(tiny_checkpoint):
    """`first` starts the draws past the batches an earlier run took: the stream yields batch
    `first`, `first + 1`, ... (not batch 0 again), whatever the number of loaders."""
    from unipixel import load_model
    from unipixel.train.vision_stage import SceneBatches

    processor = load_model(str(tiny_checkpoint), device="cpu")[1]
    draws = SceneBatches(processor, 2, batch_size=1, objects=2, first=5)
    got = list(torch.utils.data.DataLoader(draws, batch_size=None, num_workers=2))
    assert len(got) == 2
    assert all(torch.equal(g["pixels"], draws.draw(k)["pixels"]) for g, k in zip(got, (5, 6)))
    assert not torch.equal(got[0]["pixels"], draws.draw(0)["pixels"])


def test_sharpening_scales_only_the_shape_part_of_mem_embeddings(tiny_checkpoint):
    """`sharpen_shapes` multiplies the differences between `<|mem|>` embeddings by the gain inside
    the shapes' discriminant span and leaves them as they were outside it."""
    from unipixel import load_model
    from unipixel.train.vision_stage import SceneBatches, batch_embeddings, sharpen_shapes

    model, processor = load_model(str(tiny_checkpoint), device="cpu")
    batch = SceneBatches(processor, 1, batch_size=2, objects=3).draw(0)
    with torch.no_grad():
        before = batch_embeddings(model, batch)[1]
        basis = sharpen_shapes([model], processor, gain=3.0, batches=2)
        after = batch_embeddings(model, batch)[1]
    assert basis.shape == (model.config.text_config.hidden_size, len(SHAPES) - 1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(len(SHAPES) - 1), atol=1e-5, rtol=0)
    d_before, d_after = before - before[0], after - after[0]
    torch.testing.assert_close(d_after @ basis, 3.0 * d_before @ basis, atol=1e-3, rtol=1e-3)
    outside = torch.eye(len(basis)) - basis @ basis.T
    torch.testing.assert_close(d_after @ outside, d_before @ outside, atol=1e-3, rtol=1e-3)
    assert (d_before @ basis).abs().max() > 1e-2  # the span is not empty for these objects
