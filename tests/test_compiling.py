"""How the commands compile: the XLA:CPU flags they add, and the compiled programs they keep in jaxagent's cache
folder."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from jaxagent import cache, compiling, evaluate, serve, train
from jaxagent.config import ConfigError
from jaxagent.serving import ServingError

# Compiles one program that takes more than JAX's default minimum compile time to be kept (1 s would make the test
# depend on the machine's speed, so the minimum is lowered), then lists what the cache folder holds.
COMPILE_ONE = """
import jax, jax.numpy as jnp
from jaxagent.compiling import use_compilation_cache
use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(7.0)).sum())
"""


# A program whose 64 MiB intermediate (a 4096 x 4096 float32 product) lives in XLA's buffer for the call; prints
# the median number of minor page faults of the last 8 of 12 calls (the heap settles in the first few; now and then
# a call finds its old place taken and extends the heap once more).
FAULTS_PER_CALL = """
import resource, sys
from jaxagent import compiling
if sys.argv[1] == "reuse":
    compiling.reuse_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (x @ x.T) @ x)
x = jnp.ones((4096, 64), jnp.float32) / 64
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = step(x).block_until_ready() / 4096
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[-8:])[4])
"""

# Traces a 3,000-operation function and prints how many times Python's collector ran meanwhile; with argv[1] "ours"
# after `collect_garbage_less_often`, as the commands set it.
COLLECTIONS_WHILE_TRACING = """
import gc, sys
import jax, jax.numpy as jnp
from jaxagent import compiling
if sys.argv[1] == "ours":
    compiling.collect_garbage_less_often()
scans = []
gc.callbacks.append(lambda phase, info: scans.append(info["generation"]) if phase == "start" else None)
def chain(x):
    for i in range(1000):
        x = jnp.tanh(x * 1.5 + i)
    return x
jax.make_jaxpr(chain)(jnp.ones(3))
print(len(scans), gc.get_threshold()[0], gc.get_freeze_count() > 0)
"""


def run_compile(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXAGENT_CACHE_DIR")}
    return subprocess.run([sys.executable, "-c", COMPILE_ONE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXAGENT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "jaxagent"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "jaxagent"
    monkeypatch.setenv("JAXAGENT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_compiled_programs_are_kept_under_the_cache_folder(tmp_path):
    done = run_compile({"JAXAGENT_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "xla").iterdir()), "no compiled program was written to the cache folder"


def test_jax_compilation_cache_dir_overrides_it_and_empty_turns_it_off(tmp_path):
    done = run_compile({"JAXAGENT_CACHE_DIR": str(tmp_path / "ours"), "JAX_COMPILATION_CACHE_DIR": ""})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "ours").exists()
    done = run_compile({"JAXAGENT_CACHE_DIR": str(tmp_path / "ours"),
                        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs")})
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "theirs").iterdir()) and not (tmp_path / "ours").exists()


def test_an_unwritable_cache_folder_warns_and_the_program_still_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_compile({"JAXAGENT_CACHE_DIR": str(blocker)})
    assert done.returncode == 0, done.stderr
    assert "cannot keep compiled programs" in done.stderr
    assert done.stdout.strip()  # the program ran


@pytest.mark.parametrize("command, argv, error", [
    (train, ["--config", "tiny", "no_such_key=1"], ConfigError),
    (evaluate, ["--model", "no-such-folder"], ConfigError),
    (serve, ["--model", "no-such-folder"], ServingError),
])
def test_the_commands_that_compile_prepare_compiling(monkeypatch, command, argv, error):
    """Each command sets the flags and the cache up before its first compile (here it fails on its input next)."""
    calls = []
    monkeypatch.setattr(compiling, "prepare", lambda: calls.append(True))
    with pytest.raises(error):
        command.main(argv)
    assert calls == [True]


def test_quick_cpu_flags_are_added_unless_set_or_declined(monkeypatch):
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)  # a CPU-only install
    monkeypatch.delenv("JAXAGENT_XLA_DEFAULTS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    compiling.use_quick_cpu_compiles()
    assert os.environ["XLA_FLAGS"].split() == list(compiling.QUICK_CPU_FLAGS)
    compiling.use_quick_cpu_compiles()  # a second call adds nothing
    assert os.environ["XLA_FLAGS"].split() == list(compiling.QUICK_CPU_FLAGS)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --xla_force_host_platform_device_count=2")
    compiling.use_quick_cpu_compiles()  # the user's level stays; the other flag is added
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=3",
                                               "--xla_force_host_platform_device_count=2",
                                               "--xla_cpu_use_fusion_emitters=false"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXAGENT_XLA_DEFAULTS", "1")
    compiling.use_quick_cpu_compiles()
    assert os.environ["XLA_FLAGS"] == ""


def test_no_cpu_flags_with_an_accelerator_plugin(monkeypatch):
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    monkeypatch.delenv("JAXAGENT_XLA_DEFAULTS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    compiling.use_quick_cpu_compiles()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.skipif(not compiling.glibc() or any(importlib.util.find_spec(p) for p in compiling.ACCELERATOR_PLUGINS),
                    reason="glibc's allocator on a CPU-only install only")
def test_a_cpu_step_reuses_the_memory_of_the_last_one():
    """After `reuse_freed_memory`, a call's 64 MiB intermediate lands on the pages the last call used, instead of
    16K pages the kernel maps and zeroes anew (each a minor page fault)."""
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, "reuse"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    pages = 4096 * 4096 * 4 // resource.getpagesize()
    assert int(done.stdout) < pages // 16, f"{done.stdout.strip()} page faults per call (the buffer: {pages} pages)"


def collections_while_tracing(setting: str, env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-c", COLLECTIONS_WHILE_TRACING, setting], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_tracing_runs_the_garbage_collector_far_less_often_unless_declined():
    default_scans, default_threshold, default_frozen = collections_while_tracing("python", {})
    scans, threshold, frozen = collections_while_tracing("ours", {"JAXAGENT_GC_DEFAULTS": ""})
    assert (int(threshold), frozen, default_frozen) == (compiling.COLLECTOR_THRESHOLDS[0], "True", "False")
    assert int(scans) * 20 <= int(default_scans), f"{scans} collector runs against Python's {default_scans}"
    assert collections_while_tracing("ours", {"JAXAGENT_GC_DEFAULTS": "1"})[1:] == [default_threshold, "False"]


def test_scienceworld_keeps_its_split_table_in_the_same_folder(monkeypatch, tmp_path):
    pytest.importorskip("scienceworld")
    from jaxagent.envs import scienceworld

    monkeypatch.setenv("JAXAGENT_CACHE_DIR", str(tmp_path))
    assert Path(scienceworld.variations_file()).parent == tmp_path / "scienceworld"
