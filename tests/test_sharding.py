"""Meshes and sharding rules; on 8 simulated CPU devices, sharded forward, sampling and updates equal one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxagent.sharding import TRAIN_RULES, MeshConfig, MeshError, logical_to_spec, make_mesh

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
