"""Device meshes and the rules that place the model's logical axes on them.

A mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters sharded) and
`tensor` (heads and MLP width split across devices). Parameters carry logical axis names (see
`jaxagent.models.transformer`); a rules table maps each logical name to mesh axes. There are two tables: training
shards parameters over `fsdp` and `tensor`; sampling keeps parameters whole across `fsdp` (decode steps would
otherwise all-gather every weight for every token) and splits only over `tensor`.

A dimension that a mesh axis does not divide evenly is left unsharded for that array, so tiny models and odd batch
sizes run on any mesh; the result is the same, only the placement differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxagent.errors import UserError
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import abstract_params, param_axes

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Mapping[str, str | tuple[str, ...] | None]

TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"), "length": None,
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "head_dim": None,
    "mlp": "tensor", "layers": None, "lora_rank": None,
    # Activations between layers: tokens split over `tensor` (sequence parallelism), the hidden width whole.
    "activation_length": "tensor", "activation_embed": None,
}
SAMPLE_RULES: Rules = {**TRAIN_RULES, "embed": None, "activation_length": None}

# Logical axes of the KV cache's fields (see transformer.KVCache).
CACHE_AXES = (("layers", "batch", "kv_heads", "length", "head_dim"),
              ("layers", "batch", "kv_heads", "length", "head_dim"),
              ("batch", "length"),
              ("batch",))


class MeshError(UserError):
    """A mesh shape that cannot be built on the devices present; the message says what would be valid."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1, meaning all the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes for `device_count` devices (the -1 axis filled in)."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        wildcards = [name for name, size in sizes.items() if size == -1]
        bad = [f"{name}={size}" for name, size in sizes.items() if size == 0 or size < -1]
        if bad or len(wildcards) > 1:
            raise MeshError(f"mesh {self._text()} invalid: sizes must be positive, with at most one -1")
        fixed = self.fixed_devices
        if wildcards:
            if device_count % fixed:
                raise MeshError(f"mesh {self._text()} does not divide {device_count} devices; "
                                f"the fixed axes' product ({fixed}) must divide {device_count}")
            sizes[wildcards[0]] = device_count // fixed
        elif fixed != device_count:
            raise MeshError(f"mesh {self._text()} needs {fixed} devices but {device_count} are present; "
                            f"valid: sizes whose product is {device_count} (or use -1 for one axis)")
        return sizes

    @property
    def fixed_devices(self) -> int:
        """The product of the sizes given (a -1 axis counts 1): the fewest devices this mesh needs."""
        return math.prod(size for size in (self.data, self.fsdp, self.tensor) if size != -1)

    def _text(self) -> str:
        return f"{{data: {self.data}, fsdp: {self.fsdp}, tensor: {self.tensor}}}"


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes data, fsdp, tensor shaped by `config`."""
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        unknown = sorted(set(config) - set(MESH_AXES))
        if unknown:
            raise MeshError(f"unknown mesh axes {unknown}; valid: {', '.join(MESH_AXES)}")
        config = MeshConfig(**config)
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[name] for name in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes: each dim gets the mesh axes its rule names that
    are larger than 1, divide the dim, and are not already used by an earlier dim."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape):
        rule = rules.get(name) if name is not None else None
        wanted = (rule,) if isinstance(rule, str) else tuple(rule or ())
        chosen = tuple(a for a in wanted if a not in used and mesh.shape[a] > 1)
        if chosen and size % math.prod(mesh.shape[a] for a in chosen):
            chosen = tuple(a for a in chosen if size % mesh.shape[a] == 0)[:1]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = TRAIN_RULES,
                    lora: LoraConfig | None = None) -> tuple[dict, dict]:
    """NamedShardings for every parameter and adapter leaf (the same tree structure as the parameters)."""
    axes, lora_axes = param_axes(config, lora)
    shapes, lora_shapes = abstract_params(config, lora)

    def place(spec: PartitionSpec, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, mesh, rules))

    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return (jax.tree.map(place, axes, shapes, is_leaf=is_spec),
            jax.tree.map(place, lora_axes, lora_shapes, is_leaf=is_spec))


def sharding_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    """A NamedSharding for one array (activations, caches, batches) from its logical axes."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def activation_placer(mesh: Mesh, rules: Rules | None = None):
    """`place(x, logical_axes)` for `transformer.activation_placement`: pins an activation to its sharding under
    `rules` (default: the training rules)."""

    def place(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, sharding_for(axes, x.shape, mesh, rules or TRAIN_RULES))

    return place


def leaf_sharding_fn(shardings: dict):
    """Adapter for `load_hf_params(shardings=...)`: a function from a leaf's path to its sharding."""

    def lookup(path: tuple[str, ...]) -> NamedSharding:
        node: Any = shardings
        for key in path:
            node = node[key]
        return node

    return lookup


def init_params_sharded(config: ModelConfig, rng: jax.Array, mesh: Mesh, rules: Rules = TRAIN_RULES,
                        lora: LoraConfig | None = None) -> tuple[dict, dict]:
    """Random parameters created directly in their shardings (no full copy on one device first)."""
    from jaxagent.models.transformer import init_params

    shardings = param_shardings(config, mesh, rules, lora)
    return jax.jit(lambda key: init_params(config, key, lora), out_shardings=shardings)(rng)
