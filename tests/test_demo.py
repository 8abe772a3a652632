"""`make run`'s job: the foundation demo runs end to end and its checks hold."""

from __future__ import annotations

import pytest

from jaxagent.demo import run_demo


@pytest.mark.slow
def test_demo_learns_the_reply_and_exports_exactly(tmp_path):
    result = run_demo(tmp_path / "demo", steps=60)
    assert result["last_loss"] < result["first_loss"] - 1.0
    assert result["reply_matches"]
    assert result["export_max_abs_diff"] < 1e-4
    assert (tmp_path / "demo" / "hf" / "model.safetensors").is_file()
