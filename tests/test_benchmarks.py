"""The benchmarks run and report what they promise (figures are not asserted: tests never depend on timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sampler_benchmark_prints_one_json_line_with_identical_tokens():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sampler", "--batches", "2", "--prompt-len", "8",
                           "--new-tokens", "8", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    (result,) = report["results"]
    assert result["batch"] == 2 and result["greedy_tokens_identical"] is True
    assert result["jaxagent_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0 and result["ratio"] > 0


@pytest.mark.slow
def test_update_benchmark_reports_throughput_mfu_and_memory():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.update", "--batch", "2", "--length", "64", "--repeats",
                           "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("jaxagent_tokens_per_s", "torch_tokens_per_s", "ratio", "mfu_vs_190_gflops",
                "loop_over_sft_peak_memory"):
        assert report[key] > 0, key


@pytest.mark.slow
def test_rollout_benchmark_reports_hidden_environment_time():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rollout", "--latency", "0.05", "--tasks", "4",
                           "--rollouts", "2", "--turns", "2", "--tokens-per-turn", "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["episodes"] == 8 and report["env_seconds_total"] > 0 and report["hidden_fraction"] is not None
