"""Meshes and sharding rules; on 8 simulated CPU devices, sharded forward, sampling and updates equal one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxagent.sharding import TRAIN_RULES, MeshConfig, MeshError, logical_to_spec, make_mesh

from conftest import micro_train_command

WORKER = Path(__file__).with_name("mesh_worker.py")


def test_mesh_sizes_resolve_the_wildcard():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshConfig(data=1, fsdp=-1, tensor=1).resolve(8) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("config, devices, message", [
    (MeshConfig(data=3, fsdp=1, tensor=1), 8, "needs 3 devices but 8 are present; valid: sizes whose product is 8"),
    (MeshConfig(data=-1, fsdp=3, tensor=1), 8, "does not divide 8 devices"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), 8, "at most one -1"),
    (MeshConfig(data=0, fsdp=1, tensor=1), 8, "sizes must be positive"),
])
def test_impossible_meshes_are_refused(config, devices, message):
    with pytest.raises(MeshError, match=message):
        config.resolve(devices)


def test_make_mesh_checks_axis_names_and_device_count():
    with pytest.raises(MeshError, match=r"unknown mesh axes \['model'\]; valid: data, fsdp, tensor"):
        make_mesh({"model": 2})
    with pytest.raises(MeshError, match="needs 2 devices but 1 are present"):
        make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_one_device_runs_a_multi_device_mesh_unsharded_and_says_so(caplog):
    from jaxagent.models.config import ModelConfig
    from jaxagent.placement import Placement

    model = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=8, family="qwen2")
    assert len(jax.devices()) == 1
    with caplog.at_level("WARNING", logger="jaxagent.placement"):
        assert Placement.for_devices(model, None, MeshConfig(data=-1)).mesh is None
        assert not caplog.records  # the default mesh fits one device: nothing to say
        assert Placement.for_devices(model, None, MeshConfig(data=2, fsdp=1, tensor=8)).mesh is None
    assert [r.getMessage() for r in caplog.records] == [
        "mesh data=2 fsdp=1 tensor=8 asks for 16 devices, but 1 is present: running unsharded on it"]


def test_rules_skip_axes_that_do_not_divide():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 2}

    mesh = FakeMesh()
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh, TRAIN_RULES) == P("fsdp", "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh, TRAIN_RULES) == P("fsdp", None, None)
    # batch 6 is not divisible by data*fsdp = 8: the first axis that divides it is used alone.
    assert logical_to_spec(("batch", "length"), (6, 32), mesh, TRAIN_RULES) == P("data", None)
    assert logical_to_spec(("batch", "length"), (1, 32), mesh, TRAIN_RULES) == P(None, None)


def _mesh_worker(folder, part: str) -> dict:
    """Run tests/mesh_worker.py (8 simulated devices) in a subprocess; its JSON result."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(WORKER), str(folder), part], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_forward_and_sampling_equal_one_device(hf_models):
    results = _mesh_worker(hf_models["qwen2_untied"], "forward")
    assert results["data2_fsdp2_tensor2"]["q_kernel_spec"] == "P(None, 'fsdp', 'tensor', None)"
    assert results["fsdp8"]["q_kernel_spec"] == "P(None, 'fsdp', None, None)"
    for name, result in results.items():
        assert result["q_kernel_devices"] == 8, name
        # Every block is read once, alone: the model's bytes, not a whole tensor per device (8x for split leaves).
        assert 0.99 < result["bytes_read_over_model"] < 1.01, (name, result)
        assert result["forward_max_diff"] < 1e-5, (name, result)
        assert result["greedy_equal"] and result["sampled_equal"], (name, result)
        assert result["sampled_logprob_max_diff"] < 1e-5, (name, result)


@pytest.mark.slow
def test_sharded_lora_gradients_and_steps_equal_one_device(hf_models):
    """The LoRA LOOP gradient, then two micro-batched steps, sharded vs one device."""
    for name, result in _mesh_worker(hf_models["qwen2_untied"], "update").items():
        assert result["gradient_scale"] > 1e-4 and result["gradient_max_rel_diff"] < 1e-4, (name, result)
        assert result["gradient_loss_diff"] < 1e-6, (name, result)
        assert result["lora_max_diff"] < 1e-6 and result["loss_diff"] < 1e-6, (name, result)
        assert result["lora_a_spec"] == "P(None, 'fsdp', None)" and result["lora_a_devices"] == 8, (name, result)


def _policy_leaves(folder):
    from jaxagent.checkpoint import load_policy

    with jax.enable_x64(True):  # the runs below train in float64
        return [np.asarray(x) for x in jax.tree.leaves(load_policy(folder).params)]


@pytest.mark.slow
def test_training_run_on_a_mesh_matches_one_device_and_splits_its_state(tmp_path):
    """`python -m jaxagent.train` (SFT then PPO, which trains every rollout, a value head and micro-batches) on
    8 simulated devices with data=2, fsdp=2, tensor=2 against the same run on one device: same losses, evaluations
    and parameters; and the saved train state is really split over the mesh, not replicated.

    Both run in float64, so that the only difference a mesh may make, the order of its sums, stays near 1e-15 and
    anything else (a missing or doubled term, a stray low-precision cast) stands out; in float32 that order alone
    moves the losses by ~1e-6. tests/test_distributed.py runs float32 on a mesh."""
    import orbax.checkpoint as ocp

    extra = ["stages=[sft,ppo]", "loop.micro_batches=2", "model.dtype=float64", "model.param_dtype=float64"]
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    runs = {"one": subprocess.Popen(micro_train_command(tmp_path / "one", *extra), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            "mesh": subprocess.Popen(micro_train_command(tmp_path / "mesh", *extra, *mesh),
                                     env={**env, "XLA_FLAGS": flags}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, out[-3000:])

    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in runs}
    assert [r["kind"] for r in records["one"]] == [r["kind"] for r in records["mesh"]]
    losses = [(a["loss"], b["loss"]) for a, b in zip(records["one"], records["mesh"]) if "loss" in a]
    assert len(losses) >= 6 and all(abs(a - b) < 1e-12 * max(1.0, abs(a)) for a, b in losses), losses
    ppo_updates = [r["updates"] for r in records["mesh"] if r["stage"] == "ppo" and r["kind"] == "train"]
    assert sum(ppo_updates) > 0, ppo_updates  # the sharded RL update ran, not only SFT
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text())["stages"] for name in runs}
    assert summaries["one"] == summaries["mesh"]
    for stage in ("sft", "ppo"):
        one, sharded = (_policy_leaves(tmp_path / name / "stages" / stage / "policy") for name in runs)
        assert one[0].dtype == np.float64 and max(float(np.abs(a - b).max()) for a, b in zip(one, sharded)) < 1e-12, \
            stage

    # The PPO stage's last train-state checkpoint, as orbax wrote it: shards, not whole arrays.
    folder = tmp_path / "mesh" / "checkpoints" / "ppo"
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().metadata(folder / str(step) / "state").item_metadata.tree
    kernel = state["trainable"]["params"]["layers"]["mlp"]["up"]["kernel"]
    assert tuple(kernel.sharding.partition_spec) == (None, "fsdp", "tensor"), kernel
    assert kernel.shape == (1, 32, 64) and kernel.storage.write_shape[1:] <= (16, 32), kernel  # a quarter or less
    moments = [leaf for leaf in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "sharding"))
               if getattr(leaf, "shape", None) == (1, 32, 64)]
    assert moments and all(tuple(m.sharding.partition_spec) == (None, "fsdp", "tensor") for m in moments), moments


def test_a_mesh_the_devices_cannot_form_stops_the_run_before_any_work(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    proc = subprocess.run(micro_train_command(tmp_path / "run", "mesh.data=3"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: mesh {data: 3, fsdp: 1, tensor: 1} needs 3 devices but 2 "
                                                    "are present; valid: sizes whose product is 2 (or use -1 for one "
                                                    "axis)")
    assert not (tmp_path / "run").exists()
