"""Models: the decoder, LoRA adapters, and Hugging Face checkpoint import/export."""

from jaxagent.models.config import ModelConfig, ModelConfigError, RopeConfig
from jaxagent.models.lora import LoraConfig, merge_lora
from jaxagent.models.transformer import (
    DecoderOutput,
    KVCache,
    abstract_params,
    forward,
    init_cache,
    init_params,
    param_axes,
    positions_from_segments,
)

__all__ = [
    "DecoderOutput", "KVCache", "LoraConfig", "ModelConfig", "ModelConfigError", "RopeConfig", "abstract_params",
    "forward", "init_cache", "init_params", "merge_lora", "param_axes", "positions_from_segments",
]
