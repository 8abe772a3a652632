"""Policy checkpoints: parameters (and LoRA adapters) in orbax, beside the HF config and tokenizer they belong to.

Layout of a policy folder:

    jaxagent.json   format version, parameter dtype, LoRA settings (or null)
    model/          config.json and tokenizer files (Hugging Face format)
    params/         orbax checkpoint of the base parameters
    lora/           orbax checkpoint of the adapters (only with LoRA)

A folder is written under a temporary name and renamed when complete, so it is complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxagent import distributed
from jaxagent.atomic import staged_folder
from jaxagent.models.config import ModelConfig, dtype_name
from jaxagent.models.hf import CheckpointError, copy_tokenizer_files
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import abstract_params

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "jaxagent.json"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Everything needed to run or export a policy."""

    config: ModelConfig
    params: dict
    lora: LoraConfig | None = None
    lora_params: dict | None = None
    tokenizer_dir: Path | None = None


def is_policy_folder(folder: Path) -> bool:
    """True when `folder` holds a jaxagent policy checkpoint."""
    return (Path(folder) / META_FILE).is_file()


def save_policy(folder: str | Path, policy: Policy) -> Path:
    """Write `policy` to `folder` (which must not exist, or be empty); complete or absent (see `jaxagent.atomic`)."""
    folder = Path(folder).absolute()
    # Every process of a multi-process run writes the shards it holds into one staging folder.
    staged = staged_folder if jax.process_count() == 1 else distributed.shared_staging
    with staged(folder) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", policy.params)
        if policy.lora is not None:
            checkpointer.save(staging / "lora", policy.lora_params)
        checkpointer.wait_until_finished()
        if distributed.is_first():
            model_dir = staging / "model"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(policy.config.to_hf_dict(), indent=2) + "\n")
            if policy.tokenizer_dir is not None:
                copy_tokenizer_files(Path(policy.tokenizer_dir), model_dir)
            meta = {"format": FORMAT_VERSION, "param_dtype": dtype_name(policy.config.param_dtype),
                    "lora": dataclasses.asdict(policy.lora) if policy.lora is not None else None}
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_policy(folder: str | Path, shardings: Any = None, lora_shardings: Any = None,
                **config_overrides: Any) -> Policy:
    """Read a policy folder written by `save_policy`; `config_overrides` such as `dtype="bf16"` adjust compute.

    `shardings` / `lora_shardings` (trees like the parameters / adapters) restore each array straight into its
    shards; without them every array lands on this process's first device, whatever mesh saved it."""
    folder = Path(folder).absolute()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{folder}: no {META_FILE}; expected a jaxagent policy checkpoint")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r}; this jaxagent reads {FORMAT_VERSION}")
    config = ModelConfig.from_hf_dir(folder / "model", param_dtype=meta["param_dtype"], **config_overrides)
    lora = LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])}) if meta.get("lora") else None
    abstract, abstract_lora = abstract_params(config, lora)
    # Explicit placements throughout: a policy saved on a mesh then loads on one device (and the other way round).
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    placed = lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)  # noqa: E731
    abstract = jax.tree.map(placed, abstract, shardings or jax.tree.map(lambda _: default, abstract))
    if lora is not None:
        abstract_lora = jax.tree.map(placed, abstract_lora,
                                     lora_shardings or jax.tree.map(lambda _: default, abstract_lora))
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(folder / "params", abstract)
    lora_params = checkpointer.restore(folder / "lora", abstract_lora) if lora is not None else None
    has_tokenizer = (folder / "model" / "tokenizer_config.json").is_file()
    return Policy(config, params, lora, lora_params, folder / "model" if has_tokenizer else None)


class StageCheckpoints:
    """Resumable train-state checkpoints of one stage (orbax CheckpointManager), one per saved iteration.

    Each holds the train state (trainable leaves, optimizer state, step counters) and a JSON record (iteration,
    RNG key, data-iterator state). orbax writes a checkpoint under a temporary name and renames it when complete,
    so a crash leaves the previous checkpoints intact; only the last `keep` are kept.
    """

    def __init__(self, folder: str | Path, keep: int) -> None:
        self.folder = Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.folder, options=options, item_names=("state", "meta"))

    def latest(self) -> int | None:
        """The last complete checkpoint's iteration (None when there is none)."""
        return self._manager.latest_step()

    def save(self, iteration: int, state: Any, meta: dict) -> None:
        """Write the checkpoint of `iteration` and wait until it is on disk."""
        self._manager.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                                              meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, iteration: int, like: Any) -> tuple[Any, dict]:
        """(train state shaped like `like`, meta) of the checkpoint of `iteration`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
        restored = self._manager.restore(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return type(like)(**restored.state), dict(restored.meta)

    def close(self) -> None:
        self._manager.close()
