"""The life of a training run: resume, metrics log, checkpoints, progress, validation, early stop.

Placeholder being filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

EvalHook = Callable[[int, dict[str, float]], bool | None]
"""``on_eval(step, val_metrics)``, called after each validation; returning True stops training
there, as early stopping does (the best checkpoint is restored, the run folder completed)."""

_EVAL_HOOK: ContextVar[EvalHook | None] = ContextVar("tuneforge_eval_hook", default=None)


@contextmanager
def eval_hook(fn: EvalHook) -> Iterator[None]:
    """Make ``fn`` the ``on_eval`` of every :func:`train` called inside this block.

    This is how a sweep sees each trial's validation results (to prune it) through any recipe,
    without the recipes knowing about sweeps.
    """
    token = _EVAL_HOOK.set(fn)
    try:
        yield
    finally:
        _EVAL_HOOK.reset(token)


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




def current_eval_hook() -> EvalHook | None:
    """The hook set by the innermost :func:`eval_hook` block, if any."""
    return _EVAL_HOOK.get()
