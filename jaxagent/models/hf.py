"""Hugging Face checkpoints: safetensors (single file or sharded index) -> parameters, and parameters -> safetensors.

Import validates everything first (config, index, every file's header and size, every tensor's name and shape) and
only then reads data, tensor by tensor: a stacked parameter is filled one layer at a time into a donated buffer,
so host memory holds the weights plus one layer's tensor, never a second full copy. Loaded into shardings (a mesh),
each device's block is read alone from the file wherever it is one range of the file's layout, so a process of a
multi-host job reads only what its own devices hold. Export writes shards of bounded
size into a temporary folder that is renamed into place at the end, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxagent.atomic import staged_folder
from jaxagent.errors import UserError
from jaxagent.models.config import ModelConfig, ModelConfigError
from jaxagent.models.lora import LoraConfig, lora_delta
from jaxagent.models.transformer import abstract_params

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
}


class CheckpointError(UserError):
    """A checkpoint that cannot be imported; the message names the file or tensor and what was expected."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one HF tensor maps onto (a layer of) one jaxagent leaf.

    `hf_name` has `{i}` for the layer index of stacked leaves. `kind` is `copy` (same layout), `kernel` (HF stores
    [out, in]; jaxagent stores in_shape + out_shape) or `bias` (flat in HF, shaped in jaxagent).
    """

    path: tuple[str, ...]
    hf_name: str
    kind: str
    n_in: int = 1  # input dims of a kernel (2 for the attention output projection: heads, head_dim)


def tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """The HF tensor of every jaxagent parameter leaf of this model."""
    attn = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."
    rules = [TensorRule(("embedding",), "model.embed_tokens.weight", "copy"),
             TensorRule(("final_norm", "scale"), "model.norm.weight", "copy")]
    if not config.tie_word_embeddings:
        rules.append(TensorRule(("lm_head",), "lm_head.weight", "kernel"))
    for name in ("q", "k", "v"):
        rules.append(TensorRule(("layers", "attn", name, "kernel"), f"{attn}{name}_proj.weight", "kernel"))
        if config.qkv_bias:
            rules.append(TensorRule(("layers", "attn", name, "bias"), f"{attn}{name}_proj.bias", "bias"))
    rules.append(TensorRule(("layers", "attn", "o", "kernel"), f"{attn}o_proj.weight", "kernel", n_in=2))
    if config.o_bias:
        rules.append(TensorRule(("layers", "attn", "o", "bias"), f"{attn}o_proj.bias", "bias"))
    if config.qk_norm:
        rules.append(TensorRule(("layers", "attn", "q_norm", "scale"), f"{attn}q_norm.weight", "copy"))
        rules.append(TensorRule(("layers", "attn", "k_norm", "scale"), f"{attn}k_norm.weight", "copy"))
    for name in ("gate", "up", "down"):
        rules.append(TensorRule(("layers", "mlp", name, "kernel"), f"{mlp}{name}_proj.weight", "kernel"))
        if config.mlp_bias:
            rules.append(TensorRule(("layers", "mlp", name, "bias"), f"{mlp}{name}_proj.bias", "bias"))
    rules.append(TensorRule(("layers", "input_norm", "scale"), "model.layers.{i}.input_layernorm.weight", "copy"))
    rules.append(TensorRule(("layers", "post_attn_norm", "scale"),
                            "model.layers.{i}.post_attention_layernorm.weight", "copy"))
    return rules


def _hf_shape(rule: TensorRule, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for one layer of a leaf whose (per-layer) jaxagent shape is `leaf_shape`."""
    if rule.kind == "kernel":
        return (int(np.prod(leaf_shape[rule.n_in:])), int(np.prod(leaf_shape[: rule.n_in])))
    if rule.kind == "bias":
        return (int(np.prod(leaf_shape)),)
    return tuple(leaf_shape)


def to_jax_layout(rule: TensorRule, hf_array: np.ndarray, leaf_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor in jaxagent's layout for one layer (a view where possible)."""
    if rule.kind == "kernel":
        return hf_array.T.reshape(leaf_shape)
    return hf_array.reshape(leaf_shape)


def to_hf_layout(rule: TensorRule, leaf: np.ndarray) -> np.ndarray:
    """One layer of a jaxagent leaf in HF's layout (contiguous, ready to save)."""
    if rule.kind == "kernel":
        n_in = int(np.prod(leaf.shape[: rule.n_in]))
        return np.ascontiguousarray(leaf.reshape(n_in, -1).T)
    if rule.kind == "bias":
        return np.ascontiguousarray(leaf.reshape(-1))
    return np.ascontiguousarray(leaf)


# ---- reading ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what the file header says of it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds every byte the header promises."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes); not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: truncated; header says {header_len} header bytes, file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    needed = 8 + header_len + max((info["data_offsets"][1] for info in header.values()), default=0)
    if size < needed:
        raise CheckpointError(f"{file}: truncated; expected at least {needed} bytes, found {size}")
    return {name: TensorInfo(file, info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a HF folder (single file or sharded index), with its file, dtype and shape."""
    folder = Path(folder)
    index_file, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_file}: not a safetensors index (missing weight_map: {err})") from None
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = folder / shard
            if not shard_file.is_file():
                raise CheckpointError(f"{shard_file}: missing shard listed in {index_file.name}")
            tensors.update(read_header(shard_file))
        missing = sorted(name for name in weight_map if name not in tensors)
        if missing:
            raise CheckpointError(f"{folder / weight_map[missing[0]]}: tensor {missing[0]!r} listed in "
                                  f"{INDEX_FILE} is not in the file")
        return tensors
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face safetensors folder")


def _leaf_at(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def validate_checkpoint(folder: Path, config: ModelConfig) -> dict[str, TensorInfo]:
    """Check that every tensor the model needs is present with the right shape and a float dtype."""
    tensors = checkpoint_tensors(folder)
    abstract, _ = abstract_params(config)
    for rule in tensor_rules(config):
        leaf_shape = _leaf_at(abstract, rule.path).shape
        stacked = rule.path[0] == "layers"
        per_layer = leaf_shape[1:] if stacked else leaf_shape
        expected = _hf_shape(rule, per_layer)
        for i in range(config.num_layers if stacked else 1):
            name = rule.hf_name.format(i=i)
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"{folder}: tensor {name!r} missing (expected shape {list(expected)})")
            if info.shape != expected:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"expected {list(expected)}")
            if info.dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, "
                                      f"expected one of {', '.join(_SAFETENSORS_DTYPES)}")
    return tensors


class _TensorReader:
    """Keeps safetensors files open while a checkpoint is read; tensors come back as NumPy arrays."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self.bytes_read = 0  # what was asked of the files (a whole tensor or the blocks of one)

    def _handle(self, info: TensorInfo) -> Any:
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="numpy")
        return handle

    def read(self, info: TensorInfo, name: str) -> np.ndarray:
        array = self._handle(info).get_tensor(name)
        self.bytes_read += array.nbytes
        return array

    def read_block(self, info: TensorInfo, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """One block of a tensor, in the file's layout; only that block is read from disk."""
        array = self._handle(info).get_slice(name)[index]
        self.bytes_read += array.nbytes
        return array

    def close(self) -> None:
        self._handles.clear()


ShardingFn = Callable[[tuple[str, ...]], jax.sharding.Sharding | None]


def load_hf_params(folder: str | Path, config: ModelConfig | None = None,
                   shardings: ShardingFn | None = None, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Read a HF folder into (config, params), converting to `config.param_dtype` on the way.

    `config_overrides` (e.g. `param_dtype="bf16"`, `dtype="bf16"`, `remat="full"`) adjust the config read from
    `config.json`. `shardings(path)` may return where each leaf goes (default: the default device).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; expected a Hugging Face model folder")
    if config is None:
        config = ModelConfig.from_hf_dir(folder, **config_overrides)
    elif config_overrides:
        config = config.replace(**config_overrides)
    tensors = validate_checkpoint(folder, config)
    abstract, _ = abstract_params(config)
    params: dict = {}
    reader = _TensorReader()
    try:
        for rule in tensor_rules(config):
            leaf = _leaf_at(abstract, rule.path)
            sharding = shardings(rule.path) if shardings else None
            _set_leaf(params, rule.path, _load_leaf(reader, tensors, rule, leaf, config, sharding))
            reader.close()  # unmap the files: mapped pages would otherwise count as a second copy in RSS
    finally:
        reader.close()
    log.info("loaded %s (%s, %.1fM parameters) from %s", config.family, np.dtype(config.param_dtype).name,
             config.num_params / 1e6, folder)
    return config, params


def _load_leaf(reader: _TensorReader, tensors: dict[str, TensorInfo], rule: TensorRule, leaf: jax.ShapeDtypeStruct,
               config: ModelConfig, sharding: jax.sharding.Sharding | None) -> jax.Array:
    dtype = leaf.dtype
    if isinstance(sharding, jax.sharding.NamedSharding):
        return _load_sharded_leaf(reader, tensors, rule, leaf, config, sharding)
    if rule.path[0] != "layers":
        name = rule.hf_name
        array = to_jax_layout(rule, reader.read(tensors[name], name), leaf.shape).astype(dtype)
        return jax.device_put(array, sharding)
    # Stacked leaf: allocate it once where it belongs, then write one layer at a time into the donated buffer.
    buffer = _zeros(leaf.shape, dtype, sharding)
    for i in range(config.num_layers):
        name = rule.hf_name.format(i=i)
        layer = to_jax_layout(rule, reader.read(tensors[name], name), leaf.shape[1:]).astype(dtype)
        buffer = _write_layer(buffer, layer, jnp.int32(i))
    return buffer


def _load_sharded_leaf(reader: _TensorReader, tensors: dict[str, TensorInfo], rule: TensorRule,
                       leaf: jax.ShapeDtypeStruct, config: ModelConfig, sharding: jax.sharding.NamedSharding
                       ) -> jax.Array:
    """A leaf built shard by shard: each of this process's devices gets the block of the HF tensor(s) it holds,
    read alone from the file (a process of a multi-host job never reads another host's slices)."""
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))

    def block_reader(name: str, shape: tuple[int, ...]):
        blocks: dict[tuple, np.ndarray] = {}  # replicated shards share one read

        def read(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple(part.indices(size)[:2] for part, size in zip(index, shape))
            if key not in blocks:
                blocks[key] = _read_part(reader, tensors[name], name, rule, shape, key).astype(leaf.dtype)
            return blocks[key]
        return read

    if rule.path[0] != "layers":
        return jax.make_array_from_callback(leaf.shape, sharding, block_reader(rule.hf_name, leaf.shape))
    if spec[0] is not None:
        raise CheckpointError(f"{'.'.join(rule.path)}: the layer axis cannot be sharded (spec {sharding.spec})")
    layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    buffer = _zeros(leaf.shape, leaf.dtype, sharding)
    for i in range(config.num_layers):
        name = rule.hf_name.format(i=i)
        layer = jax.make_array_from_callback(leaf.shape[1:], layer_sharding, block_reader(name, leaf.shape[1:]))
        buffer = _write_layer(buffer, layer, jnp.int32(i))
    return buffer


def _read_part(reader: _TensorReader, info: TensorInfo, name: str, rule: TensorRule, shape: tuple[int, ...],
               bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block `bounds` ((start, stop) per dim of jaxagent's layout) of one HF tensor. When the block is one
    contiguous block of the file's layout too, only it is read; otherwise the whole tensor is, then cut."""
    index = tuple(slice(a, b) for a, b in bounds)
    if rule.kind == "kernel":  # HF [out, in] -> jaxagent in_shape + out_shape
        split = rule.n_in
        rows = _flat_range(shape[split:], bounds[split:])
        cols = _flat_range(shape[:split], bounds[:split])
        if rows is not None and cols is not None:
            block = reader.read_block(info, name, (slice(*rows), slice(*cols)))
            return block.T.reshape([b - a for a, b in bounds])
    elif rule.kind == "bias":  # HF flat -> jaxagent shaped
        flat = _flat_range(shape, bounds)
        if flat is not None:
            return reader.read_block(info, name, (slice(*flat),)).reshape([b - a for a, b in bounds])
    elif tuple(info.shape) == tuple(shape):  # same layout
        return reader.read_block(info, name, index)
    return np.ascontiguousarray(to_jax_layout(rule, reader.read(info, name), shape)[index])


def _flat_range(shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
    """The [start, stop) of a block in the row-major flattening of `shape`, or None when the block is not one
    contiguous range there: every dim after the last cut one must be whole, every dim before it one entry wide."""
    cut = [i for i, ((a, b), size) in enumerate(zip(bounds, shape)) if (a, b) != (0, size)]
    if not cut:
        return 0, math.prod(shape)
    last = cut[-1]
    if any(bounds[i][1] - bounds[i][0] != 1 for i in range(last)):
        return None
    stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    start = sum(bounds[i][0] * stride[i] for i in range(last + 1))
    return start, start + (bounds[last][1] - bounds[last][0]) * stride[last]


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _write_layer_impl(buffer: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buffer, layer.astype(buffer.dtype), index, axis=0)


_write_layer = jax.jit(_write_layer_impl, donate_argnums=0)


# ---- writing ----------------------------------------------------------------------------------------------------


def hf_tensors(params: dict, config: ModelConfig, lora_params: dict | None = None,
               lora: LoraConfig | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array in HF layout and the parameter dtype) one tensor at a time, LoRA merged in."""
    for rule in tensor_rules(config):
        leaf = _leaf_at(params, rule.path)
        adapter = _adapter_for(lora_params, rule.path) if lora is not None else None
        layers = range(config.num_layers) if rule.path[0] == "layers" else [None]
        for i in layers:
            value = leaf if i is None else leaf[i]
            if adapter is not None:
                a, b = (adapter["a"], adapter["b"]) if i is None else (adapter["a"][i], adapter["b"][i])
                merged = value.astype(jnp.float32) + lora.scale * lora_delta(a, b, value.shape)
                value = merged.astype(value.dtype)
            yield rule.hf_name.format(i=i), to_hf_layout(rule, np.asarray(value))


def _adapter_for(lora_params: dict | None, path: tuple[str, ...]) -> dict | None:
    if not lora_params or path[-1] != "kernel":
        return None
    node: Any = lora_params
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) and {"a", "b"} <= set(node) else None


def save_hf_checkpoint(out_dir: str | Path, params: dict, config: ModelConfig, lora_params: dict | None = None,
                       lora: LoraConfig | None = None, tokenizer_dir: str | Path | None = None,
                       max_shard_bytes: int = 4 << 30) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads (and vLLM serves).

    Shards of at most `max_shard_bytes` (plus an index when there are several); `config.json`; tokenizer files
    copied from `tokenizer_dir`. Written to a temporary sibling and renamed, so the folder is complete or absent.
    """
    with staged_folder(out_dir) as staging:
        shard_names = _write_shards(staging, hf_tensors(params, config, lora_params, lora), max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), staging)
    log.info("exported %d safetensors file(s) to %s", len(shard_names), out_dir)
    return Path(out_dir)


def _write_shards(folder: Path, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> list[str]:
    # Flush a shard to disk as soon as it is full, so host memory holds at most one shard.
    current: dict[str, np.ndarray] = {}
    current_bytes = total_bytes = 0
    names_in_order: list[list[str]] = []
    temp_names: list[str] = []
    for name, array in tensors:
        if current and current_bytes + array.nbytes > max_shard_bytes:
            temp_names.append(_flush(folder, current, len(temp_names)))
            names_in_order.append(list(current))
            current, current_bytes = {}, 0
        current[name] = array
        current_bytes += array.nbytes
        total_bytes += array.nbytes
    if current:
        temp_names.append(_flush(folder, current, len(temp_names)))
        names_in_order.append(list(current))
    if len(temp_names) == 1:
        os.replace(folder / temp_names[0], folder / SINGLE_FILE)
        return [SINGLE_FILE]
    count = len(temp_names)
    final_names = [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    weight_map = {}
    for temp, final, names in zip(temp_names, final_names, names_in_order):
        os.replace(folder / temp, folder / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return final_names


def _flush(folder: Path, tensors: dict[str, np.ndarray], number: int) -> str:
    name = f"shard-{number:05d}.safetensors"
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return name


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files a HF folder may hold; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def is_hf_folder(folder: Path) -> bool:
    """True when `folder` looks like a Hugging Face model folder (config.json and safetensors)."""
    return (folder / "config.json").is_file() and ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file())


__all__ = ["CheckpointError", "ModelConfigError", "load_hf_params", "save_hf_checkpoint", "hf_tensors",
           "tensor_rules", "validate_checkpoint", "is_hf_folder", "copy_tokenizer_files"]
