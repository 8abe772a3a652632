"""Where a run's arrays live: on one device, or split over a device mesh.

Every stage asks the run's `Placement` for its parameters, train state, update step and batches, so one code path
trains on a laptop and on a mesh. Without a mesh (one device) every method hands its input back unchanged and the
update step is jitted exactly as it always was. On a mesh:

- parameters, LoRA adapters and optimizer moments are split by the training rules (`jaxagent.sharding`): over
  `fsdp` and `tensor`, replicated over `data`;
- the update step is jitted with the train state's shardings in and out and donates the state, so each step
  updates the split parameters in place;
- a batch is a global array split along its rows over `data` and `fsdp`, built from the rows each process holds;
- the sampler gets the parameters re-placed by the sampling rules (whole across `fsdp`, split over `tensor`) once
  per collection round, since a decode step that all-gathers every weight for each token would be slow.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import init_params
from jaxagent.sharding import TRAIN_RULES, MeshConfig, MeshError, make_mesh, param_shardings
from jaxagent.update import (
    StepShardings,
    TrainState,
    UpdateConfig,
    UpdateStep,
    batch_shardings,
    make_update_step,
    train_state_shardings,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The run's mesh (None on one device) and the model whose arrays it places."""

    model: ModelConfig
    lora: LoraConfig | None = None
    mesh: Mesh | None = None
    sample_mesh: Mesh | None = None  # where this process decodes: the mesh, or its own devices of it

    @staticmethod
    def for_devices(model: ModelConfig, lora: LoraConfig | None, mesh_config: MeshConfig) -> "Placement":
        """A placement over every device of the job: no mesh when there is only one. In a multi-process job each
        process samples on a mesh of its own devices with the same `tensor` size."""
        devices = jax.devices()
        if len(devices) == 1:
            asked = mesh_config.fixed_devices
            if asked > 1:  # a paper config rehearsed on a laptop runs; say that it runs unsharded
                log.warning("mesh data=%d fsdp=%d tensor=%d asks for %d devices, but 1 is present: running "
                            "unsharded on it", mesh_config.data, mesh_config.fsdp, mesh_config.tensor, asked)
            return Placement(model, lora)
        mesh = make_mesh(mesh_config, devices)
        if jax.process_count() == 1:
            return Placement(model, lora, mesh, mesh)
        local = jax.local_devices()
        tensor = mesh.shape["tensor"]
        if len(local) % tensor:
            raise MeshError(f"mesh.tensor={tensor} does not divide the {len(local)} devices of one process; "
                            f"each process samples on its own devices, so use a tensor size that divides {len(local)}")
        return Placement(model, lora, mesh, make_mesh(MeshConfig(data=-1, fsdp=1, tensor=tensor), local))

    def describe(self) -> str:
        if self.mesh is None:
            return f"one device ({jax.devices()[0].platform})"
        return ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items()) + \
            f" over {self.mesh.devices.size} {self.mesh.devices.flat[0].platform} devices"

    # ---- parameters ---------------------------------------------------------------------------------------------

    def param_shardings(self) -> tuple[dict, dict] | None:
        """(parameter shardings, adapter shardings) under the training rules; None without a mesh."""
        return None if self.mesh is None else param_shardings(self.model, self.mesh, TRAIN_RULES, self.lora)

    def init_params(self, key: jax.Array) -> dict:
        """Random parameters of a model from scratch, created directly in their shards."""
        if self.mesh is None:
            return init_params(self.model, key)[0]
        shardings, _ = self.param_shardings()
        return jax.jit(lambda k: init_params(self.model, k)[0], out_shardings=shardings)(key)

    def init_lora(self, key: jax.Array) -> dict:
        """Fresh LoRA adapters; only they are materialised (XLA drops the unused random base weights)."""
        shardings = None if self.mesh is None else self.param_shardings()[1]
        return jax.jit(lambda k: init_params(self.model, k, self.lora)[1], out_shardings=shardings)(key)

    def params(self, params: dict, lora_params: dict | None = None) -> tuple[dict, dict | None]:
        """Parameters (and adapters) moved to their training shards."""
        if self.mesh is None:
            return params, lora_params
        shardings, lora_shardings = self.param_shardings()
        return (jax.device_put(params, shardings),
                None if lora_params is None else jax.device_put(lora_params, lora_shardings))

    def load_policy(self, folder) -> tuple[dict, dict | None]:
        """(parameters, adapters) of a saved policy folder, restored straight into their training shards."""
        from jaxagent.checkpoint import load_policy

        shardings = self.param_shardings() or (None, None)
        saved = load_policy(folder, *shardings)
        return saved.params, saved.lora_params

    # ---- training -----------------------------------------------------------------------------------------------

    def update_step(self, config: UpdateConfig, state: TrainState, frozen: dict) -> tuple[UpdateStep, TrainState]:
        """The jitted update step for states shaped like `state`, and `state` moved to where the step wants it."""
        if self.mesh is None:
            # Committed like the step's outputs: a fresh state's scalar counters are not, and jit would compile
            # the step a second time for the state the first step returns.
            return make_update_step(self.model, config, self.lora), jax.device_put(state, jax.local_devices()[0])
        shardings = StepShardings(train_state_shardings(state, self.model, self.mesh, config, self.lora),
                                  {"params": self.param_shardings()[0]} if frozen else {})
        return (make_update_step(self.model, config, self.lora, shardings=shardings),
                jax.device_put(state, shardings.state))

    @staticmethod
    def fetch(array: jax.Array) -> np.ndarray:
        """A (possibly multi-process) array as one whole NumPy array on this host."""
        if array.is_fully_addressable or array.sharding.is_fully_replicated:
            return np.asarray(array)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))

    def batch(self, batch: Any) -> Any:
        """A host batch (NumPy leaves, the same on every process) as global arrays split along the rows."""
        if self.mesh is None:
            return batch
        shardings = batch_shardings(batch, self.mesh)
        return jax.tree.map(lambda x, sharding: jax.make_array_from_callback(
            x.shape, sharding, lambda index, x=np.asarray(x): x[index]), batch, shardings)

