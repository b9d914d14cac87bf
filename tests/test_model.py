"""The UniPixel model: published parameter layout, the three token paths, loading, caching."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, LogitsProcessor, LogitsProcessorList
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import unipixel
from unipixel import CheckpointError, PromptError
from unipixel.model import PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration, RefPrompt, mem_slots
from unipixel.model import processing as P
from unipixel.model.visual_prompts import mem_slot_cells

# UniPixel-3B config.json values (UniPixel spec §1), in the published flat layout.
UNIPIXEL_3B_CONFIG = {
    "architectures": ["PixelQwen2_5_VLForConditionalGeneration"],
    "model_type": "pixel_qwen2_5_vl",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "patch_size": 14,
    },
    "ref_token_id": 151665,
    "seg_token_id": 151666,
    "mem_token_id": 151667,
    "sam2_config": "configs/sam2.1_hiera_b+",
    "sam2_image_size": 768,
    "sam2_hidden_tokens": 2,
    "sam2_batch_mode": False,
    "sam2_enable_decoder": True,
    "sam2_apply_postprocessing": False,
    "sam2_checkpoint": "/authors/disk/sam2.1_hiera_base_plus.pt",
    "base_model_path": "/authors/disk/Qwen2.5-VL-3B-Instruct",
}


@pytest.fixture(scope="module")
def model_3b_shapes():
    config = PixelQwen2_5_VLConfig(**UNIPIXEL_3B_CONFIG)
    with torch.device("meta"):
        model = PixelQwen2_5_VLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


def test_3b_config_reads_published_flat_layout():
    config = PixelQwen2_5_VLConfig(**UNIPIXEL_3B_CONFIG)
    assert config.text_config.hidden_size == 2048 and config.text_config.num_hidden_layers == 36
    assert config.vision_config.hidden_size == 1280 and config.vision_config.intermediate_size == 3420
    assert config.vision_config.in_channels == 3  # a default the flat config leaves out
    assert (config.ref_token_id, config.seg_token_id, config.mem_token_id) == (151665, 151666, 151667)


def test_3b_parameter_names_and_shapes(model_3b_shapes):
    shapes, model = model_3b_shapes
    d, s, v = 2048, 256, 5120
    expected = {
        "seg_head.0.weight": (d,),
        "seg_head.1.weight": (d, d),
        "seg_head.3.weight": (s * 2, d),
        "ref_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "ref_encoder.not_a_point_embed.weight": (1, s),
        "ref_encoder.no_mask_embed.weight": (1, s),
        "ref_proj_single.weight": (3 * s, 2 * s),
        "ref_proj_double.weight": (3 * s, 3 * s),
        "ref_proj.1.weight": (d, 6 * s),
        "tem_pe.positional_encoding_gaussian_matrix": (1, s // 2),
        "tem_emb.weight": (1, s),
        "tem_proj.weight": (3 * s, s),
        "msk_proj.0.weight": (v, v),
        "msk_proj.2.weight": (d, v),
        "model.visual.merger.ln_q.weight": (1280,),
        "model.visual.merger.mlp.0.weight": (v, v),
        "model.visual.merger.mlp.2.weight": (d, v),
        "model.visual.blocks.31.mlp.gate_proj.weight": (3420, 1280),
        "model.language_model.layers.35.mlp.up_proj.weight": (11008, d),
        "model.language_model.embed_tokens.weight": (151936, d),
        "lm_head.weight": (151936, d),
        "sam2.image_encoder.trunk.pos_embed": (1, 112, 14, 14),
        "sam2.maskmem_tpos_enc": (7, 1, 1, 64),
        "sam2.no_obj_embed_spatial": (1, 64),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    for i in range(4):
        assert shapes[f"ref_encoder.point_embeddings.{i}.weight"] == (1, s)
    assert any(k.startswith("ref_encoder.mask_downscaling.") for k in shapes)
    sam_modules = {k.split(".")[1] for k in shapes if k.startswith("sam2.")}
    assert sam_modules == {
        "image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder", "sam_mask_decoder",
        "obj_ptr_proj", "obj_ptr_tpos_proj", "mask_downsample", "maskmem_tpos_enc", "no_mem_embed",
        "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial",
    }  # fmt: skip
    top = {k.split(".")[0] for k in shapes}
    assert top == {"model", "lm_head", "sam2", "seg_head", "ref_encoder", "ref_proj_single", "ref_proj_double",
                   "ref_proj", "tem_pe", "tem_emb", "tem_proj", "msk_proj"}  # fmt: skip
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied in the 3B
    total = sum(p.numel() for p in model.parameters())
    print(f"UniPixel-3B-config parameters: {total:,}")
    assert 3.7e9 < total < 4.0e9


# ---- the tiny checkpoint, end to end --------------------------------------------------------------
class ForceText(LogitsProcessor):
    """Steers greedy decoding of the real model to a fixed answer, to reach `<|seg|>` outputs."""

    def __init__(self, token_ids, prompt_len):
        self.ids, self.prompt_len = token_ids, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


def _inputs(model, processor, frames, text, answer=None):
    vision = P.encode_frames(processor, frames)
    features = model.encode_video(vision.pop("pixel_values_videos"), vision["video_grid_thw"])
    messages = [P.user_message(text, with_video=True)]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    inputs = P.tokenize_chat(processor, messages, vision["video_grid_thw"], add_generation_prompt=answer is None)
    return {**inputs, **vision, "video_features": features}


@pytest.fixture(params=[1, 6], ids=["image", "video6"])
def frames(request, rng):
    return rng.integers(0, 255, (request.param, 90, 120, 3), dtype=np.uint8)


def test_auto_classes_load_the_tiny_checkpoint(tiny_checkpoint):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert type(config) is PixelQwen2_5_VLConfig
    assert type(AutoModel.from_pretrained(tiny_checkpoint)) is PixelQwen2_5_VLForConditionalGeneration
    saved = json.loads((tiny_checkpoint / "config.json").read_text())
    assert saved["model_type"] == "pixel_qwen2_5_vl"
    assert saved["architectures"] == ["PixelQwen2_5_VLForConditionalGeneration"]
    assert (tiny_checkpoint / "model.safetensors.index.json").exists()
    assert (tiny_checkpoint / "preprocessor_config.json").exists()
    assert sum(f.stat().st_size for f in tiny_checkpoint.iterdir()) < 10e6


def test_load_model_refuses_missing_weights(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["tem_proj.weight"]
    tensors = load_file(broken / shard)
    del tensors["tem_proj.weight"]
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    del index["weight_map"]["tem_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tem_proj.weight"):
        unipixel.load_model(str(broken), device="cpu")


def test_text_only_question(tiny_model, frames):
    model, processor = tiny_model
    inputs = _inputs(model, processor, frames, "Please describe the video.")
    out = model.generate(**inputs, max_new_tokens=5)
    assert out.sequences.shape[1] > inputs["input_ids"].shape[1]
    assert out.masks is None


def test_point_box_and_mask_prompts_answer_with_masks(tiny_model, frames):
    model, processor = tiny_model
    t, h, w = frames.shape[:3]
    size = model.config.sam2_image_size
    refs = [RefPrompt.from_pixels(0, h, w, size, point=(30, 40)), RefPrompt.from_pixels(t - 1, h, w, size, box=(5, 5, 60, 70))]
    mask = torch.zeros(t, h, w, dtype=torch.bool)
    mask[-1, 20:50, 30:80] = True
    grid = P.encode_frames(processor, frames)["video_grid_thw"][0]
    text = P.mem_prefix([(0, mem_slots(mask, grid))], t) + "[1] <|ref|> [2] <|ref|>" + P.PIXELQA_SUFFIX
    inputs = _inputs(model, processor, frames, text)
    answer = processor.tokenizer("[1] <|seg|> [2] <|seg|><|im_end|>", add_special_tokens=False)["input_ids"]
    steer = LogitsProcessorList([ForceText(answer, inputs["input_ids"].shape[1])])
    video = model.prepare_sam2_video(frames)
    out = model.generate(**inputs, ref_prompts=refs, mem_masks=[mask], sam2_video=video,
                         logits_processor=steer, max_new_tokens=len(answer))  # fmt: skip
    assert out.sequences[0, inputs["input_ids"].shape[1] :].tolist() == answer
    assert out.masks.shape == (2, t, h, w) and out.masks.dtype == torch.bool


def test_teacher_forced_seg_in_one_prefill_matches_generate(tiny_model, frames):
    model, processor = tiny_model
    h, w = frames.shape[1:3]
    refs = [RefPrompt.from_pixels(0, h, w, model.config.sam2_image_size, point=(50, 30))]
    inputs = _inputs(model, processor, frames, "[1] <|ref|>" + P.PIXELQA_SUFFIX, answer="[1] <|seg|>")
    video = model.prepare_sam2_video(frames)
    out = model(**inputs, ref_prompts=refs, sam2_video=video)
    assert out.masks.shape == (1, len(frames), h, w)
    generated = model.generate(**inputs, ref_prompts=refs, sam2_video=video, max_new_tokens=1)
    assert torch.equal(generated.masks[:1], out.masks)  # input `<|seg|>` come first, same masks


def test_ref_prompt_changes_the_answer_state(tiny_model, rng):
    model, processor = tiny_model
    frames = rng.integers(0, 255, (1, 90, 120, 3), dtype=np.uint8)
    inputs = _inputs(model, processor, frames, "[1] <|ref|>", answer="[1] <|seg|>")
    size = model.config.sam2_image_size
    a = model(**inputs, ref_prompts=[RefPrompt.from_pixels(0, 90, 120, size, point=(10, 10))]).seg_hidden
    b = model(**inputs, ref_prompts=[RefPrompt.from_pixels(0, 90, 120, size, point=(100, 80))]).seg_hidden
    assert not torch.allclose(a, b)


def test_ref_embedding_follows_the_spec_formula(tiny_model):
    model, _ = tiny_model
    ref = RefPrompt.from_pixels(3, 90, 120, model.config.sam2_image_size, box=(10, 20, 60, 70))
    assert ref.labels.tolist() == [2, 3]
    want_xy = torch.tensor([[10 * 128 / 120, 20 * 128 / 90], [60 * 128 / 120, 70 * 128 / 90]])
    torch.testing.assert_close(ref.coords, want_xy)
    grid_t = 3
    with torch.no_grad():
        got = model.encode_ref_prompts([ref], grid_t)
        sparse, _ = model.ref_encoder(points=(ref.coords[None], ref.labels[None]), boxes=None, masks=None)
        assert sparse.shape[1] == 3  # two corners + the encoder's padding point
        x = 2 * (3 / (2 * grid_t - 1)) - 1
        y = 2 * math.pi * x * model.tem_pe.positional_encoding_gaussian_matrix[0]
        time = model.tem_proj(torch.cat([torch.sin(y), torch.cos(y)]) + model.tem_emb.weight[0])
        want = model.ref_proj(torch.cat([model.ref_proj_double(sparse.flatten(1))[0], time]))
    torch.testing.assert_close(got[0], want)


def test_mem_features_use_window_order(tiny_model, rng):
    """Spec §4: raster-order cell masks index the window-ordered merger inputs."""
    model, processor = tiny_model
    frames = rng.integers(0, 255, (2, 300, 420, 3), dtype=np.uint8)
    vision = P.encode_frames(processor, frames)
    features = model.encode_video(vision["pixel_values_videos"], vision["video_grid_thw"])
    mask = torch.zeros(2, 300, 420, dtype=torch.bool)
    mask[:, :60, :60] = True  # top-left corner cells only
    cells = mem_slot_cells(mask, vision["video_grid_thw"][0])[0].flatten()
    with torch.no_grad():
        got = model.encode_mem_masks([mask], features)
        want = model.msk_proj(features.merger_inputs[cells].mean(0))
        # The window order really differs from raster order here, so the choice matters.
        merged = model.model.visual.merger.mlp(features.merger_inputs)
        assert not torch.allclose(merged, features.embeds)
    torch.testing.assert_close(got[0], want)


def test_mem_embeddings_of_all_slots_at_once_equal_one_slot_at_a_time(tiny_model, rng):
    """`encode_mem_cells` projects every present slot's mean in one call: the same embeddings, in
    the same order (objects, then their slots), as projecting each slot's mean on its own."""
    model, processor = tiny_model
    frames = rng.integers(0, 255, (6, 120, 160, 3), dtype=np.uint8)
    vision = P.encode_frames(processor, frames)
    features = model.encode_video(vision["pixel_values_videos"], vision["video_grid_thw"])
    grid_t, grid_h, grid_w = (int(v) for v in vision["video_grid_thw"][0])
    objects = [torch.from_numpy(rng.random((grid_t, grid_h // 2, grid_w // 2)) < p) for p in (0.5, 0.2, 1.0)]
    objects[1][1] = False  # an absent slot has no embedding
    objects[1][0, 0, 0] = True
    per_slot = (grid_h // 2) * (grid_w // 2)
    with torch.no_grad():
        got = model.encode_mem_cells(objects, features)
        want = torch.stack([
            model.msk_proj(features.merger_inputs[t * per_slot : (t + 1) * per_slot][cells[t].flatten()].mean(0))
            for cells in objects for t in range(grid_t) if cells[t].any()
        ])  # fmt: skip
    assert got.shape == (sum(int(c.flatten(1).any(1).sum()) for c in objects), model.config.text_config.hidden_size)
    torch.testing.assert_close(got, want)


def _cells_by_definition(mask: torch.Tensor, grid_thw) -> torch.Tensor:
    """Spec §4 as the reference computes it: pair frames by max, resize to the LLM frame, pool by 28."""
    t, h, w = (int(v) for v in grid_thw)
    m = mask.to(torch.uint8)
    m = torch.cat([m, m[-1:]]) if m.shape[0] % 2 else m
    m = m if m.any() else torch.ones_like(m)
    m = m.view(-1, 2, *m.shape[1:]).amax(dim=1)
    m = torch.nn.functional.interpolate(m[:, None], size=(h * 14, w * 14), mode="nearest")
    return torch.nn.functional.max_pool2d(m.float(), kernel_size=28)[:, 0] > 0


@pytest.mark.parametrize("shape", [(16, 480, 640), (1, 90, 120), (5, 77, 131), (2, 1080, 1920)])
@pytest.mark.parametrize("content", ["sparse", "empty", "one pixel", "blob"])
def test_mem_slot_cells_follow_the_definition(rng, shape, content):
    """The fast cells (sampled rows and columns only) equal the resize-and-pool definition exactly."""
    t, h, w = shape
    rh, rw = smart_resize(h, w, factor=28, min_pixels=P.MIN_PIXELS, max_pixels=P.max_pixels(t))
    grid = torch.tensor([(t + t % 2) // 2, rh // 14, rw // 14])
    mask = torch.zeros(shape, dtype=torch.bool)
    if content == "sparse":  # isolated pixels: some fall between the rows or columns a resize samples
        mask = torch.from_numpy(rng.random(shape) < 2e-4)
    elif content == "one pixel":
        mask[-1, h // 3, w // 5] = True
    elif content == "blob":
        mask[0, h // 4 : h // 2, w // 3 : w // 2] = True
    assert torch.equal(mem_slot_cells(mask, grid), _cells_by_definition(mask, grid))


def test_mem_slots_and_text(rng):
    grid = torch.tensor([3, 20, 28])
    mask = torch.zeros(6, 90, 120, dtype=torch.bool)
    mask[3:5, 10:40, 10:40] = True  # frames 3 and 4: slots (2,3) and (4,5)
    assert mem_slots(mask, grid) == [1, 2]
    assert mem_slots(torch.zeros(6, 90, 120, dtype=torch.bool), grid) == [0, 1, 2]  # empty -> whole frame
    text = P.mem_prefix([(1, [1, 2])], 6)
    assert text == (
        "Here is a video with 6 frames denoted as <1> to <6>. The highlighted regions are as follows:\n"
        "[1]: <3>-<4> <|mem|> <5>-<6> <|mem|>\n"
    )
    assert P.mem_prefix([(0, [0])], 1) == "Here is an image with the following highlighted regions:\n[0]: <1> <|mem|>\n"


def test_mem_count_mismatch_is_refused(tiny_model, frames):
    model, processor = tiny_model
    inputs = _inputs(model, processor, frames, "[1]: <1> <|mem|> <|mem|> Describe [1].")
    mask = torch.zeros(len(frames), *frames.shape[1:3], dtype=torch.bool)
    mask[0, :10, :10] = True  # one slot -> one embedding for two tokens
    with pytest.raises(PromptError, match=r"2 <\|mem\|> token\(s\) but 1"):
        model(**inputs, mem_masks=[mask])


def test_mem_cells_stand_for_their_masks(tiny_model, frames):
    """A session sends `mem_slot_cells` instead of masks: the model reads exactly the same."""
    model, processor = tiny_model
    inputs = _inputs(model, processor, frames, "[1]: <1> <|mem|> Describe [1].")
    mask = torch.zeros(len(frames), *frames.shape[1:3], dtype=torch.bool)
    mask[0, 20:50, 30:70] = True
    cells = mem_slot_cells(mask, inputs["video_grid_thw"][0])
    with torch.no_grad():
        from_masks = model(**inputs, mem_masks=[mask]).logits
        from_cells = model(**inputs, mem_cells=[cells]).logits
        assert torch.equal(from_masks, from_cells)
        with pytest.raises(PromptError, match="masks or as cells, not both"):
            model(**inputs, mem_masks=[mask], mem_cells=[cells])
        with pytest.raises(PromptError, match=r"cells \(1, 2, 2\) do not match"):
            model(**inputs, mem_cells=[cells[:1, :2, :2]])


def test_prompt_outside_the_frame_is_refused():
    with pytest.raises(PromptError, match="outside the 120x90 frame"):
        RefPrompt.from_pixels(0, 90, 120, 768, point=(130, 10))
    with pytest.raises(PromptError, match="x1 < x2"):
        RefPrompt.from_pixels(0, 90, 120, 768, box=(50, 10, 20, 30))


def test_cached_and_uncached_sam2_paths_give_identical_masks(tiny_model, rng):
    model, _ = tiny_model
    frames = rng.integers(0, 255, (6, 90, 120, 3), dtype=np.uint8)
    hidden = torch.randn(3, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    cached = model.prepare_sam2_video(frames)
    with torch.no_grad():
        shared = model.decode_seg_masks(hidden, cached)
        assert len(cached.features) == 6  # every frame encoded once, then reused
        again = model.decode_seg_masks(hidden, cached)
        uncached = model.decode_seg_masks(hidden, model.prepare_sam2_video(frames, cache=False))
        # Reference style: a fresh, uncached state per `<|seg|>` token.
        reference = torch.cat(
            [model.decode_seg_masks(hidden[i : i + 1], model.prepare_sam2_video(frames, cache=False)) for i in range(3)]
        )
    assert shared.shape == (3, 6, 90, 120)
    assert torch.equal(shared, uncached) and torch.equal(shared, again)
    assert shared.any() and not shared.all()
    # One batched propagation for the three tokens: same masks up to float rounding at the edges.
    assert (shared != reference).float().mean() < 1e-3


def test_clicks_refine_a_seg_mask(tiny_model, rng):
    model, _ = tiny_model
    frames = rng.integers(0, 255, (4, 90, 120, 3), dtype=np.uint8)
    hidden = torch.randn(2, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    video = model.prepare_sam2_video(frames)
    click = (2, torch.tensor([[0.5, 0.5], [0.1, 0.1]]), torch.tensor([1, 0]))
    with torch.no_grad():
        plain = model.decode_seg_masks(hidden, video)
        refined = model.decode_seg_masks(hidden, video, clicks=[None, click])
    assert torch.equal(refined[0], plain[0])  # the object without clicks is untouched
    assert not torch.equal(refined[1], plain[1])  # frame 2 is now conditioned by the clicks


def test_segment_gives_each_group_its_own_track(tiny_model, rng):
    """`segment` returns one propagation's masks as they are when it held every object, and puts
    each group's masks at its objects' places otherwise: the same masks either way."""
    model, _ = tiny_model
    sam2 = model.sam2
    frames = rng.integers(0, 255, (4, 90, 120, 3), dtype=np.uint8)
    hidden = torch.randn(3, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    video = model.prepare_sam2_video(frames)
    click = (1, torch.tensor([[0.4, 0.6]]), torch.tensor([1]))
    with torch.no_grad(), model.sam2_autocast():
        tokens = model.seg_tokens(hidden)
        track = lambda prompts: sam2.track(video, prompts, ("forward",))  # noqa: E731
        together = sam2.segment(video, tokens)
        assert torch.equal(together, track(sam2.seg_prompts(tokens)))
        mixed = sam2.segment(video, tokens, clicks=[None, click, None])
        assert torch.equal(mixed[[0, 2]], track(sam2.seg_prompts(tokens[[0, 2]])))
        assert torch.equal(mixed[1:2], track(sam2.seg_prompts(tokens[1:2], click)))
    assert together.shape == mixed.shape == (3, 4, 90, 120) and together.dtype == mixed.dtype == torch.bool


def test_importing_unipixel_registers_the_auto_classes():
    import subprocess
    import sys

    code = (
        "import unipixel; from transformers import AutoConfig, CONFIG_MAPPING;"
        "print(CONFIG_MAPPING['pixel_qwen2_5_vl'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PixelQwen2_5_VLConfig"
