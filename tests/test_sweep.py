"""`python -m jaxagent.sweep`: a micro grid that shares its SFT start, killed and restarted, then tabulated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxagent.sweep import RunSpec, Sweep, load_sweep, main, plan, table

from conftest import MICRO


def _write_sweep(folder: Path) -> Path:
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump({
        "seeds": [0, 1], "overrides": [*MICRO, "loop.iterations=1"],
        "start": {"label": "SFT", "config": "tiny", "stages": ["sft"]},
        "rows": [{"label": "LOOP", "config": "tiny"},
                 {"label": "GRPO", "config": "tiny_grpo", "overrides": ["loop.epochs=1"]}]}))
    return path


def _trainers_writing(folder: Path) -> list[int]:
    """Pids of live processes whose command line names a run folder under `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_rows_start_from_their_seeds_shared_start_and_run_only_their_own_stages(tmp_path):
    runs = plan(load_sweep(str(_write_sweep(tmp_path))), tmp_path / "out")
    assert [(r.label, r.seed, r.stages) for r in runs] == [
        ("SFT", 0, ("sft",)), ("LOOP", 0, ("loop",)), ("SFT", 1, ("sft",)), ("LOOP", 1, ("loop",)),
        ("GRPO", 0, ("grpo",)), ("GRPO", 1, ("grpo",))]
    grpo_seed1 = runs[5]
    assert f"init_from={tmp_path / 'out' / 'start-s1' / 'stages' / 'sft'}" in grpo_seed1.overrides
    assert "seed=1" in grpo_seed1.overrides and grpo_seed1.overrides[-1] == "stages=[grpo]"
    assert grpo_seed1.folder == tmp_path / "out" / "grpo-s1"


def test_a_sweep_killed_mid_run_continues_where_it_stopped_and_writes_its_table_and_chart(tmp_path):
    sweep_file, out = _write_sweep(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "jaxagent.sweep", "--sweep", str(sweep_file), "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "loop-s0" / "checkpoints").exists():  # the first row's run is training
        assert first.poll() is None and time.time() < deadline, "the sweep ended before its second run trained"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(1.0)
    assert _trainers_writing(out) == [], "a trainer outlived the killed sweep"

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "SFT seed 0: finished before; skipped" in second.stdout
    logs = {name: sum(line.startswith("$ ") for line in (out / f"{name}.log").read_text().splitlines())
            for name in ("start-s0", "loop-s0", "grpo-s1")}  # one command line per attempt
    assert logs == {"start-s0": 1, "loop-s0": 2, "grpo-s1": 1}  # the start trained once; the cut run resumed

    rows = json.loads((out / "results.json").read_text())
    assert [(r["label"], r["stage"], r["seeds"]) for r in rows] == [
        ("SFT", "sft", [0, 1]), ("LOOP", "loop", [0, 1]), ("GRPO", "grpo", [0, 1])]
    folders = {"SFT": "start", "LOOP": "loop", "GRPO": "grpo"}
    for row in rows:
        for seed, success in zip(row["seeds"], row["success"]):
            summary = json.loads((out / f"{folders[row['label']]}-s{seed}" / "summary.json").read_text())
            assert summary["stages"][row["stage"]]["eval_success"] == success
    table = (out / "results.md").read_text()
    assert "| GRPO | tiny_grpo (grpo) |" in table and "seeds 0, 1" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_pairs_each_row_with_the_reference_by_seed():
    def row(label, seeds, success):
        return {"label": label, "config": "c", "stage": "s", "seeds": seeds, "success": success, "reward": success,
                "minutes": [1.0] * len(seeds)}

    rows = [row("SFT", [0, 1], [0.1, 0.2]), row("LOOP", [0, 1], [0.4, 0.3]), row("GRPO", [1, 0], [0.5, 0.2])]
    lines = {line.split(" | ")[0]: line.split(" | ") for line in table("t", rows, "LOOP").splitlines()
             if line.startswith("| ")}
    assert lines["| row"][4] == "Δ vs LOOP (points)"
    # GRPO's seed 1 (0.5) against LOOP's seed 1 (0.3), its seed 0 (0.2) against LOOP's 0.4: +20 and -20 points.
    assert lines["| GRPO"][4] == f"+0.0 ± {np.std([20.0, -20.0], ddof=1):.1f}"
    assert lines["| SFT"][4] == f"-20.0 ± {np.std([-30.0, -10.0], ddof=1):.1f}" and lines["| LOOP"][4] == "—"
    assert "Δ" not in table("t", rows)  # no reference, no column


@pytest.mark.parametrize("text, message", [
    ("rows: []\n", "`rows` must be a non-empty list"),
    ("rows: [{label: a}]\n", "a mapping with `config`"),
    ("seed: [0]\nrows: [{config: tiny}]\n", "unknown keys ['seed']"),
])
def test_a_bad_sweep_file_stops_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert _exit_code(["--sweep", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_rows_with_one_label_twice_are_refused(tmp_path):
    sweep = Sweep("twice", (0,), (RunSpec("a", "tiny"), RunSpec("a", "tiny_grpo")))
    with pytest.raises(Exception, match="row labels must differ"):
        plan(sweep, tmp_path)


def _exit_code(argv: list[str]) -> int:
    from jaxagent.errors import run_main

    return run_main(main, argv)


def test_the_paper_comparison_is_a_sweep_file_that_plans():
    runs = plan(load_sweep("loop_paper"), Path(os.devnull))
    assert runs[0].label == "SFT" and {r.seed for r in runs} == {0, 1, 2}
    assert len(runs) == 3 * (1 + 9)
