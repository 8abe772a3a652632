"""A run spread over several processes (hosts), each driving its own devices, joined by `jax.distributed`.

Every process runs the same driver on the same configuration: the same tasks, RNG keys and data-iterator state,
and the same sequence of jitted steps on the global mesh. What differs between processes:

- **rollouts**: each process plays its share of the task groups (whole groups, since leave-one-out compares the
  rollouts of one task) on its own devices and environment workers; the finished trajectories are then gathered
  so every process builds the same learner batches (`gather_objects`);
- **files**: process 0 writes the run folder's files (configuration, tokenizer, metrics, plots, summary, stage
  results); the others wait for them (`written_by_first`). Checkpoints are written by every process together
  (orbax: each process writes the shards it holds).

With one process every function here is a no-op or the identity, so a single-host run is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import jax
import numpy as np

from jaxagent.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(UserError):
    """A multi-process setting that cannot work; the message says which variable to set."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process job (`jax.distributed.initialize`) when one is configured; returns whether it did.

    Arguments override the environment variables JAXAGENT_COORDINATOR_ADDRESS (host:port), JAXAGENT_NUM_PROCESSES
    and JAXAGENT_PROCESS_ID. With JAXAGENT_DISTRIBUTED=auto, JAX detects the cluster itself (TPU pods, SLURM).
    JAXAGENT_LOCAL_DEVICES=N gives each process N simulated CPU devices (tests, rehearsals on one machine).
    Call it before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get("JAXAGENT_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int_env("JAXAGENT_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAXAGENT_PROCESS_ID")
    local_devices = _int_env("JAXAGENT_LOCAL_DEVICES")
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", local_devices)
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise DistributedError("JAXAGENT_COORDINATOR_ADDRESS needs JAXAGENT_NUM_PROCESSES and "
                                   "JAXAGENT_PROCESS_ID as well")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"JAXAGENT_PROCESS_ID={process_id} must be in 0..{num_processes - 1} "
                                   f"(JAXAGENT_NUM_PROCESSES={num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif os.environ.get("JAXAGENT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def _int_env(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer") from None


def is_first() -> bool:
    """Whether this process writes the run folder's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier called `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def first_says(flag: bool) -> bool:
    """Process 0's `flag` on every process: for decisions about shared files that all processes must take the
    same way (another process may already have written a file this one would see)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def written_by_first(path: Path, write: Callable[[], Any]) -> None:
    """Let process 0 call `write()` (which creates `path`) when `path` is absent; every process returns once it
    exists. `write` must be deterministic in what it decides, since only process 0 runs it."""
    if is_first() and not path.exists():
        write()
    barrier(f"written {path}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: process 0 did not write it; is the run folder on a file system every "
                                "process shares?")


def share_of(count: int) -> list[int]:
    """The indices in range(count) this process takes: every P-th, starting at its process index."""
    return list(range(jax.process_index(), count, jax.process_count()))


def gather_objects(local: T) -> list[T]:
    """Every process's `local` (any picklable object), in process order, on every process."""
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(pickle.dumps(local, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
    # Padded to a power of two: each new length would compile another all-gather (about a second on a CPU).
    padded = np.zeros(1 << max(int(sizes.max()) - 1, 63).bit_length(), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(blobs[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def agree(value: Any, what: str) -> None:
    """Fail when processes hold different `value`s (a check that they configured the same run)."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        raise DistributedError(f"processes disagree on {what}: {values}; start every process with the same "
                               "command and files")


@contextlib.contextmanager
def shared_staging(folder: Path) -> Iterator[Path]:
    """A staging folder every process writes into (a name they all know), renamed to `folder` by process 0 once
    all are done; on failure it is removed. `folder` must not exist."""
    staging = folder.parent / f".{folder.name}.partial-shared"
    if is_first():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(f"staging {folder}")
    try:
        yield staging
        barrier(f"staged {folder}")
        if is_first():
            os.replace(staging, folder)
        barrier(f"renamed {folder}")
    except BaseException:
        if is_first():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def to_local(tree: Any, local_shardings: Any) -> Any:
    """Arrays of a multi-process (global) mesh as arrays on this process's devices, split as `local_shardings`
    say: each is first replicated across processes (a collective every process joins), then this process's
    shards are taken as they are. Arrays already on this process only are moved with `device_put`."""
    return jax.tree.map(_to_local, tree, local_shardings)


def _to_local(array: jax.Array, local: jax.sharding.NamedSharding) -> jax.Array:
    if array.is_fully_addressable:
        return jax.device_put(array, local)
    global_sharding = jax.sharding.NamedSharding(array.sharding.mesh, local.spec)
    replicated = jax.device_put(array, global_sharding)
    shards = {shard.device: shard for shard in replicated.addressable_shards}
    wanted, held = local.devices_indices_map(array.shape), global_sharding.devices_indices_map(array.shape)
    for device, index in wanted.items():
        if held[device] != index:
            raise DistributedError(f"device {device} holds another slice in the global mesh than in the local one; "
                                   "mesh.tensor must divide the devices of one process")
    return jax.make_array_from_single_device_arrays(array.shape, local, [shards[d].data for d in wanted])
