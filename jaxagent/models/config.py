"""Model configuration read from a Hugging Face `config.json`.

One frozen dataclass covers every supported family (Qwen2/2.5, Llama 2/3/3.x, Qwen3); the differences between
them are a handful of switches (q/k/v bias, q/k norm, tied embeddings, RoPE scaling), so the decoder has one code path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxagent.errors import UserError

# architectures entry -> family. The family decides the defaults HF applies for keys a config.json may omit.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPE_TO_FAMILY = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_KERNELS = ("blockwise", "dense")

DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
    "fp16": jnp.float16,
    "float64": jnp.float64,
    "f64": jnp.float64,
}


class ModelConfigError(UserError):
    """A model configuration that jaxagent cannot run; the message names the file, key and valid values."""


def resolve_dtype(name: str | Any) -> Any:
    """Map a dtype name (`f32`, `bf16`, `float32`, ...) or a dtype object to a JAX dtype."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        dtype = DTYPES[name.lower()]
    except KeyError:
        raise ModelConfigError(f"unknown dtype {name!r}; valid: {', '.join(sorted(DTYPES))}") from None
    if dtype is jnp.float64 and not jax.config.jax_enable_x64:  # JAX would silently compute in float32
        raise ModelConfigError(f"dtype {name!r} needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 before the command")
    return dtype


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype sums, softmaxes and norms run in for a compute dtype: float32 for float32 and below (bfloat16 and
    float16 products accumulate in float32), float64 for a float64 model (a reference run with no float32 step)."""
    return jnp.promote_types(dtype, jnp.float32)


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype as Hugging Face writes it in `torch_dtype` (`float32`, `bfloat16`, `float16`)."""
    return np.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or the older `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only transformer, plus the dtypes jaxagent runs it in."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32  # compute dtype of activations
    param_dtype: Any = jnp.float32  # storage dtype of parameters
    remat: str = "none"  # rematerialisation per layer: none | full | dots (save matmul outputs)
    # blockwise: flash-style, memory linear in the sequence (the default); dense: all scores at once (the reference)
    attention: str = "blockwise"
    attention_block: int = 512  # query and key block of the blockwise kernel
    # The block while sampling (prefill chunks and decode steps, which attend over the KV cache); 0: attention_block.
    # A decode step whose cache fits one block takes the dense kernel, so a small model can train on short blocks
    # (which skip the masked future and other segments) and still decode without the blockwise loops.
    sampling_block: int = 0
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ModelConfigError(f"unknown remat {self.remat!r}; valid: none, full, dots")
        if self.attention not in ATTENTION_KERNELS:
            raise ModelConfigError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTION_KERNELS)}")
        if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int) \
                or self.attention_block < 1:
            raise ModelConfigError(f"attention_block={self.attention_block!r} must be a positive integer")
        if isinstance(self.sampling_block, bool) or not isinstance(self.sampling_block, int) \
                or self.sampling_block < 0:
            raise ModelConfigError(f"sampling_block={self.sampling_block!r} must be a positive integer, or 0 for "
                                   f"attention_block")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_params(self) -> int:
        """Number of parameters (without LoRA), as Hugging Face counts them."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd) if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (dtypes accept names such as `bf16`)."""
        for key in ("dtype", "param_dtype"):
            if key in changes:
                changes[key] = resolve_dtype(changes[key])
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json --------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides: Any) -> "ModelConfig":
        """Build from the dict of a Hugging Face `config.json`; `source` names the file in error messages."""
        family = _family_of(hf, source)

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ModelConfigError(f"{source}: missing required key {key!r} for a {family} model")
            return hf[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        if hf.get("use_sliding_window"):
            raise ModelConfigError(f"{source}: use_sliding_window=true is not supported; valid: false")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; valid: 'silu'")
        attention_bias = bool(hf.get("attention_bias", False))
        config = cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_of(hf, source),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 have them on q/k/v/o when attention_bias is set.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            hf_config=dict(hf),
        )
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_hf_dir(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        """Read `config.json` from a Hugging Face model folder."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ModelConfigError(f"{file}: not found; expected a Hugging Face model folder with config.json")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ModelConfigError(f"{file}: not valid JSON ({err})") from None
        return cls.from_hf_dict(hf, source=str(file), **overrides)

    def to_hf_dict(self) -> dict:
        """The Hugging Face `config.json` dict for this model (the imported one, updated to the parameter dtype)."""
        hf = dict(self.hf_config) if self.hf_config else _fresh_hf_dict(self)
        hf["torch_dtype"] = dtype_name(self.param_dtype)
        hf["dtype"] = dtype_name(self.param_dtype)
        hf["tie_word_embeddings"] = self.tie_word_embeddings
        hf.setdefault("architectures", [_architecture_of(self.family)])
        return hf


def _family_of(hf: dict, source: str) -> str:
    architectures = hf.get("architectures") or []
    if architectures:
        for arch in architectures:
            if arch in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[arch]
        raise ModelConfigError(
            f"{source}: unsupported architectures {architectures}; valid: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[model_type]
    raise ModelConfigError(
        f"{source}: unsupported model_type {model_type!r} and no architectures entry; "
        f"valid architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _architecture_of(family: str) -> str:
    return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[family]


def _rope_of(hf: dict, source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: unsupported rope type {rope_type!r}; valid: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    fields: dict[str, Any] = {"theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
                              "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ModelConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
        fields["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ModelConfigError(f"{source}: rope type 'llama3' needs {key!r}")
        fields["low_freq_factor"] = float(params["low_freq_factor"])
        fields["high_freq_factor"] = float(params["high_freq_factor"])
        fields["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**fields)


def _fresh_hf_dict(config: ModelConfig) -> dict:
    """A config.json for a model that was created in jaxagent rather than imported."""
    rope: dict[str, Any] = {"rope_type": config.rope.rope_type, "rope_theta": config.rope.theta}
    if config.rope.rope_type in ("linear", "llama3"):
        rope["factor"] = config.rope.factor
    if config.rope.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope.low_freq_factor, high_freq_factor=config.rope.high_freq_factor,
                    original_max_position_embeddings=config.rope.original_max_position_embeddings)
    hf = {
        "architectures": [_architecture_of(config.family)],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope.theta,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.family != "qwen2":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = config.mlp_bias
    return hf


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, float32, with the configured scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the middle band interpolated.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq
