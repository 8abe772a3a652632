"""Reading Hugging Face config.json files: every family's switches, and errors that name the key."""

from __future__ import annotations

import numpy as np
import pytest

from jaxagent.models.config import ModelConfig, ModelConfigError, RopeConfig, rope_inverse_frequencies

BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2}


def test_family_switches():
    qwen2 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (True, False, False, True)
    qwen3 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
    llama = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "attention_bias": True})
    assert (llama.qkv_bias, llama.o_bias, llama.head_dim, llama.num_kv_heads) == (True, True, 8, 2)


def test_old_and_new_rope_formats_agree():
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    a = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", **new})
    b = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", **old})
    assert a.rope == b.rope and a.rope.rope_type == "llama3"


def test_llama3_rope_bands_follow_the_formula():
    rope = RopeConfig(theta=5e5, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    plain = rope_inverse_frequencies(RopeConfig(theta=5e5), 128)
    scaled = rope_inverse_frequencies(rope, 128)
    wavelength = 2 * np.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192 / 1
    np.testing.assert_allclose(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)
    middle = ~short & ~long
    assert middle.any() and np.all(scaled[middle] < plain[middle]) and np.all(scaled[middle] > plain[middle] / 8)


def test_hf_dict_round_trip_keeps_the_model():
    config = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen3ForCausalLM"]})
    again = ModelConfig.from_hf_dict(config.to_hf_dict())
    assert again == config


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architectures \\['GPT2LMHeadModel'\\]; valid: "),
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2' and no architectures entry"),
    ({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4}}, "unsupported rope type 'yarn'; valid"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"model_type": "llama", "num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"model_type": "llama", "vocab_size": None}, "missing required key 'vocab_size'"),
])
def test_bad_config_names_key_and_valid_values(change, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf_dict({**BASE, **change}, source="x/config.json")
