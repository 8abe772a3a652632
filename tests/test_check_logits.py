"""`python -m jaxagent.check_logits` on tiny random models of every family."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from jaxagent import check_logits

from conftest import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_logits_passes_in_f32_within_1e4(hf_models, family, capsys):
    code = check_logits.main(["--hf", str(hf_models[family]), "--dtype", "f32", "--tol", "1e-4"])
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|Δlogit\| = (\S+)", printed).group(1))
    assert code == 0 and diff <= 1e-4, printed


def test_check_logits_bf16_passes_with_default_tolerance(hf_models, capsys):
    assert check_logits.main(["--hf", str(hf_models["llama3_gqa"]), "--dtype", "bf16"]) == 0
    assert "bfloat16" in capsys.readouterr().out


def test_check_logits_fails_on_a_wrong_conversion(hf_models, tmp_path, monkeypatch):
    """A checker that cannot fail proves nothing: corrupt our side only and expect exit 1."""
    import jaxagent.models.hf as hf

    real = hf.to_jax_layout

    def swapped(rule, array, shape):  # a classic conversion bug: reshape an [out, in] kernel without transposing
        if rule.hf_name.endswith("gate_proj.weight"):
            return array.reshape(shape)
        return real(rule, array, shape)

    monkeypatch.setattr(hf, "to_jax_layout", swapped)
    assert check_logits.main(["--hf", str(hf_models["llama2"]), "--tol", "1e-4"]) == check_logits.EXIT_MISMATCH


def test_check_logits_command_line(hf_models):
    proc = subprocess.run([sys.executable, "-m", "jaxagent.check_logits", "--hf", str(hf_models["qwen3"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: max |Δlogit| = ")
