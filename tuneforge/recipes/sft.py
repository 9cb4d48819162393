"""Supervised fine-tuning, top to bottom.

config -> check data -> tokenize (chat template, completion-only labels) -> load model ->
adapter / freeze -> shared training loop -> save adapter or model, loss curve, summary.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.models.loading import load_tokenizer
from tuneforge.recipes.common import (
    check_run_dir,
    finish_run,
    load_splits,
    say,
    setup_model,
    tokenize_all,
)
from tuneforge.train.loop import train


def run_sft(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one SFT job described by ``config``; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # before any slow work
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config)
    train_set = tokenize_all(train_examples, tokenizer, config, "train")
    val_set = tokenize_all(val_examples, tokenizer, config, "validation")

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    if acc.is_main_process:
        n_tok = sum(len(t) for t in train_set)
        say(f"{len(train_set)} train / {len(val_set)} validation examples, {n_tok} tokens per "
            f"epoch; training {params['trainable']:,} of {params['total']:,} parameters "
            f"({config.adapter.method}) on {acc.device} x{acc.num_processes}")

    result = train(model, train_set, val_set, config.train, run_dir, resume=resume, accelerator=acc)
    return finish_run(model, tokenizer, config, run_dir, result, acc, params,
                      len(train_set), len(val_set))
