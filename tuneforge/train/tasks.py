"""Tasks in training: one or several data sets, each with its template, mixed into one train set.

A run config describes either one task (``data.train`` and friends) or several
(``data.tasks``). Each task's files go through the same checks as any training data
(:func:`~tuneforge.data.splits.load_splits`), its template is applied and checked to render
the same prompt in training and at inference, its examples are tokenized on their own, and the
training sets are mixed by weight or temperature (:mod:`tuneforge.data.mixing`). Validation sets
are concatenated (validation loss over all tasks), and classification tasks also get
label-scored metrics at every evaluation (:func:`validation_metrics_fn`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tuneforge.config import RunConfig, TaskConfig, task_configs
from tuneforge.data.example import Example
from tuneforge.data.mixing import mix, task_probabilities
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.data.templates import apply_template, check_template_roundtrip
from tuneforge.errors import ConfigError


@dataclass
class TrainingTask:
    """One task's templated training and validation examples, and its single-task config."""

    config: TaskConfig
    run_config: RunConfig
    train: list[Example]
    validation: list[Example]


def load_training_tasks(config: RunConfig, tokenizer) -> list[TrainingTask]:
    """Check, read and template every task's data (before the model is loaded)."""
    tasks = []
    for task in task_configs(config):
        data = replace(config.data, train=task.train, validation=task.validation, test=task.test,
                       format=task.format, labels=task.labels, tasks=[])
        single = replace(config, data=data)
        train, validation = load_splits(single)
        train = [apply_template(ex, task.template) for ex in train]
        validation = [apply_template(ex, task.template) for ex in validation]
        for ex in train[:3]:  # the same prompt in training and at inference
            check_template_roundtrip(ex, tokenizer)
        tasks.append(TrainingTask(task, single, train, validation))
    return tasks


def tokenize_tasks(tasks: Sequence[TrainingTask], tokenizer, config: RunConfig,
                   ) -> tuple[list, list, dict]:
    """(mixed training set, all validation examples, per-task counts for the summary)."""
    train_sets = [tokenize_all(t.train, tokenizer, t.run_config, "train") for t in tasks]
    val_set = [x for t in tasks for x in tokenize_all(t.validation, tokenizer, t.run_config,
                                                      "validation")]
    if len(tasks) == 1:
        return train_sets[0], val_set, {}
    sizes = [len(s) for s in train_sets]
    shares = task_probabilities(sizes, [t.config.weight for t in tasks],
                                mixing=config.data.mixing, temperature=config.data.temperature)
    slots = mix(sizes, shares, seed=config.train.seed)
    mixed = [train_sets[task][i] for task, i in slots]
    counts = {t.config.name: {"train_examples": n, "validation_examples": len(t.validation),
                              "share": round(p, 4),
                              "mixed_examples": sum(task == i for task, _ in slots)}
              for i, (t, n, p) in enumerate(zip(tasks, sizes, shares))}
    return mixed, val_set, counts


def training_metrics_fn(tasks: Sequence[TrainingTask], tokenizer,
                        config: RunConfig) -> Callable | None:
    """The loop's metrics_fn for the classification tasks (None when there are none or
    eval.val_metrics is off)."""
    from tuneforge.eval.evaluate import EvalTask, validation_metrics_fn
    from tuneforge.eval.tasks import resolve_task

    limit = config.eval.val_metrics_examples
    scored = []
    for t in tasks:
        if t.validation and config.eval.val_metrics:
            spec = resolve_task(t.config, t.validation, t.train, tokenizer)
            scored.append(EvalTask(t.config, t.validation[:limit], t.train, spec=spec))
    metrics_fn = validation_metrics_fn(scored, tokenizer)
    known = ["val_loss", "val_ppl"] + [f"val_{n}" for n in getattr(metrics_fn, "names", [])]
    if config.train.metric_for_best not in known:  # say so now, not at the first evaluation
        raise ConfigError(f"train.metric_for_best={config.train.metric_for_best!r} is not logged "
                          f"by this run; it logs {', '.join(known)} (task metrics need a "
                          "classification task with validation data and eval.val_metrics)")
    return metrics_fn
