"""The small UniPixel of the shapes model, built from scratch: its tokenizer, its sizes, its initialisation."""
from __future__ import annotations

import functools

import numpy as np
import torch
from sam2.modeling.sam.prompt_encoder import PromptEncoder

from ..model import PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration
from ..model.sam2_video import build_sam2
from ..model.tiny import build_processor, build_tokenizer, pixel_config
from .conversations import make_conversation
from .data import TRAIN_STREAM
from .scenes import SHAPES, make_scene

SAM_SIZE = 192  # SAM 2's input size from scratch (stage 36 raised the shipped model's to 256 in its config)


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
    init_seg_head(model)
    model.config.use_cache = True
    return model, build_processor(tokenizer)


def init_seg_head(model) -> None:
    d = model.config.text_config.hidden_size
    torch.nn.init.normal_(model.seg_head[1].weight, std=d**-0.5)
    torch.nn.init.normal_(model.seg_head[3].weight, std=1.5 * d**-0.5)



@functools.cache
def shape_word_ids(tokenizer) -> torch.Tensor:
    """The first token of each shape word as answers write it (`A red circle.`, `Circle.`)."""
    forms = [f" {s}" for s in SHAPES] + [s.capitalize() for s in SHAPES]
    return torch.tensor([tokenizer.encode(w, add_special_tokens=False)[0] for w in forms])
