"""``tuneforge jobs worker``: claims jobs from the database and runs them, one at a time.

A job goes through two claims, each one conditional UPDATE (:meth:`JobStore.claim`):

1. **validating_files**: its files are copied into the job's folder and checked by
   :func:`~tuneforge.data.validate.check_data`, as ``tuneforge data check`` does, plus the
   format its method trains on. Problems fail the job, worded as ``data check`` words them
   (``train.jsonl:3: messages[1].content: ...``, under the uploaded file's name), in its
   ``error`` and its events; a clean job is queued.
2. **queued -> running**: a run config (YAML) is written for the job's run folder and
   ``python -m tuneforge train CONFIG`` runs as a child process (``--resume`` when the folder
   holds a checkpoint). While it runs the worker stamps a heartbeat every few seconds, turns
   new metrics.jsonl lines into events and new checkpoints into checkpoint rows. Cancel and
   pause are seen at the next heartbeat (the job is no longer the worker's): the child is
   stopped, its checkpoints kept; a resumed job continues from them with ``--resume``.

A worker killed mid-job takes its child with it (Linux: the parent-death signal) and stops
beating; after ``stale_after_s`` any worker puts the job back in the queue and it resumes from
its last checkpoint: the loss curve continues where the checkpoint left it, nothing is trained
twice from zero.

Folders: ``JOBS_DIR/files/<sha256>`` (uploads), ``JOBS_DIR/runs/<job id>/`` (the job's data
copies, ``job.yaml``, ``train.log``) with ``run/`` its run folder (adapter, checkpoints,
metrics.jsonl). A job's data never leaves its folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneforge.config import dump_config, load_config
from tuneforge.data.formats import Problem, format_problems, read_records
from tuneforge.data.validate import check_data
from tuneforge.errors import TuneforgeError
from tuneforge.jobs.api import (
    DEFAULT_LR,
    METHOD_FORMATS,
    RECIPES,
    fine_tuned_name,
    job_folder,
    run_folder,
)
from tuneforge.jobs.files import FileStore
from tuneforge.jobs.store import JobStore, new_id
from tuneforge.train.checkpoint import STEP_PREFIX, list_checkpoints

MAX_EVENTS_PER_CHECK = 50  # problems listed one event each; the error field holds them all
KEEP_CHECKPOINTS = 3


@dataclass
class WorkerSettings:
    """How a worker polls, beats and trains (the ``tuneforge jobs worker`` flags)."""

    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    """A job whose worker has not beaten for this long is taken to be orphaned."""
    poll_s: float = 2.0
    save_every: int | None = None
    """Checkpoint every N steps; None: at the end of each epoch (OpenAI's habit)."""
    overrides: list[str] = field(default_factory=list)
    """``--set KEY=VALUE`` applied to every job's run config (e.g. train.bf16=false)."""
    until_idle: bool = False
    """Return when no job is waiting, instead of polling for more."""
    name: str = ""

    def check(self) -> None:
        if self.heartbeat_s <= 0 or self.poll_s <= 0:
            raise TuneforgeError("--heartbeat and --poll must be > 0")
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise TuneforgeError(f"--stale-after must be at least twice --heartbeat "
                                 f"({2 * self.heartbeat_s:g} s), or live jobs look dead")
        if self.save_every is not None and self.save_every < 1:
            raise TuneforgeError("--save-every must be >= 1")


class Worker:
    """Claims and runs jobs from ``store``, with files and run folders under ``jobs_dir``."""

    def __init__(self, store: JobStore, jobs_dir: str | Path,
                 settings: WorkerSettings | None = None) -> None:
        self.store, self.jobs_dir = store, Path(jobs_dir)
        self.settings = settings or WorkerSettings()
        self.settings.check()
        self.files = FileStore(self.jobs_dir)
        self.name = self.settings.name or f"{socket.gethostname()}:{os.getpid()}:{new_id('')[:6]}"
        self.stop_event = threading.Event()

    def run(self) -> int:
        """Work until stopped (or, with ``until_idle``, until nothing waits); jobs run."""
        done = 0
        while not self.stop_event.is_set():
            if self.work_once():
                done += 1
                continue
            if self.settings.until_idle and self.store.waiting() == 0:
                break
            self.stop_event.wait(self.settings.poll_s)
        return done

    def work_once(self) -> bool:
        """Release stale jobs, then validate or run one job; False when none was waiting."""
        for job in self.store.release_stale(self.settings.stale_after_s):
            again = "queued again to resume from its last checkpoint" \
                if job["status"] == "queued" else f"released ({job['status']})"
            self.store.add_event(job["id"], f"The worker running this job stopped answering "
                                 f"(no heartbeat for {self.settings.stale_after_s:g} s); {again}",
                                 level="warn")
        for status, new, step in (("validating_files", None, self.validate),
                                  ("queued", "running", self.train)):
            job = self.store.claim(self.name, status, new)
            if job is None:
                continue
            try:
                step(job)
            except Exception as err:  # noqa: BLE001 - a bug fails this job, not every job after it
                self._fail(job, "internal_error", f"the worker failed: {type(err).__name__}: "
                           f"{err}", None, new or status)
            return True
        return False

    # ------------------------------------------------------------------------- validating_files

    def validate(self, job: dict) -> None:
        """Copy the job's files into its folder and check them as ``data check`` does."""
        folder = job_folder(self.jobs_dir, job["id"])
        problems, paths = [], {}
        for param in ("training_file", "validation_file"):
            if job[param] is None:
                continue
            row = self.store.get_file(job[param], job["owner"])
            if row is None or not self.files.path(row["sha256"]).is_file():
                self._fail(job, "invalid_file", f"{param} {job[param]} was deleted before the "
                           "job could read it", param, "validating_files")
                return
            paths[param] = _copy_in(self.files.path(row["sha256"]), folder / "data" / param,
                                    row["filename"])
        train = paths["training_file"]
        validation = [paths["validation_file"]] if "validation_file" in paths else []
        report = check_data(train, validation=validation)
        names = {str(p): p.name for p in paths.values()}  # as `data check NAME` shows them
        problems = [dataclasses.replace(p, source=names.get(p.source, p.source))
                    for p in report.problems]
        wanted = METHOD_FORMATS[job["method"]["type"]]
        for stats, param in zip(report.stats.get("files", []), paths):
            fmt = stats.get("format")
            if stats.get("examples") and fmt not in wanted:
                problems.append(Problem(paths[param].name, None, "", f"{fmt or 'mixed'} records "
                                        f"cannot train a {job['method']['type']} job; use "
                                        f"{' or '.join(wanted)} records"))
        errors = [p for p in problems if p.severity == "error"]
        for p in problems[:MAX_EVENTS_PER_CHECK]:
            self.store.add_event(job["id"], str(p), level="error" if p in errors else "warn")
        if errors:
            param = "validation_file" if all(p.source != train.name for p in errors) \
                else "training_file"
            message = format_problems(errors, f"data check found {len(errors)} error(s):")
            self._fail(job, "invalid_training_file" if param == "training_file"
                       else "invalid_validation_file", message, param, "validating_files")
            return
        n_train = report.stats["files"][0]["examples"]
        self.store.add_event(job["id"], f"Validated files: {n_train} training examples")
        if self.store.set_status(job["id"], "queued", only_from=("validating_files",),
                                 held_by=self.name, worker=None) is not None:
            self.store.add_event(job["id"], "Files validated, moving job to queued state")

    # ------------------------------------------------------------------------- running

    def train(self, job: dict) -> None:
        """Run the job's training as a child process until it ends or the job is taken away."""
        folder = job_folder(self.jobs_dir, job["id"])
        run_dir = run_folder(self.jobs_dir, job["id"])
        try:
            config_path, total = self.write_config(job, folder, run_dir)
        except TuneforgeError as err:
            self._fail(job, "invalid_config", str(err), None, "running")
            return
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        resume = bool(checkpoints)
        self.store.add_event(job["id"], f"Resumed from checkpoint step "
                             f"{_step(checkpoints[-1])} (attempt {job['attempts']})"
                             if resume else "Fine-tuning job started")
        command = [sys.executable, "-m", "tuneforge", "train", str(config_path),
                   "--resume" if resume else "--overwrite"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tail = _MetricsTail(self.store, job, run_dir, total)
        with open(folder / "train.log", "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
            lost = self._watch(job, proc, tail)
        tail.publish()
        if lost:
            self.store.release(job["id"], self.name)
            return
        if proc.returncode == 0:
            self._succeed(job, run_dir)
        else:
            self._fail(job, "training_failed", _failure(folder / "train.log", proc.returncode),
                       None, "running")

    def _watch(self, job: dict, proc: subprocess.Popen, tail: _MetricsTail) -> bool:
        """Beat and publish until the child ends; True if the job was taken away (cancelled,
        paused, or re-queued as stale) and the child stopped for it."""
        last_beat = time.monotonic()
        while proc.poll() is None:
            if time.monotonic() - last_beat >= self.settings.heartbeat_s:
                if not self.store.heartbeat(job["id"], self.name):
                    _stop(proc)
                    current = self.store.get_job(job["id"]) or {}
                    self.store.add_event(job["id"], f"Training stopped: the job is "
                                         f"{current.get('status', 'gone')}; checkpoints kept")
                    return True
                last_beat = time.monotonic()
            tail.publish()
            if self.stop_event.wait(min(0.5, self.settings.heartbeat_s / 2)):
                _stop(proc)  # the worker is shutting down: the job goes back to the queue
                self.store.set_status(job["id"], "queued", only_from=("running",),
                                      held_by=self.name, worker=None)
                return True
        return False

    def write_config(self, job: dict, folder: Path, run_dir: Path) -> tuple[Path, int]:
        """The job's run config (``job.yaml`` in its folder) and its approximate step count."""
        data = folder / "data"
        train = _only_file(data / "training_file")
        validation = _only_file(data / "validation_file") if job["validation_file"] else None
        hyper, kind = job["hyperparameters"], job["method"]["type"]
        n_train = sum(1 for _ in read_records(train))
        per_epoch = max(1, math.ceil(n_train / hyper["batch_size"]))
        every = self.settings.save_every or per_epoch
        config = {
            "recipe": RECIPES[kind], "output_dir": str(run_dir),
            "model": {"name": job["model"]}, "adapter": job["adapter"],
            "data": {"train": str(train), "validation": str(validation) if validation else None},
            "train": {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
                      "lr": DEFAULT_LR * hyper["learning_rate_multiplier"], "seed": job["seed"],
                      "save_every": every, "eval_every": every, "keep_last": KEEP_CHECKPOINTS,
                      "progress": False},
        }
        if kind == "dpo":
            config["preference"] = {"beta": hyper["beta"]}
        draft = folder / ".job.draft.yaml"
        draft.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            loaded = load_config(draft, self.settings.overrides)
        finally:
            draft.unlink(missing_ok=True)
        path = folder / "job.yaml"
        dump_config(loaded, path)
        return path, per_epoch * hyper["n_epochs"]

    # ------------------------------------------------------------------------- endings

    def _succeed(self, job: dict, run_dir: Path) -> None:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        name = fine_tuned_name(job)
        done = self.store.set_status(job["id"], "succeeded", only_from=("running",),
                                     held_by=self.name, worker=None, fine_tuned_model=name,
                                     trained_tokens=summary.get("trained_tokens"),
                                     finished_at=int(time.time()))
        if done is not None:
            self.store.add_event(job["id"], f"New fine-tuned model created: {name}")
            self.store.add_event(job["id"], "The job has successfully completed")
        else:
            self.store.release(job["id"], self.name)

    def _fail(self, job: dict, code: str, message: str, param: str | None,
              status: str) -> None:
        error = {"code": code, "message": message, "param": param}
        done = self.store.set_status(job["id"], "failed", only_from=(status,), held_by=self.name,
                                     worker=None, error=error, finished_at=int(time.time()))
        if done is not None:
            self.store.add_event(job["id"], f"Job failed: {message}", level="error")
        else:
            self.store.release(job["id"], self.name)


class _MetricsTail:
    """Turns the run folder's new metrics.jsonl records into events and its new checkpoints
    into checkpoint rows (each once: the database skips what a resumed run logs again)."""

    def __init__(self, store: JobStore, job: dict, run_dir: Path, total: int) -> None:
        self.store, self.job, self.run_dir, self.total = store, job, run_dir, total
        self.seen: set[str] = set()
        self.by_step: dict[int, dict] = {}

    def publish(self) -> None:
        for record in _records(self.run_dir / "metrics.jsonl"):
            step = record.get("step")
            if not isinstance(step, int):
                continue
            merged = self.by_step.setdefault(step, {})
            merged.update(record)
            if "loss" in record:
                self._event(f"step-{step}", f"Step {step}/{self.total}: training loss="
                            f"{record['loss']:.4f}", {"step": step, "train_loss": record["loss"],
                                                       "total_steps": self.total,
                                                       **_numbers(record, "loss")})
            vals = {k: v for k, v in record.items() if k.startswith("val_")}
            if vals:
                loss = vals.get("val_loss")
                text = f"validation loss={loss:.4f}" if isinstance(loss, float) else \
                    ", ".join(f"{k}={v:.4f}" for k, v in vals.items() if isinstance(v, float))
                self._event(f"val-{step}", f"Step {step}/{self.total}: {text}",
                            {"step": step, "valid_loss": loss, "total_steps": self.total,
                             **_numbers(vals, "")})
        for folder in list_checkpoints(self.run_dir / "checkpoints"):
            step = _step(folder)
            key = f"ckpt-{step}"
            if key in self.seen:
                continue
            record = self.by_step.get(step, {})
            metrics = {"step": step, "train_loss": record.get("loss"),
                       "valid_loss": record.get("val_loss"),
                       "full_valid_loss": record.get("val_loss"),
                       **{k: v for k, v in record.items() if k.startswith("val_")}}
            name = f"{fine_tuned_name(self.job)}:ckpt-step-{step}"
            if self.store.add_checkpoint(self.job["id"], step, metrics, name):
                self.store.add_event(self.job["id"], f"Checkpoint created at step {step}",
                                     data={"step": step}, dedup=key)
            self.seen.add(key)

    def _event(self, key: str, message: str, data: dict) -> None:
        if key not in self.seen:
            self.store.add_event(self.job["id"], message, kind="metrics", data=data, dedup=key)
            self.seen.add(key)


def _records(path: Path) -> list[dict]:
    """metrics.jsonl's complete records (the last line may be half written)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _numbers(record: dict, prefix_to_drop: str) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", prefix_to_drop)}


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(STEP_PREFIX))


def _copy_in(blob: Path, folder: Path, filename: str) -> Path:
    """Copy an uploaded blob into the job's folder under its uploaded name (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    tmp = folder / f".{filename}.tmp"
    shutil.copyfile(blob, tmp)
    os.replace(tmp, target)
    return target


def _only_file(folder: Path) -> Path:
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(files) != 1:
        raise TuneforgeError(f"{folder}: expected the job's one data file, found {len(files)}")
    return files[0]


def _failure(log: Path, returncode: int) -> str:
    """The training's own error message (its ``error:`` line), else the end of its log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if errors:
        start = max(i for i, ln in enumerate(lines) if ln.startswith("error: "))
        return "\n".join([errors[-1], *lines[start + 1:start + 30]])
    return f"training exited with status {returncode}: " + "\n".join(lines[-15:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL; checkpoints on disk are complete either way (atomic)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child: be killed when the worker dies, so that no orphan keeps training a job
    that another worker resumes (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
