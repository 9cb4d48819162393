"""The life of a training run, whatever its step: resume, metrics log, checkpoints, progress,
validation bookkeeping, early stopping and the result.

Every trainer drives one :class:`RunLifecycle` (the shared loop in train/loop.py, whose step is
one global batch, and PPO's, whose step is one rollout and its updates); a jobs worker drives
the same object through them. The step itself (forward, backward, optimizer) is the trainer's;
everything a run folder shows about it is here::

    life = RunLifecycle(run_dir, cfg, acc, steps, module, optimizer, scheduler, resume=resume)
    for step in life.steps_to_run():          # ends early after a stopping step
        ...                                   # the trainer's step
        life.step_done(step, record, loss)    # metrics.jsonl, progress bar, throughput
        improved = life.eval_due(step) and life.validated(step, val)
        life.checkpoint(step, improved)       # atomic, pruned, keeping the best
    result = life.finish()                    # the best checkpoint's weights, TrainResult

What it guarantees:

- **Resume is exact.** A checkpoint holds the trainable weights, the optimizer, the scheduler,
  every process's RNG and this object's state (step, token counts, time, best metric,
  patience). Resuming loads the latest complete checkpoint, drops the killed run's
  metrics.jsonl records past it, and carries on as if never stopped. A fresh run starts a
  fresh metrics.jsonl.
- **Checkpoints** are written every ``train.save_every`` steps, at each new best validation
  figure, at the last step and on early stopping; all but the newest ``train.keep_last`` and
  the best are pruned.
- **The best step** (``select_best``): the validation figure ``train.metric_for_best`` decides
  the best checkpoint, early stopping after ``train.early_stopping_patience`` evaluations
  without an improvement of ``train.early_stopping_min_delta``, and an ``on_eval`` hook (a
  sweep's pruner) may stop the run too; at the end the best checkpoint's weights are loaded
  back, so the run's result is its best step. Without it (PPO) the result is the last step.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.config import TrainConfig, lower_is_better
from tuneforge.errors import ConfigError
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.progress import Progress

METRICS_FILE = "metrics.jsonl"

EvalHook = Callable[[int, dict[str, float]], bool | None]
"""``on_eval(step, val_metrics)``, called after each validation; returning True stops training
there, as early stopping does (the best checkpoint is restored, the run folder completed)."""

_EVAL_HOOK: ContextVar[EvalHook | None] = ContextVar("tuneforge_eval_hook", default=None)


@contextmanager
def eval_hook(fn: EvalHook) -> Iterator[None]:
    """Make ``fn`` the ``on_eval`` of every run trained inside this block.

    This is how a sweep sees each trial's validation results (to prune it) through any recipe,
    without the recipes knowing about sweeps.
    """
    token = _EVAL_HOOK.set(fn)
    try:
        yield
    finally:
        _EVAL_HOOK.reset(token)


def current_eval_hook() -> EvalHook | None:
    """The hook set by the innermost :func:`eval_hook` block, if any."""
    return _EVAL_HOOK.get()


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    best_metric: float | None
    """The value of ``train.metric_for_best`` at ``best_step``."""
    best_step: int | None
    stopped_early: bool
    trained_tokens: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def best_val_loss(self) -> float | None:
        """Validation loss at the best step (whatever metric chose that step)."""
        return self.val_at_best("val_loss")

    def val_at_best(self, name: str) -> float | None:
        for record in self.history:
            if record.get("step") == self.best_step and name in record:
                return record[name]
        return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (empty when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (the killed run's tail)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class RunLifecycle:
    """One run's folder and bookkeeping, around any trainer's step (see the module docstring).

    ``module`` is what checkpoints hold the trainable weights of (the model, or the model with
    its value head), unwrapped from any DDP/FSDP wrapper; ``optimizer`` and ``scheduler`` are
    restored on resume. ``state`` names extra counters the trainer keeps in the checkpoint
    (PPO's ``optimizer_steps``). ``unit`` is what a step is, for messages.
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig, acc, steps: int, module: torch.nn.Module,
                 optimizer, scheduler, *, resume: bool = False, select_best: bool = True,
                 on_eval: EvalHook | None = None, state: dict | None = None,
                 unit: str = "step") -> None:
        self.run_dir, self.cfg, self.acc, self.steps = Path(run_dir), cfg, acc, steps
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.select_best = select_best
        self.on_eval = on_eval or current_eval_hook()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / METRICS_FILE
        self.main = acc.is_main_process
        self.state = {"best_metric": None, "best_step": None, "bad_evals": 0, "tokens": 0,
                      "trained_tokens": 0, "seconds": 0.0, **(state or {})}
        self.start_step = 0
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (latest := ckpt.latest_checkpoint(self.ckpt_root)) is not None:
            saved = ckpt.load_checkpoint(latest, model=module, optimizer=optimizer,
                                         rank=acc.process_index)
            scheduler.load_state_dict(saved["scheduler"])
            self.state.update({k: saved[k] for k in self.state if k in saved})
            self.start_step = saved["step"]
            if self.main:
                truncate_metrics(self.metrics_path, self.start_step)
                print(f"tuneforge: resumed from {latest} ({unit} {self.start_step}/{steps})",
                      file=sys.stderr, flush=True)
        elif self.main and self.metrics_path.exists():
            self.metrics_path.unlink()
        self.history = read_metrics(self.metrics_path) if self.main else []
        self.progress = Progress(steps, self.start_step, enabled=cfg.progress and self.main)
        self.stopped_early = False
        self.stop_note = ""
        self.last_loss: float | None = None
        self.last_step = self.start_step
        self._t_start = time.perf_counter() - self.state["seconds"]
        self._t_step = time.perf_counter()

    # ------------------------------------------------------------------------- per step

    def steps_to_run(self) -> Iterator[int]:
        """The steps left to train, from the one after the resumed checkpoint to the last;
        ends after a step that stopped the run early."""
        for step in range(self.start_step + 1, self.steps + 1):
            self._t_step = time.perf_counter()
            yield step
            if self.stopped_early:
                break

    def step_seconds(self) -> float:
        """Seconds since this step started."""
        return time.perf_counter() - self._t_step

    def elapsed(self) -> float:
        """Training seconds of the whole run so far, resumed parts included."""
        return time.perf_counter() - self._t_start

    def step_done(self, step: int, record: dict, loss: float, *, tokens: int = 0,
                  trained_tokens: int = 0) -> None:
        """Count the step's tokens and time, log ``record`` (every ``train.log_every`` steps and
        at the last) and move the progress bar; ``record["tokens_per_s"]`` feeds the bar."""
        self.state["tokens"] += tokens
        self.state["trained_tokens"] += trained_tokens
        self.state["seconds"] = self.elapsed()
        self.last_loss, self.last_step = loss, step
        if step % self.cfg.log_every == 0 or step == self.steps:
            self.log(record)
        self.progress.update(step, loss, record.get("tokens_per_s", 0.0))

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (main process) and the in-memory history."""
        if self.main:
            self.history.append(record)
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def eval_due(self, step: int) -> bool:
        """Every ``train.eval_every`` steps and at the last one."""
        return bool((self.cfg.eval_every and step % self.cfg.eval_every == 0) or step == self.steps)

    def validated(self, step: int, val: dict[str, float]) -> bool:
        """Log a validation's figures, update the best step and patience; True if it improved.

        With ``select_best``, ``train.metric_for_best`` must be among ``val``; early stopping
        and the ``on_eval`` hook may end the run here (see :attr:`stopped_early`).
        """
        cfg = self.cfg
        improved = False
        if self.select_best:
            if cfg.metric_for_best not in val:
                raise ConfigError(f"train.metric_for_best={cfg.metric_for_best!r} is not among "
                                  f"the validation metrics: {', '.join(sorted(val))}")
            value, best = val[cfg.metric_for_best], self.state["best_metric"]
            delta = cfg.early_stopping_min_delta
            minimise = lower_is_better(cfg.metric_for_best)
            improved = best is None or (value < best - delta if minimise else value > best + delta)
            if improved:
                self.state.update(best_metric=value, best_step=step, bad_evals=0)
            else:
                self.state["bad_evals"] += 1
        self.log({"step": step, **val})
        self.progress.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                           + (" (best)" if improved else ""))
        if self.select_best:
            patience = cfg.early_stopping_patience
            self.stopped_early = bool(patience and self.state["bad_evals"] >= patience
                                      and step < self.steps)
            self.stop_note = (f"no improvement of {cfg.metric_for_best} in {patience} evaluations"
                              if self.stopped_early else "")
            if self.on_eval is not None and self.on_eval(step, val) and step < self.steps:
                self.stopped_early = True
                self.stop_note = "stopped by the on_eval hook (e.g. a sweep's pruner)"
        return improved

    def checkpoint(self, step: int, improved: bool = False) -> None:
        """Save a checkpoint when one is due (periodic, a new best, the last step, a stop)."""
        periodic = self.cfg.save_every and step % self.cfg.save_every == 0
        if not (periodic or improved or step == self.steps or self.stopped_early):
            return
        acc = self.acc
        ckpt.save_checkpoint(self.ckpt_root, step, model=self.module, optimizer=self.optimizer,
                             state={**self.state, "scheduler": self.scheduler.state_dict()},
                             rank=acc.process_index, barrier=acc.wait_for_everyone)
        if self.main:
            best = self.state["best_step"]
            keep = {f"{ckpt.STEP_PREFIX}{best:06d}"} if best else set()
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last, keep)
        if self.stopped_early:
            self.progress.note(f"early stopping at step {step}: {self.stop_note}")

    # ------------------------------------------------------------------------- the end

    def finish(self, *, restore_best: bool = True) -> TrainResult:
        """Close the progress bar, load the best checkpoint's weights back (``select_best``,
        when a validation chose one) and return the run's :class:`TrainResult`."""
        self.progress.close()
        best = self.state["best_step"]
        if self.select_best and restore_best and best is not None:
            # the run's result is its best checkpoint, not its last step
            ckpt.load_trainable(self.ckpt_root / f"{ckpt.STEP_PREFIX}{best:06d}", self.module)
        self.acc.wait_for_everyone()
        return TrainResult(steps=self.last_step, final_loss=self.last_loss,
                           best_metric=self.state["best_metric"], best_step=best,
                           stopped_early=self.stopped_early,
                           trained_tokens=self.state["trained_tokens"],
                           tokens=self.state["tokens"], seconds=self.state["seconds"],
                           history=self.history)
