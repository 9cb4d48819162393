"""A run folder from its first line to its last: refuse to clobber, set up the model, save.

A recipe (tuneforge/recipes/) reads top to bottom: :func:`check_run_dir`, read and tokenize its
data, :func:`setup_model`, build its objective, train through the run lifecycle
(tuneforge/train/lifecycle.py), :func:`finish_run`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tuneforge.config import RunConfig, dump_config
from tuneforge.errors import TuneforgeError
from tuneforge.models.adapters import has_adapter, prepare_model, trainable_summary
from tuneforge.models.loading import load_model
from tuneforge.train.checkpoint import atomic_write_text, latest_checkpoint
from tuneforge.train.lifecycle import TrainResult
from tuneforge.train.loop import make_accelerator, train
from tuneforge.train.plots import plot_loss


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run's results unless told to (changes nothing on disk)."""
    if resume:
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise TuneforgeError(f"--resume: {run_dir} has no checkpoint to resume from")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise TuneforgeError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or set output_dir to a new folder"
        )


def setup_model(config: RunConfig, run_dir: Path, *, resume: bool):
    """Load the base model, attach the adapter (or freeze), make the run folder and accelerator.

    Returns ``(model, tokenizer, accelerator, parameter counts)``.
    """
    model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, seed=config.train.seed)
    model.config.use_cache = False
    model = prepare_model(model, config.adapter, model_dropout=config.model.dropout,
                          seed=config.train.seed)
    params = trainable_summary(model)
    acc = make_accelerator(config.train, model)
    if acc.is_main_process and not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # empty, or --overwrite was given
        run_dir.mkdir(parents=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        dump_config(config, run_dir / "config.yaml")
    return model, tokenizer, acc, params


def finish_run(model, tokenizer, config: RunConfig, run_dir: Path, result: TrainResult, acc,
               params: dict, n_train: int, n_val: int, save_extra: Callable | None = None,
               **extra) -> dict:
    """Save the trained weights, the loss plot and summary.json (main process); return the summary.

    ``save_extra`` is passed on to :func:`save_result`; ``extra`` goes into the summary.
    """
    summary = {}
    if acc.is_main_process:
        save_result(model, tokenizer, config, run_dir, save_extra)
        plot_loss(result.history, run_dir / "loss.png",
                  title=f"{config.model.name} {config.recipe} {config.adapter.method}")
        summary = make_summary(config, result, params, n_train, n_val) | extra
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    return summary


def train_responses(model, tokenizer, config: RunConfig, run_dir: Path, acc, params: dict,
                    train_set: list, val_set: list, objective, *, resume: bool,
                    best: tuple[str, ...] = (), **extra) -> dict:
    """The end of every recipe that compares responses against a reference (dpo, kto, rank):
    a ``precompute`` reference scores every example first (before any update, and before
    resuming loads trained weights), then the shared loop trains and :func:`finish_run` saves.

    The summary gets ``extra``, the reference mode, and ``best_<key>`` for each key of ``best``
    (its value at the best checkpoint).
    """
    reference = getattr(objective, "reference", None)
    if reference is not None and reference.mode == "precompute":
        reference.precompute(train_set + val_set, acc, config.train.bf16, config.train.batch_size)
    result = train(model, train_set, val_set, config.train, run_dir, resume=resume, accelerator=acc,
                   objective=objective)
    extra["reference"] = reference.mode if reference is not None else "none"
    extra |= {f"best_{key}": result.val_at_best(key) for key in best}
    return finish_run(model, tokenizer, config, run_dir, result, acc, params,
                      len(train_set), len(val_set), **extra)


def save_result(model, tokenizer, config: RunConfig, run_dir: Path,
                save_extra: Callable[[Path], dict] | None = None) -> Path:
    """Save the adapter (PEFT) or the whole model, with the tokenizer, for generate/eval/export.

    ``save_extra(folder)`` may write more files next to the weights (a reward head) and returns
    entries for the folder's tuneforge.json.
    """
    out = run_dir / ("adapter" if has_adapter(model) else "model")
    tmp = run_dir / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"base_model": config.model.name, "method": config.adapter.method,
            "recipe": config.recipe}
    if save_extra is not None:
        meta.update(save_extra(tmp))
    (tmp / "tuneforge.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_summary(config: RunConfig, result: TrainResult, params: dict, n_train: int, n_val: int) -> dict:
    return {
        "run_dir": str(config.output_dir),
        "model": config.model.name,
        "recipe": config.recipe,
        "method": config.adapter.method,
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "train_examples": n_train,
        "validation_examples": n_val,
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "best_val_loss": result.best_val_loss,
        "metric_for_best": config.train.metric_for_best,
        "best_metric": result.best_metric,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
    }
