"""The parts every recipe shares: the run folder, data splits, model set-up, saving, summary.

A recipe (sft.py, dpo.py, ...) reads top to bottom: check the run folder, read and tokenize its
data, :func:`setup_model`, build its objective, call the shared loop, :func:`finish_run`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tuneforge.config import PEFT_METHODS, RunConfig, dump_config
from tuneforge.data.example import Example
from tuneforge.data.render import render_sft
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.models.adapters import prepare_model, trainable_summary
from tuneforge.models.loading import load_model
from tuneforge.train.checkpoint import atomic_write_text, latest_checkpoint
from tuneforge.train.loop import TrainResult, make_accelerator
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


def load_splits(config: RunConfig, kinds: tuple[str, ...] = ("sft",), recipe: str = "sft") -> tuple[list[Example], list[Example]]:
    """Check the data files (structure, duplicates, leakage) and read train and validation.

    ``kinds`` are the example kinds the recipe trains on; other records are refused by file:line.
    """
    from tuneforge.data.formats import format_problems, load_examples
    from tuneforge.data.validate import check_data

    d = config.data
    others = {"validation": [Path(d.validation)] if d.validation else [],
              "test": [Path(d.test)] if d.test else []}
    report = check_data(Path(d.train), fmt=d.format, **others)
    if not report.ok:
        raise DataError(format_problems(report.errors, f"data check found {len(report.errors)} "
                                        "error(s) (run `tuneforge data check` for the full report):"))
    if report.warnings:
        print("\n".join(f"warning: {w}" for w in report.warnings[:20]), file=sys.stderr)
    train_examples = _only(load_examples(Path(d.train), d.format), kinds, recipe)
    if d.validation:
        return train_examples, _only(load_examples(Path(d.validation), d.format), kinds, recipe)
    if d.validation_fraction:
        shuffled = train_examples[:]
        random.Random(config.train.seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * d.validation_fraction))
        return shuffled[n_val:], shuffled[:n_val]
    return train_examples, []


def _only(examples: list[Example], kinds: tuple[str, ...], recipe: str) -> list[Example]:
    wrong = [e for e in examples if e.kind not in kinds]
    if wrong:
        wanted = {"sft": "prompt/completion, chat, alpaca or classification",
                  "preference": "preference pair (prompt/chosen/rejected)",
                  "ranking": "ranking", "rating": "rating", "unpaired": "unpaired (thumbs up/down)"}
        raise DataError(f"{wrong[0].where}: {wrong[0].format} data cannot train the {recipe} recipe; "
                        f"use {' or '.join(wanted.get(k, k) for k in kinds)} records")
    return examples


def tokenize_all(examples: list[Example], tokenizer, config: RunConfig, split: str,
                 render: Callable | None = None) -> list:
    """Render every example; apply ``data.too_long`` to those over ``data.max_length``.

    ``render(example, tokenizer, max_length)`` returns an item whose ``len()`` is its longest
    sequence and ``num_targets`` its trained tokens (default: a supervised example).
    """
    d = config.data
    if render is None:
        def render(ex, tok, max_length=None):
            return render_sft(ex, tok, max_length, train_on_prompt=d.train_on_prompt)
    rendered, too_long = [], []
    for ex in examples:
        tok = render(ex, tokenizer)
        if len(tok) > d.max_length:
            too_long.append((ex, len(tok)))
            if d.too_long == "truncate":
                tok = render(ex, tokenizer, d.max_length)
            elif d.too_long == "drop":
                continue
        if tok.num_targets == 0:
            raise DataError(f"{ex.where}: no trained tokens left (truncated away or all weights 0)")
        rendered.append(tok)
    if too_long and d.too_long == "error":
        lines = [f"  {ex.where}: {n} tokens > data.max_length={d.max_length}" for ex, n in too_long[:20]]
        more = [f"  ... and {len(too_long) - 20} more"] if len(too_long) > 20 else []
        raise DataError(f"{len(too_long)} {split} example(s) too long after templating:\n"
                        + "\n".join(lines + more)
                        + "\nraise data.max_length, or set data.too_long=truncate or drop")
    if too_long:
        print(f"tuneforge: {len(too_long)} {split} example(s) over {d.max_length} tokens were "
              f"{'truncated' if d.too_long == 'truncate' else 'dropped'}", file=sys.stderr)
    if split == "train" and not rendered:
        raise DataError(f"{d.train}: no training examples left")
    return rendered


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


def say(message: str) -> None:
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)


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


def save_result(model, tokenizer, config: RunConfig, run_dir: Path,
                save_extra: Callable[[Path], dict] | None = None) -> Path:
    """Save the adapter (PEFT) or the whole model, with the tokenizer, for generate/eval/export.

    ``save_extra(folder)`` may write more files next to the weights (a reward head) and returns
    entries for the folder's tuneforge.json.
    """
    out = run_dir / ("adapter" if config.adapter.method in PEFT_METHODS else "model")
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
