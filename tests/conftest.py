"""Shared fixtures: tiny random Hugging Face models of every supported family, built locally with transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

VOCAB = 512

# name -> (transformers class name, config kwargs). Sizes are tiny but keep every structural feature.
FAMILIES = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2)),
    "llama3_gqa": ("Llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                 max_position_embeddings=1024,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama2": ("Llama", dict(num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5)),
    "qwen3": ("Qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}


def build_hf_model(folder: Path, family: str, seed: int = 0, num_layers: int = 2):
    """Save a random tiny model of `family` to `folder` (weights perturbed so biases and norms are not trivial)."""
    import torch
    import transformers

    prefix, kwargs = FAMILIES[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                        **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of a saved tiny random model for every family in FAMILIES."""
    root = tmp_path_factory.mktemp("hf_models")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        build_hf_model(folders[family], family)
    return folders


def hf_logits(folder: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits of the transformers model in `folder` (float32) for a batch, positions skipping left padding."""
    import torch
    from transformers import AutoModelForCausalLM

    mask = np.ones_like(ids) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(
            mask.astype(np.int64)), position_ids=torch.from_numpy(positions.astype(np.int64)))
    return out.logits.numpy()
