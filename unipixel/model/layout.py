"""The published checkpoints' parameter names on disk (UniPixel spec §2 "On disk").

The authors saved with transformers 4.53 (legacy Qwen2.5-VL names) and their SAM 2 copy calls the
memory fuser's layer scale `weight`. We register the renaming with transformers' own conversion
mapping, so `from_pretrained` applies it when loading and `save_pretrained` reverts it when saving:
checkpoints travel both ways between the authors' code and ours.
"""
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming


def register_published_layout(class_name: str) -> None:
    # transformers keys Qwen2.5-VL's legacy names (`model.layers.*`, `visual.*`) by class name, so a
    # subclass has to ask for them; checkpoints already in the in-memory names load unchanged.
    mapping = get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration")
    mapping.append(
        WeightRenaming(r"^sam2.memory_encoder.fuser.layers.(\d+).weight", r"sam2.memory_encoder.fuser.layers.\1.gamma")
    )
    register_checkpoint_conversion_mapping(class_name, mapping, overwrite=True)
