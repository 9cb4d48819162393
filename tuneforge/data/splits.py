"""Training data of a run: checked files -> train and validation examples -> tokenized items.

Every offline recipe reads its data through :func:`load_splits` (the same checks as
``tuneforge data check``: structure, duplicates, leakage) and :func:`tokenize_all` (the chat
template, ``data.max_length`` and ``data.too_long``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.data.example import Example
from tuneforge.data.render import render_sft
from tuneforge.errors import DataError


def load_splits(config: RunConfig, kinds: tuple[str, ...] = ("sft",), recipe: str = "sft") -> tuple[list[Example], list[Example]]:
    """Check the data files (structure, duplicates, leakage, records without training signal)
    and read train and validation.

    ``kinds`` are the example kinds the recipe trains on; other records are refused by file:line.
    """
    from tuneforge.data.formats import format_problems, load_examples
    from tuneforge.data.validate import check_data

    d = config.data
    others = {"validation": [Path(d.validation)] if d.validation else [],
              "test": [Path(d.test)] if d.test else []}
    report = check_data(Path(d.train), fmt=d.format, rating_scale=d.rating_scale, labels=d.labels,
                        **others)
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
