"""Supervised fine-tuning, top to bottom.

config -> check data -> tokenize (chat template, completion-only labels) -> load model ->
adapter / freeze -> shared training loop -> save adapter or model, loss curve, summary.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.loop import train
from tuneforge.train.progress import say
from tuneforge.train.run_folder import check_run_dir, finish_run, setup_model
from tuneforge.train.tasks import load_training_tasks, tokenize_tasks, training_metrics_fn


def run_sft(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one SFT job described by ``config``; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # before any slow work
    tokenizer = load_tokenizer(config.model.name)
    tasks = load_training_tasks(config, tokenizer)  # one, or data.tasks mixed by weight
    train_set, val_set, task_counts = tokenize_tasks(tasks, tokenizer, config)
    metrics_fn = training_metrics_fn(tasks, tokenizer, config)  # label metrics at validation

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    if acc.is_main_process:
        n_tok = sum(len(t) for t in train_set)
        say(f"{len(train_set)} train / {len(val_set)} validation examples, {n_tok} tokens per "
            f"epoch; training {params['trainable']:,} of {params['total']:,} parameters "
            f"({config.adapter.method}) on {acc.device} x{acc.num_processes}")

    result = train(model, train_set, val_set, config.train, run_dir, resume=resume, accelerator=acc,
                   metrics_fn=metrics_fn)
    extra = {"tasks": task_counts} if task_counts else {}
    return finish_run(model, tokenizer, config, run_dir, result, acc, params,
                      len(train_set), len(val_set), **extra)
