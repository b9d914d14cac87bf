"""A tiny UniPixel checkpoint in the published layout, built offline (random seeded weights)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from .configuration import PixelQwen2_5_VLConfig
from .modeling import PixelQwen2_5_VLForConditionalGeneration

# Qwen2.5's special tokens in their published order, then UniPixel's three (UniPixel spec §1).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
UNIPIXEL_TOKENS = ["<|ref|>", "<|seg|>", "<|mem|>"]

# Qwen2.5-VL's ChatML template (default system prompt, UniPixel spec §3).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Please segment the red circle. Please segment the tallest giraffe. It is [1] and [2].",
    "Here is a video with 16 frames denoted as <1> to <16>. The highlighted regions are as follows:",
    "Here is an image with the following highlighted regions: [0]: <1>",
    "Please describe the highlighted region. What is [1] doing? Please localize the relevant objects with IDs.",
    "Why is the boy crying? Please provide the segmentation mask and explain why. Sure, the answer is",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"()[]<>-_/",
]


def build_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on UniPixel's wording (plus `corpus`), with the Qwen special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4 + list(corpus or []), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS + UNIPIXEL_TOKENS})
    return fast


def pixel_config(tokenizer, *, text: dict, vision: dict, sam2_config: str, sam2_image_size: int):
    """A UniPixel config (flat text fields, like the published ones) with the tokenizer's token ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + UNIPIXEL_TOKENS}
    return PixelQwen2_5_VLConfig(
        architectures=["PixelQwen2_5_VLForConditionalGeneration"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, **vision},
        ref_token_id=ids["<|ref|>"],
        seg_token_id=ids["<|seg|>"],
        mem_token_id=ids["<|mem|>"],
        sam2_config=sam2_config,
        sam2_image_size=sam2_image_size,
        **text,
    )


def tiny_config(tokenizer) -> PixelQwen2_5_VLConfig:
    return pixel_config(
        tokenizer,
        text={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_position_embeddings": 32768,
        },
        vision={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 112, "tokens_per_second": 2,
        },
        sam2_config="unipixel/sam2_tiny",
        sam2_image_size=128,
    )  # fmt: skip


def build_processor(tokenizer) -> Qwen2_5_VLProcessor:
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 256 * 28 * 28 * 16}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write config, seeded safetensors, tokenizer, processor and chat template to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = PixelQwen2_5_VLForConditionalGeneration(config)
    # Small shards so the sharded (index + shards) loading path of the hub checkpoints is exercised.
    model.save_pretrained(out_dir, max_shard_size="1MB")
    processor = build_processor(tokenizer)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)  # preprocessor_config.json, as published
    return out_dir
