"""`tuneforge sweep`: hyperparameter search with Optuna over any config key.

How a sweep runs:

- **The study** lives in an Optuna RDB storage: ``SWEEP/study.db`` (SQLite) by default, or any
  URL (PostgreSQL to let several machines work on one study). Re-running the same command
  resumes it.
- **Trial slots.** The trial budget is laid out up front as waiting trials (the grid's points,
  or empty slots that the sampler fills); workers claim slots atomically through the storage.
  So N workers on any number of machines run exactly the budget, no trial twice, none lost.
- **A trial** is a normal run folder ``SWEEP/trials/trial-NNNN`` trained in-process by
  :func:`tuneforge.recipes.run_recipe` with the trial's parameters as ``--set`` overrides and
  ``train.metric_for_best`` set to the objective. Each validation is reported to the pruner
  (through :func:`tuneforge.train.loop.eval_hook`); a pruned run stops like an early-stopped
  one, with its best checkpoint saved.
- **Failures** (a bad parameter combination, NaN loss, out of memory, any exception) mark the
  trial failed with the reason and the sweep goes on. A trial whose worker died (killed,
  machine lost) is failed as interrupted and its parameters are queued again.
- **Outputs**: ``results.csv`` (every trial), ``best.yaml`` (the best config, ready for
  ``tuneforge train``), ``sweep.json`` and plots (history, importance, slice, intermediate).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, dump_config, load_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.experiments.space import SweepSpace, check_space_against_config

HEARTBEAT_S = 30
"""How often a running trial tells the storage it is alive."""
GRACE_S = 180
"""A trial silent this long is taken for dead (its machine lost) and queued again."""


@dataclass
class SweepJob:
    """Everything a worker needs (picklable: it crosses into worker processes)."""

    config: str | None
    overrides: list[str]
    space: SweepSpace
    sweep_dir: str
    storage: str
    study_name: str
    workers: int = 1
    worker_index: int = 0
    extra_overrides: list[str] = field(default_factory=list)


class TrialFailed(TuneforgeError):
    """A trial that cannot give a result (the reason is recorded with it)."""


def run_sweep(config: str | Path | None, space: SweepSpace, *, overrides: list[str] = (),
              output_dir: str | Path | None = None, storage: str | None = None,
              study_name: str | None = None, workers: int = 1) -> dict:
    """Run (or resume, or join) a sweep; returns the summary also written to sweep.json."""
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1 (got {workers})")
    check_space_against_config(space, config, list(overrides))
    name = Path(config).stem if config else "sweep"
    sweep_dir = Path(output_dir or f"runs/sweep-{name}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    job = SweepJob(config=str(config) if config else None, overrides=list(overrides), space=space,
                   sweep_dir=str(sweep_dir), storage=storage or default_storage(sweep_dir),
                   study_name=study_name or sweep_dir.name, workers=workers,
                   extra_overrides=["train.progress=false"] if workers > 1 else [])
    study = open_study(job, create=True)
    planned = plan_trials(study, space)
    say(f"study {job.study_name!r} in {job.storage}: {planned} new trial(s) planned, "
        f"{space.sampler} sampler, {space.pruner} pruner, {workers} worker(s)")
    t0 = time.time()
    if workers == 1:
        work(job)
    else:
        ctx = multiprocessing.get_context("spawn")  # torch and threads do not survive a fork
        procs = [ctx.Process(target=_worker_main, args=(job, i), name=f"sweep-worker-{i}")
                 for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    summary = write_outputs(open_study(job), job)
    summary["seconds"] = round(time.time() - t0, 1)
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    return summary


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_study(job: SweepJob, *, create: bool = False):
    """Load the study (create it when asked), checking it was made for the same search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(job.storage)
    space = job.space
    if create:
        study = optuna.create_study(study_name=job.study_name, storage=storage,
                                    direction=space.direction, load_if_exists=True)
        stored = study.user_attrs.get("space")
        if stored is None:
            study.set_user_attr("space", space.describe())
        elif stored != json.loads(json.dumps(space.describe())):
            raise ConfigError(f"the study {job.study_name!r} in {job.storage} was made with another "
                              f"search space or objective; use a new --output-dir or --study-name")
        return study
    return optuna.load_study(study_name=job.study_name, storage=storage)


def _storage(url: str):
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: stable for years
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S, heartbeat_stale_trial_callback=_requeue)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's many errors for a bad URL or server
        raise ConfigError(f"--storage {url}: cannot open the study storage: {err}") from err


def plan_trials(study, space: SweepSpace) -> int:
    """Queue trial slots up to the budget; returns how many were added.

    The grid queues each point not yet planned (at most ``trials`` in all); the other samplers
    queue empty slots that they fill when a worker claims one. Trials that were queued again
    after an interruption do not count twice.
    """
    trials = study.get_trials(deepcopy=False)
    planned = len(trials) - sum("retry_of" in t.user_attrs for t in trials)
    if space.sampler == "grid":
        seen = {json.dumps(t.system_attrs.get("fixed_params", t.params), sort_keys=True)
                for t in trials}
        points = [p for p in space.grid_points() if json.dumps(p, sort_keys=True) not in seen]
        budget = space.trials if space.trials is not None else len(seen) + len(points)
        points = points[: max(0, budget - planned)]
    else:
        points = [{}] * max(0, (space.trials or 20) - planned)
    for params in points:
        study.enqueue_trial(params)
    return len(points)


def work(job: SweepJob) -> None:
    """Claim and run trials until none are waiting, the time is up, or the launcher is gone."""
    study = open_study(job)
    timeout = job.space.timeout
    deadline = time.time() + timeout if timeout else None
    parent = os.getppid()
    while deadline is None or time.time() < deadline:
        if job.workers > 1 and os.getppid() != parent:
            break  # the launcher was killed: finish the trial in hand, take no new one
        recover_interrupted(study)
        trial = claim_trial(study, job)
        if trial is None:
            break
        run_trial(study, trial, job)


def _worker_main(job: SweepJob, index: int) -> None:
    """Entry point of a worker process: its share of the CPU (or its GPU), then :func:`work`."""
    share = max(1, (os.cpu_count() or 1) // job.workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    import torch

    torch.set_num_threads(share)
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    job.worker_index = index
    try:
        work(job)
    except KeyboardInterrupt:
        pass


def claim_trial(study, job: SweepJob):
    """Take the next waiting trial (atomic in the storage: one worker gets it), or None."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not _take_waiting(storage, frozen._trial_id):
            continue  # another worker took it first
        storage.set_trial_user_attr(frozen._trial_id, "worker", _me())
        storage.record_heartbeat(frozen._trial_id)
        # a sampler seeded by the trial number: reproducible, and no two workers draw alike
        study.sampler = make_sampler(job.space, seed=job.space.seed + frozen.number)
        study.pruner = make_pruner(job.space)
        return optuna.Trial(study, frozen._trial_id)
    return None


def _take_waiting(storage, trial_id: int) -> bool:
    """WAITING -> RUNNING as one conditional UPDATE: True for exactly one caller.

    Optuna's ``set_trial_state_values`` reads the state and writes it in a second statement
    under ``SELECT ... FOR UPDATE``, which SQLite ignores: two workers could both read WAITING
    and both run the same trial (seen once in CI). A single ``UPDATE ... WHERE state =
    'WAITING'`` is atomic on SQLite and PostgreSQL alike; its row count says who won.
    """
    from datetime import datetime

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    backend = getattr(storage, "_backend", storage)  # the RDBStorage under Optuna's cache
    with _create_scoped_session(backend.scoped_session) as session:
        taken = (session.query(models.TrialModel)
                 .filter(models.TrialModel.trial_id == trial_id,
                         models.TrialModel.state == TrialState.WAITING)
                 .update({models.TrialModel.state: TrialState.RUNNING}, synchronize_session=False))
        if taken == 1:  # ours now: stamp its start as Optuna would
            session.get(models.TrialModel, trial_id).datetime_start = datetime.now()
    return taken == 1


def run_trial(study, trial, job: SweepJob) -> None:
    """Train one trial's run folder and tell the study how it ended."""
    from optuna.trial import TrialState

    from tuneforge.recipes import run_recipe
    from tuneforge.train.lifecycle import eval_hook

    space = job.space
    run_dir = Path(job.sweep_dir) / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    beat = _Heartbeat(study._storage, trial._trial_id)
    t0 = time.time()
    pruned_at: list[int] = []

    def on_eval(step: int, val: dict[str, float]) -> bool:
        value = val.get(space.objective)
        if value is None:
            raise TrialFailed(f"{space.objective} is not logged at validation (logged: "
                              f"{', '.join(sorted(val))})")
        if not math.isfinite(value) or not math.isfinite(val.get("val_loss", 0.0)):
            raise TrialFailed(f"non-finite validation at step {step} ({space.objective}={value}, "
                              f"val_loss={val.get('val_loss')}): the loss diverged")
        trial.report(value, step)
        if trial.should_prune():
            pruned_at.append(step)
            return True
        return False

    state, value, reason = TrialState.FAIL, None, None
    try:
        params = {p.key: p.suggest(trial) for p in space.params}
        say(f"trial {trial.number}: {_short(params)}")
        config = trial_config(job, params, run_dir)
        with eval_hook(on_eval):
            summary = run_recipe(config, overwrite=True)
        value = summary.get("best_metric")
        if pruned_at and summary.get("stopped_early"):
            state, reason = TrialState.PRUNED, f"pruned at step {pruned_at[-1]}"
        elif value is None or not math.isfinite(value):
            reason = f"the run ended without a finite {space.objective}"
        elif summary.get("final_train_loss") is not None and not math.isfinite(summary["final_train_loss"]):
            reason = "the training loss is not finite (diverged)"
        else:
            state = TrialState.COMPLETE
    except KeyboardInterrupt:
        beat.stop()
        _fail_and_requeue(study, trial._trial_id, "interrupted (Ctrl-C)")
        raise
    except Exception as err:  # noqa: BLE001 - any failure is the trial's, not the sweep's
        reason = _reason(err)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(str(err) if isinstance(err, TuneforgeError)
                                           else traceback.format_exc())
    finally:
        beat.stop()
        _free_memory()
    trial.set_user_attr("duration_s", round(time.time() - t0, 2))
    if reason:
        trial.set_user_attr("reason", reason)
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    say(f"trial {trial.number}: {state.name.lower()}"
        + (f" {space.objective}={value:.4f}" if state == TrialState.COMPLETE else f" ({reason})"))
    write_outputs(study, job, plots=False)  # the table stays current while the sweep runs


def trial_config(job: SweepJob, params: dict[str, Any], run_dir: Path) -> RunConfig:
    """The base config with the trial's values set (as ``--set`` overrides would set them)."""
    sets = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    return load_config(job.config, [*job.overrides, *sets, *job.extra_overrides,
                                    f"output_dir={run_dir}",
                                    f"train.metric_for_best={job.space.objective}"])


def make_sampler(space: SweepSpace, seed: int):
    import optuna

    startup = max(2, min(10, (space.trials or 20) // 3))
    if space.sampler == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                              multivariate=True, constant_liar=True)
    if space.sampler == "gp":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise ConfigError("sampler gp needs scipy: pip install scipy (or use sampler: tpe)")
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)  # random, and the grid's fixed points


def make_pruner(space: SweepSpace):
    import optuna

    o = space.pruner_options
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=o["startup_trials"],
                                           n_warmup_steps=o["warmup_steps"])
    if space.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=o["min_resource"],
                                                      reduction_factor=o["reduction_factor"])
    return optuna.pruners.NopPruner()


# --- interrupted trials --------------------------------------------------------------------


def recover_interrupted(study) -> None:
    """Fail and re-queue trials whose worker is gone: on this machine a dead process id; on any
    machine a heartbeat older than the grace period."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    me = _me()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == me["host"] and not _alive(worker.get("pid", -1)):
            _fail_and_requeue(study, t._trial_id, f"interrupted (worker {worker['pid']} died)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        fail_stale_trials(study)


def _fail_and_requeue(study, trial_id: int, reason: str) -> None:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "reason", reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return
    except UpdateFinishedTrialError:
        return  # another worker got there first
    _requeue(study, storage.get_trial(trial_id))


def _requeue(study, trial) -> None:
    """Queue an interrupted trial's parameters again (also the storage's callback for a trial
    failed for lack of heartbeats)."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
    say(f"trial {trial.number} was interrupted; its parameters are queued again")


class _Heartbeat:
    """A daemon thread that records the trial's heartbeat in the storage while it runs."""

    def __init__(self, storage, trial_id: int) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id), daemon=True)
        self._thread.start()

    def _beat(self, storage, trial_id: int) -> None:
        while not self._done.wait(HEARTBEAT_S):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only delays nothing; keep training
                pass

    def stop(self) -> None:
        self._done.set()


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(err: BaseException) -> str:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory (lower train.batch_size or data.max_length for such trials)"
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines) or type(err).__name__
    kind = "" if isinstance(err, TuneforgeError) else f"{type(err).__name__}: "
    return (kind + text)[:500]


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# --- outputs ------------------------------------------------------------------------------


def results_rows(study, space: SweepSpace) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective, duration, parameters, run folder, note."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        note = t.user_attrs.get("reason", "")
        if t.number in retried:
            note = f"{note or 'interrupted'}; re-queued as trial {retried[t.number]}"
        if "retry_of" in t.user_attrs:
            note = f"{note + '; ' if note else ''}retry of trial {t.user_attrs['retry_of']}"
        worker = t.user_attrs.get("worker") or {}
        row = {"trial": t.number, "state": t.state.name.lower(),
               space.objective: t.value if t.value is not None else "",
               "duration_s": t.user_attrs.get("duration_s", ""),
               **{p.key: t.params.get(p.key, "") for p in space.params},
               "run_dir": t.user_attrs.get("run_dir", ""), "host": worker.get("host", ""),
               "note": note}
        rows.append(row)
    return rows


def write_outputs(study, job: SweepJob, *, plots: bool = True) -> dict:
    """results.csv, best.yaml and (with ``plots``) the PNG plots; returns the sweep summary."""
    from optuna.trial import TrialState

    space, sweep_dir = job.space, Path(job.sweep_dir)
    rows = results_rows(study, space)
    _atomic_csv(sweep_dir / "results.csv", rows)
    counts = {s: sum(r["state"] == s for r in rows)
              for s in ("complete", "pruned", "fail", "running", "waiting")}
    summary: dict[str, Any] = {"study": job.study_name, "storage": job.storage,
                               "objective": space.objective, "direction": space.direction,
                               "sampler": space.sampler, "pruner": space.pruner,
                               "trials": counts, "results": str(sweep_dir / "results.csv"),
                               "rows": rows}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if complete:
        best = study.best_trial
        params = {p.key: p.choices[p.labels.index(best.params[p.key])]
                  if p.kind == "categorical" else best.params[p.key]
                  for p in space.params if p.key in best.params}
        write_best_config(job, best.number, best.value, params, sweep_dir / "best.yaml")
        summary.update(best_trial=best.number, best_value=best.value, best_params=params,
                       best_run_dir=best.user_attrs.get("run_dir"),
                       best_config=str(sweep_dir / "best.yaml"))
    if plots:
        summary["plots"] = write_plots(study, space, sweep_dir)
    return summary


def write_best_config(job: SweepJob, number: int, value: float, params: dict, path: Path) -> None:
    config = trial_config(job, params, Path(job.sweep_dir) / "best")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    dump_config(config, tmp)
    header = (f"# The best trial ({number}) of sweep {job.sweep_dir}: "
              f"{job.space.objective} = {value:.6g}\n"
              f"# tuneforge train {path}\n")
    tmp.write_text(header + tmp.read_text())
    os.replace(tmp, path)


def write_plots(study, space: SweepSpace, sweep_dir: Path) -> dict[str, str]:
    """Optimisation history, parameter importance, slice and intermediate values (matplotlib).

    A plot that needs more finished trials than there are is left out, with the reason.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import PedAnovaImportanceEvaluator

    def importance(study):
        # PED-ANOVA ships with Optuna (fANOVA would need scikit-learn); its top quantile must
        # hold a few trials, so widen it for small sweeps.
        done = len([t for t in study.trials if t.value is not None])
        quantile = min(0.5, max(0.1, 3 / max(done, 1)))
        return ovm.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile))

    makers = {"history": ovm.plot_optimization_history, "importance": importance,
              "slice": ovm.plot_slice, "intermediate": ovm.plot_intermediate_values}
    out = {}
    for name, make in makers.items():
        path = sweep_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                ax = make(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(max(6.0, fig.get_size_inches()[0]), 4.5)
                fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            out[name] = str(path)
        except Exception as err:  # noqa: BLE001 - a missing plot must not lose the results
            out[name] = f"not drawn: {err}"
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a text table for the terminal."""
    if not rows:
        return "(no trials)"
    keys = [k for k in rows[0] if k not in ("run_dir", "host")]
    cells = [[_cell(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _atomic_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    keys = list(rows[0]) if rows else ["trial"]
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def say(message: str) -> None:
    print(f"tuneforge sweep: {message}", file=sys.stderr, flush=True)
