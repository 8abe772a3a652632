"""Run a grid of training runs (rows × seeds) and tabulate their held-out results: `python -m jaxagent.sweep`.

    python -m jaxagent.sweep --sweep loop_paper          # configs/sweeps/loop_paper.yaml, into runs/sweep-loop_paper
    python -m jaxagent.sweep --configs tiny tiny_grpo --seeds 0 1 --out runs/mine  loop.iterations=4

A sweep file names the rows of the comparison, each a config plus overrides, and the seeds:

    seeds: [0, 1, 2]
    overrides: []                                   # for every run, the start's included
    start: {label: SFT, config: tiny, stages: [sft]}  # optional: run once per seed, shared by the rows
    rows:
      - {label: LOOP, config: tiny}
      - {label: GRPO, config: tiny_grpo, overrides: [grpo.epochs=2]}

With a `start`, each seed's start run is trained once and every row of that seed begins from its last stage
(`init_from=START/stages/NAME`), running only its own stages that the start did not: the algorithms of a
comparison share one SFT policy per seed. Every run is a resumable run folder under `--out` (`ROW-sSEED`, the
start `start-sSEED`); a sweep stopped at any point continues where it stopped when run again (finished runs are
skipped, an interrupted one resumes from its checkpoints). Each run's output goes to `RUN.log`.

At the end the sweep writes `results.md` (per row: mean ± sd and min–max over seeds of the last stage's held-out
success and reward, the success minus the first row's on the same seed (mean ± sd of those paired differences), and
the wall-clock minutes per run), `results.json` and `results.png` (success with error bars).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from jaxagent.atomic import staged_file
from jaxagent.config import load_config
from jaxagent.errors import UserError, run_main

SWEEP_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweeps"
SWEEP_KEYS = {"name", "seeds", "overrides", "start", "rows"}
RUN_KEYS = {"label", "config", "overrides", "stages"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One row of the comparison (or the shared start): a config and its overrides."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()  # the start's: which of its config's stages it runs (default: all)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    seeds: tuple[int, ...]
    rows: tuple[RunSpec, ...]
    overrides: tuple[str, ...] = ()
    start: RunSpec | None = None


def load_sweep(name_or_path: str) -> Sweep:
    """A sweep file: a path, or a name in configs/sweeps/."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SWEEP_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))) or "none"
        raise UserError(f"no sweep {name_or_path!r}: give a .yaml path or one of configs/sweeps/ ({known})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - SWEEP_KEYS:
        raise UserError(f"{path}: unknown keys {sorted(set(raw) - SWEEP_KEYS) if isinstance(raw, dict) else raw!r}; "
                        f"a sweep file holds {sorted(SWEEP_KEYS)}")
    rows = raw.get("rows") or []
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: `rows` must be a non-empty list of {{label, config, overrides}}")
    start = _run_spec(path, raw["start"]) if raw.get("start") else None
    return Sweep(str(raw.get("name") or path.stem), tuple(int(s) for s in raw.get("seeds", [0])),
                 tuple(_run_spec(path, row) for row in rows), tuple(raw.get("overrides") or ()), start)


def _run_spec(path: Path, raw) -> RunSpec:
    if not isinstance(raw, dict) or "config" not in raw or set(raw) - RUN_KEYS:
        raise UserError(f"{path}: a row (or start) is a mapping with `config` and optional {sorted(RUN_KEYS)}, "
                        f"not {raw!r}")
    return RunSpec(str(raw.get("label") or raw["config"]), str(raw["config"]),
                   tuple(str(o) for o in raw.get("overrides") or ()), tuple(raw.get("stages") or ()))


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of the sweep, as the command line it runs."""

    label: str
    seed: int
    folder: Path
    config: str
    overrides: tuple[str, ...]
    stages: tuple[str, ...]  # the stages it runs (its summary lists them when it has finished)


def plan(sweep: Sweep, out: Path, extra: Sequence[str] = ()) -> list[PlannedRun]:
    """Every run in the order they run: row by row, each row over every seed (a seed's start just before its first
    row), so a sweep cut short already holds whole rows."""
    labels = [row.label for row in sweep.rows]
    if len(set(labels)) != len(labels):
        raise UserError(f"sweep {sweep.name!r}: row labels must differ, got {labels}")
    common = (*sweep.overrides, *extra)
    per_seed = [_seed_runs(sweep, seed, out, common) for seed in sweep.seeds]  # each: [start?, row 0, row 1, ...]
    first_row_end = len(per_seed[0]) - len(sweep.rows) + 1
    first_rows = [run for runs in per_seed for run in runs[:first_row_end]]
    later_rows = [runs[first_row_end + r] for r in range(len(sweep.rows) - 1) for runs in per_seed]
    return first_rows + later_rows


def _seed_runs(sweep: Sweep, seed: int, out: Path, common: Sequence[str]) -> list[PlannedRun]:
    """One seed's runs: its start (if the sweep has one), then each row's run."""
    runs = []
    start_folder, start_stages = None, ()
    if sweep.start:
        start_stages = sweep.start.stages or _stages(sweep.start, (*common, *sweep.start.overrides))
        start_folder = out / f"start-s{seed}"
        runs.append(PlannedRun(sweep.start.label, seed, start_folder, sweep.start.config,
                               (*common, *sweep.start.overrides, f"seed={seed}",
                                f"stages=[{','.join(start_stages)}]"), start_stages))
    for row in sweep.rows:
        overrides = (*common, *row.overrides, f"seed={seed}")
        stages = _stages(row, overrides)
        if start_folder is not None:
            stages = tuple(s for s in stages if s not in start_stages)
            if not stages:
                raise UserError(f"row {row.label!r}: config {row.config} has no stage beyond the start's "
                                f"{list(start_stages)}")
            overrides = (*overrides, f"init_from={start_folder / 'stages' / start_stages[-1]}",
                         f"stages=[{','.join(stages)}]")
        runs.append(PlannedRun(row.label, seed, out / f"{_slug(row.label)}-s{seed}", row.config, overrides,
                               stages))
    return runs


def _stages(spec: RunSpec, overrides: Sequence[str]) -> tuple[str, ...]:
    return tuple(load_config(spec.config, list(overrides)).stages)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "row"


def finished(run: PlannedRun) -> dict | None:
    """The run's summary when it has finished all its stages, else None."""
    summary = run.folder / "summary.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text())
    return data if tuple(data.get("stages", {})) == run.stages else None


def execute(run: PlannedRun, seconds_file: Path) -> dict:
    """Train (or resume) one run in a child process that dies with the sweep; returns its summary."""
    command = [sys.executable, "-m", "jaxagent.train", "--config", run.config, f"run_dir={run.folder}",
               "progress=false", *run.overrides]
    log_path = run.folder.parent / f"{run.folder.name}.log"
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).returncode
    _add_seconds(seconds_file, run.folder.name, time.time() - started)
    if code != 0:
        raise UserError(f"run {run.folder} ({run.label}, seed {run.seed}) failed with exit code {code}; "
                        f"see {log_path}")
    summary = finished(run)
    if summary is None:
        raise UserError(f"run {run.folder} ended without finishing stages {list(run.stages)}; see {log_path}")
    return summary


def _die_with_parent() -> None:
    """In the child: the kernel kills it when the sweep dies (even by SIGKILL), so a restarted sweep never finds a
    stray trainer writing the run folder it resumes."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _add_seconds(path: Path, name: str, seconds: float) -> None:
    """Wall-clock seconds per run, summed over the attempts that returned (an attempt cut by a kill is lost)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = round(data.get(name, 0.0) + seconds, 1)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def results(runs: Sequence[PlannedRun], summaries: Sequence[dict], seconds: dict) -> list[dict]:
    """Per label (in order): the seeds' held-out success and reward of the run's last stage, and minutes."""
    rows: dict[str, dict] = {}
    for run, summary in zip(runs, summaries):
        last = summary["stages"][run.stages[-1]]
        row = rows.setdefault(run.label, {"label": run.label, "config": run.config, "stage": run.stages[-1],
                                          "seeds": [], "success": [], "reward": [], "minutes": []})
        row["seeds"].append(run.seed)
        row["success"].append(float(last["eval_success"]))
        row["reward"].append(float(last["eval_reward"]))
        row["minutes"].append(seconds.get(run.folder.name, float("nan")) / 60)
    return list(rows.values())


def _mean_sd(values: Sequence[float], scale: float = 100.0, signed: bool = False) -> str:
    values = scale * np.asarray(values, np.float64)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():{'+' if signed else ''}.1f} ± {sd:.1f}"


def _range(values: Sequence[float], scale: float = 100.0) -> str:
    return f"{scale * min(values):.1f}–{scale * max(values):.1f}"


def table(name: str, rows: Sequence[dict], reference: str | None = None) -> str:
    """The markdown table; with a `reference` row label, each row's success minus the reference's on the same seeds
    (mean ± sd of those paired differences: rows that share a start differ less than their own spreads suggest)."""
    seeds = ", ".join(str(s) for s in rows[0]["seeds"])
    ref = next((row for row in rows if row["label"] == reference), None)
    paired = [f"Δ vs {reference} (points)"] if ref else []
    header = ["row", "config (stage)", "success (%)", "min–max", *paired, "reward (%)", "min–max", "minutes per run"]
    lines = [f"Sweep `{name}`, seeds {seeds}: held-out results of each run's last stage (mean ± sd over seeds, "
             "then min–max" + (f"; Δ: success minus {reference}'s on the same seed, mean ± sd" if ref else "") + ").",
             "", _markdown_row(header), _markdown_row(["---"] * len(header))]
    for row in rows:
        lines.append(_markdown_row([
            row["label"], f"{row['config']} ({row['stage']})", _mean_sd(row["success"]), _range(row["success"]),
            *([_paired(row, ref)] if ref else []), _mean_sd(row["reward"]), _range(row["reward"]),
            f"{np.nanmean(row['minutes']):.1f}"]))
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _paired(row: dict, ref: dict) -> str:
    """Mean ± sd over the seeds both rows ran of (row's success − the reference's), in points; '—' for itself."""
    if row is ref:
        return "—"
    theirs = dict(zip(ref["seeds"], ref["success"]))
    deltas = [value - theirs[seed] for seed, value in zip(row["seeds"], row["success"]) if seed in theirs]
    return _mean_sd(deltas, signed=True) if deltas else "—"


def chart(name: str, rows: Sequence[dict], path: Path) -> None:
    """Held-out success per row: the mean over seeds with a ±sd error bar, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows)), 4))
    for x, row in enumerate(rows):
        values = 100 * np.asarray(row["success"])
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        ax.bar(x, values.mean(), yerr=sd, capsize=4, color="tab:blue", alpha=0.7)
        ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=20, ha="right")
    ax.set_ylabel("held-out success (%)")
    ax.set_title(f"sweep {name}: mean ± sd over seeds {', '.join(map(str, rows[0]['seeds']))}")
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_sweep(sweep: Sweep, out: Path, extra: Sequence[str] = ()) -> list[dict]:
    """Run (or finish) every run of the sweep, then write its table, JSON and chart; returns the rows."""
    runs = plan(sweep, out, extra)
    out.mkdir(parents=True, exist_ok=True)
    seconds_file = out / "seconds.json"
    summaries = []
    for index, run in enumerate(runs, 1):
        summary = finished(run)
        state = "finished before; skipped" if summary else "running"
        print(f"[{index}/{len(runs)}] {run.label} seed {run.seed}: {state} ({run.folder})", flush=True)
        summaries.append(summary or execute(run, seconds_file))
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    rows = results(runs, summaries, seconds)
    text = table(sweep.name, rows, sweep.rows[0].label)
    for filename, content in (("results.md", text), ("results.json", json.dumps(rows, indent=2) + "\n")):
        with staged_file(out / filename) as tmp:
            tmp.write_text(content)
    chart(sweep.name, rows, out / "results.png")
    print("\n" + text + f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.sweep", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sweep", help="a sweep file: a name in configs/sweeps/ or a .yaml path")
    what.add_argument("--configs", nargs="+", help="rows without a sweep file: one per config, no shared start")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the sweep file's, or 0)")
    parser.add_argument("--out", type=Path, help="folder of the sweep's runs (default runs/sweep-NAME)")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every run, e.g. eval.tasks=64")
    args = parser.parse_args(argv)
    if args.sweep:
        sweep = load_sweep(args.sweep)
    else:
        sweep = Sweep("-".join(args.configs), (0,), tuple(RunSpec(c, c) for c in args.configs))
    if args.seeds:
        sweep = dataclasses.replace(sweep, seeds=tuple(args.seeds))
    run_sweep(sweep, args.out or Path("runs") / f"sweep-{sweep.name}", args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
