"""Config of the UniPixel model: a Qwen2.5-VL config plus the SAM 2 and special-token fields."""
from transformers import Qwen2_5_VLConfig


class PixelQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Reads the published flat `config.json` (UniPixel spec §1).

    Text fields at the top level are moved into `text_config` by the parent class, and vision
    fields that the checkpoint leaves out keep transformers' Qwen2.5-VL defaults.
    """

    model_type = "pixel_qwen2_5_vl"

    ref_token_id: int | None = None
    seg_token_id: int | None = None
    mem_token_id: int | None = None
    # A name known to unipixel.model.sam2_video (the published one is "configs/sam2.1_hiera_b+").
    sam2_config: str = "configs/sam2.1_hiera_b+"
    sam2_image_size: int = 768
    sam2_hidden_tokens: int = 2
    sam2_batch_mode: bool = False
    sam2_enable_decoder: bool = True
    sam2_apply_postprocessing: bool = False
    # False where the weights need float32 on every device: the offline model's hand-built `<|ref|>`
    # route gates its seg prompts on a signal that bfloat16 rounding of the last states buries.
    half_precision: bool = True
