"""The UniPixel model, registered with transformers' Auto classes."""
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLProcessor

from .configuration import PixelQwen2_5_VLConfig
from .layout import register_published_layout
from .loading import default_device, default_dtype, load_model
from .modeling import PixelGenerateOutput, PixelQwen2_5_VLForConditionalGeneration, VideoFeatures
from .sam2_video import SAM2Video
from .visual_prompts import RefPrompt, cell_slots, mem_slot_cells, mem_slots

AutoConfig.register(PixelQwen2_5_VLConfig.model_type, PixelQwen2_5_VLConfig, exist_ok=True)
AutoModel.register(PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(PixelQwen2_5_VLConfig, PixelQwen2_5_VLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PixelQwen2_5_VLConfig, Qwen2_5_VLProcessor, exist_ok=True)
register_published_layout(PixelQwen2_5_VLForConditionalGeneration.__name__)

__all__ = [
    "PixelGenerateOutput",
    "PixelQwen2_5_VLConfig",
    "PixelQwen2_5_VLForConditionalGeneration",
    "RefPrompt",
    "SAM2Video",
    "VideoFeatures",
    "default_device",
    "default_dtype",
    "cell_slots",
    "load_model",
    "mem_slot_cells",
    "mem_slots",
]
