"""`tuneforge sweep` on a tiny llama: grid coverage, pruning, failures, two workers, resume."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from eval_helpers import write_splits

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.experiments.space import check_space_against_config, load_space
from tuneforge.experiments.sweep import run_sweep

TEMPLATE = {"system": "Route the ticket.", "user": "Ticket: {text}", "assistant": "Team: {label}"}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def base_config(tmp: Path, **train) -> Path:
    """A 3-step LoRA run on templated ticket classification, validated every step."""
    files = write_splits(tmp / "data", sizes=(12, 6, 3))
    settings = {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "bf16": "false", "eval_every": 1,
                "save_every": 0, "warmup_steps": 0, "schedule": "constant", "progress": False,
                **train}
    config = {"output_dir": str(tmp / "unused"), "model": {"name": "tiny:llama"},
              "adapter": {"method": "lora", "r": 2, "alpha": 4},
              "data": {"train": str(files["train"]), "validation": str(files["validation"]),
                       "template": TEMPLATE}, "train": settings}
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def space_file(tmp: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def sweep(tmp: Path, config: Path, space: str, name: str, **kw) -> tuple[dict, Path]:
    """Run a sweep of ``config`` over the search space ``space`` into ``tmp/name``."""
    out = tmp / name
    return run_sweep(config, load_space(space_file(tmp, space, f"{name}.yaml")), output_dir=out,
                     **kw), out


def study_of(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep_dir.name,
                             storage=f"sqlite:///{sweep_dir / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def test_grid_covers_the_grid_exactly_and_writes_the_best_config(tmp_path):
    config = base_config(tmp_path)
    space = load_space(space_file(tmp_path, "objective: val_loss\nsampler: grid\npruner: none\n"
                                  "params:\n  adapter.r: [2, 4]\n  train.lr: [1.0e-2, 3.0e-2]\n"))
    out = tmp_path / "grid"
    summary = run_sweep(config, space, output_dir=out)
    study = study_of(out)
    grid = {(r, lr) for r, lr in itertools.product([2, 4], [1e-2, 3e-2])}
    seen = [(t.params["adapter.r"], t.params["train.lr"]) for t in study.get_trials()]
    assert sorted(seen) == sorted(grid)  # every point once, nothing else
    assert states(study) == ["COMPLETE"] * 4 and summary["trials"]["complete"] == 4
    for t in study.get_trials():  # each trial is an ordinary run folder with its values
        run = Path(t.user_attrs["run_dir"])
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["adapter"]["r"] == t.params["adapter.r"]
        assert saved["train"]["lr"] == t.params["train.lr"]
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # the best config is ready to run, with the best trial's values
    best = study.best_trial
    assert summary["best_trial"] == best.number
    loaded = load_config(out / "best.yaml")
    assert (loaded.adapter.r, loaded.train.lr) == (best.params["adapter.r"], best.params["train.lr"])
    assert loaded.output_dir == str(out / "best") and loaded.model.name == "tiny:llama"
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} == {"complete"} and all(r["val_loss"] for r in rows)
    for plot in ("history", "slice", "intermediate"):
        assert (out / f"{plot}.png").stat().st_size > 1000, summary["plots"][plot]
    # running it again finds the grid done: no trial is added or repeated
    again = run_sweep(config, space, output_dir=out)
    assert len(study_of(out).get_trials()) == 4 and again["best_trial"] == best.number


def test_median_pruner_stops_poor_trials_early(tmp_path):
    config = base_config(tmp_path, max_steps=4)
    # a good learning rate first; two that barely move fall behind it at the first validation
    summary, out = sweep(tmp_path, config, "objective: val_loss\nsampler: grid\n"
                         "pruner: {type: median, startup_trials: 1}\n"
                         "params:\n  train.lr: [3.0e-2, 1.0e-6, 2.0e-6]\n", "prune")
    trials = study_of(out).get_trials()
    assert trials[0].state.name == "COMPLETE"
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and summary["trials"]["pruned"] == len(pruned)
    assert all(t.params["train.lr"] < 1e-5 for t in pruned)
    for t in pruned:
        run = Path(t.user_attrs["run_dir"])
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) < 4  # stopped before max_steps ...
        assert json.loads((run / "summary.json").read_text())["stopped_early"]
        assert (run / "adapter" / "adapter_model.safetensors").is_file()  # ... as a whole run
        assert t.user_attrs["reason"].startswith("pruned at step")


def test_failing_trials_are_recorded_with_their_reason_and_the_sweep_goes_on(tmp_path):
    config = base_config(tmp_path)
    summary, out = sweep(tmp_path, config, "objective: val_accuracy\nsampler: grid\npruner: none\n"
                         "params:\n  train.lr: [1.0e-2, 1.0e+30]\n  data.max_length: [512, 8]\n",
                         "fail")
    by_params = {(t.params["train.lr"], t.params["data.max_length"]): t
                 for t in study_of(out).get_trials()}
    assert by_params[(1e-2, 512)].state.name == "COMPLETE"
    diverged = by_params[(1e30, 512)]
    assert diverged.state.name == "FAIL" and "loss diverged" in diverged.user_attrs["reason"]
    for lr in (1e-2, 1e30):  # a combination the data refuses
        bad = by_params[(lr, 8)]
        assert bad.state.name == "FAIL" and "too long" in bad.user_attrs["reason"]
        assert "data.max_length" in (Path(bad.user_attrs["run_dir"]) / "error.txt").read_text()
    assert summary["trials"] == {"complete": 1, "pruned": 0, "fail": 3, "running": 0, "waiting": 0}
    assert summary["best_trial"] == by_params[(1e-2, 512)].number


def test_two_worker_processes_share_one_study_without_duplicate_or_lost_trials(tmp_path):
    config = base_config(tmp_path, max_steps=2)
    summary, out = sweep(tmp_path, config, "objective: val_loss\nsampler: grid\npruner: none\n"
                         "params:\n  train.lr: [1.0e-3, 1.0e-2, 3.0e-2]\n  adapter.r: [2, 4]\n",
                         "two", workers=2)
    trials = study_of(out).get_trials()
    points = sorted((t.params["train.lr"], t.params["adapter.r"]) for t in trials)
    assert points == sorted(itertools.product([1e-3, 1e-2, 3e-2], [2, 4]))
    assert [t.number for t in trials] == list(range(6))
    assert states(study_of(out)) == ["COMPLETE"] * 6 and summary["trials"]["complete"] == 6
    run_dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(run_dirs) == 6 and all((Path(d) / "summary.json").is_file() for d in run_dirs)
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # trials ran in the worker processes


def test_a_sweep_killed_mid_trial_resumes_and_reruns_only_that_trial(tmp_path):
    config = base_config(tmp_path, max_steps=25, eval_every=5)
    space_path = space_file(tmp_path, "objective: val_loss\nsampler: random\npruner: none\n"
                            "trials: 3\nparams:\n  train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "sweep", str(config), "--space",
                             str(space_path), "--output-dir", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not second.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_summary = out / "trials" / "trial-0000" / "summary.json"
    first_written = first_summary.stat().st_mtime_ns
    assert states(study_of(out)) == ["COMPLETE", "RUNNING", "WAITING"]

    summary = run_sweep(config, load_space(space_path), output_dir=out)  # the same sweep again
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "interrupted" in trials[1].user_attrs["reason"]
    retry = trials[3]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == trials[1].params
    assert summary["trials"]["complete"] == 3  # the budget, with nothing run twice but the cut one
    assert first_summary.stat().st_mtime_ns == first_written
    with open(out / "results.csv") as fh:
        notes = {int(r["trial"]): r["note"] for r in csv.DictReader(fh)}
    assert "re-queued as trial 3" in notes[1] and "retry of trial 1" in notes[3]


def _exit_2(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_space_and_argument_errors_name_the_key_and_line_and_exit_2(tmp_path, capsys):
    config = str(base_config(tmp_path))
    bad = space_file(tmp_path, "objective: accuracy\nsampler: tpe\nprunner: median\nparams:\n"
                     "  train.lr: {low: 1.0e-2, high: 1.0e-4, log: true}\n"
                     "  adapter.r: {low: 2, hihg: 8}\n")
    err = _exit_2(capsys, "sweep", config, "--space", str(bad))
    assert f"{bad}:3: prunner: unknown key; did you mean pruner?" in err
    assert f"{bad}:1: objective: must name a validation metric" in err
    assert f"{bad}:5: params.train.lr: low must be below high" in err
    assert f"{bad}:6: params.adapter.r: unknown field(s) hihg" in err
    # keys and values the run config refuses, before any trial
    schema = space_file(tmp_path, "params:\n  train.lrr: [1.0e-3]\n  adapter.method: [lora, lorra]\n",
                        "schema.yaml")
    err = _exit_2(capsys, "sweep", config, "--space", str(schema))
    assert f"{schema}:2: params.train.lrr" in err and "did you mean train.lr" in err
    assert f"{schema}:3: params.adapter.method = 'lorra'" in err
    grid = space_file(tmp_path, "sampler: grid\nparams:\n  train.lr: {low: 1.0e-3, high: 1.0e-2}\n",
                      "grid.yaml")
    assert "grid sampler needs a list of values or a step" in _exit_2(
        capsys, "sweep", config, "--space", str(grid))
    assert "--workers: must be >= 1" in _exit_2(capsys, "sweep", config, "--space", str(grid),
                                               "--workers", "0", "--sampler", "tpe")
    assert "not found" in _exit_2(capsys, "sweep", config, "--space", str(tmp_path / "none.yaml"))


def test_an_objective_from_the_command_line_brings_its_own_direction(tmp_path):
    path = space_file(tmp_path, "objective: val_accuracy\ndirection: maximize\n"
                      "params:\n  adapter.r: [2, 4]\n")
    assert load_space(path).direction == "maximize"
    assert load_space(path, objective="val_loss").direction == "minimize"
    assert load_space(path, objective="val_loss", direction="maximize").direction == "maximize"


@pytest.mark.parametrize("text, expected", [
    ("params:\n  train.lr: {low: 1e-4, high: 1e-2, log: true}\n", ("float", 1e-4, 1e-2, True)),
    ("params:\n  train.epochs: {low: 1, high: 3}\n", ("int", 1, 3, False)),
])
def test_ranges_read_yaml_numbers_and_infer_their_type(tmp_path, text, expected):
    (param,) = load_space(space_file(tmp_path, text)).params
    assert (param.kind, param.low, param.high, param.log) == expected


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "spaces").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_search_spaces_fit_the_demo_config(path):
    repo = Path(__file__).parents[1]
    space = load_space(path)
    assert space.params and space.objective.startswith("val_")
    check_space_against_config(space, repo / "configs" / "demo-support-lora.yaml")


def _race_for_trials(url: str, start: float, out) -> None:
    """Worker of the claim race: load the study, wait for the common start, claim all waiting."""
    from tuneforge.experiments.sweep import _storage, _take_waiting

    study = optuna.load_study(study_name="race", storage=_storage(url))
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    time.sleep(max(0.0, start - time.time()))
    out.put([t.number for t in waiting if _take_waiting(study._storage, t._trial_id)])


def test_workers_racing_for_waiting_trials_take_each_once(tmp_path):
    """Four processes claim the same 30 waiting trials at the same instant on SQLite: every
    trial is taken exactly once and is RUNNING (Optuna's read-then-write claim let two workers
    take one trial: SQLite ignores SELECT ... FOR UPDATE)."""
    import multiprocessing

    from tuneforge.experiments.sweep import _storage

    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=_storage(url))
    for i in range(30):
        study.enqueue_trial({"x": i})
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 6  # after every process has started and loaded the study
    procs = [ctx.Process(target=_race_for_trials, args=(url, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    taken = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join()
    assert sorted(taken) == list(range(30))
    assert states(optuna.load_study(study_name="race", storage=url)) == ["RUNNING"] * 30
