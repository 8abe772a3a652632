"""LoRA: low-rank adapters beside the frozen projections, and merging them back for export.

The adapters live in their own pytree (the `lora` collection), never inside the base parameters, so that the
optimizer only ever sees LoRA leaves and "the reference policy" is the same base weights with LoRA switched off.
For a projection W (kernel shape in_shape + out_shape) the adapted output is
x·W + (alpha / rank) · dropout(x)·A·B with A: in_shape + (rank,) and B: (rank,) + out_shape; B starts at zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxagent.choices import LORA_TARGETS
from jaxagent.errors import UserError

VALID_TARGETS = LORA_TARGETS


class LoraConfigError(UserError):
    """A LoRA configuration that cannot be built; the message names the bad value and what is valid."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling, dropout and which projections get adapters (LOOP: r=16, alpha=32, all seven)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = VALID_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraConfigError(f"lora rank={self.rank!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"lora dropout={self.dropout!r} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in VALID_TARGETS]
        if unknown or not self.targets:
            raise LoraConfigError(f"lora targets {list(self.targets)!r} invalid; valid: {', '.join(VALID_TARGETS)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """The factor alpha / rank applied to the adapter's output."""
        return self.alpha / self.rank


def merge_lora(params: dict, lora_params: dict, lora: LoraConfig) -> dict:
    """Base parameters with every adapter folded into its kernel: W + (alpha/rank)·A·B. Returns a new pytree."""
    merged = dict(params)
    for name, sub in lora_params.items():
        if isinstance(sub, dict) and set(sub) == {"a", "b"}:
            kernel = params[name]["kernel"]
            delta = lora_delta(sub["a"], sub["b"], kernel.shape)
            new_kernel = kernel.astype(jnp.float32) + lora.scale * delta
            merged[name] = {**params[name], "kernel": new_kernel.astype(kernel.dtype)}
        elif isinstance(sub, dict):
            merged[name] = merge_lora(params[name], sub, lora)
    return merged


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """A·B reshaped to the kernel's shape, in float32.

    kernel = layers + in + out, a = layers + in + (rank,), b = layers + (rank,) + out, where `layers` is the
    stacked-layer axis of scanned parameters (present or not); the layer axis is a batch axis of the product.
    """
    n_layers = a.ndim + b.ndim - 2 - len(kernel_shape)
    layers = a.shape[:n_layers]
    a_flat = a.reshape(*layers, -1, a.shape[-1]).astype(jnp.float32)
    b_flat = b.reshape(*layers, b.shape[n_layers], -1).astype(jnp.float32)
    return jnp.matmul(a_flat, b_flat).reshape(kernel_shape)
