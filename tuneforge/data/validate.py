"""The checks and statistics behind ``tuneforge data check``.

Everything is reported at once so a user can fix a data set in one pass: format problems from
:mod:`tuneforge.data.formats` (pairs and rankings whose responses repeat among them), duplicates
within a file (a warning: sometimes intended), the same example in train and in validation/test
(an error: the evaluation would measure recall, not generalisation) and near-duplicates across
them (a warning), records that carry no training signal (ratings off the declared scale,
classification sets with one class, evaluation labels never seen in training, rare classes),
and, given a tokenizer, examples too long for the model once templated.
The statistics (examples, token lengths, tokens per epoch, a rough time estimate) answer "how
big is this job" before a GPU is rented for it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuneforge.data.example import Example
from tuneforge.data.formats import (
    DataFileError,
    Problem,
    format_problems,
    is_parquet,
    location,
    parse_examples,
)
from tuneforge.data.near_duplicates import DEFAULT_THRESHOLD, near_matches
from tuneforge.data.render import IGNORE_INDEX
from tuneforge.errors import DataError

# Tokenizers without a known limit report a huge sentinel (1e30); below this it is real.
_REAL_LIMIT = 1_000_000
# Fraction of the measured matmul peak a training step reaches (attention, optimizer, data).
UTILISATION = 0.35
ESTIMATE_ASSUMES = (
    "an estimate: 6·params·tokens FLOPs per epoch for full fine-tuning, 4·params·tokens for "
    f"LoRA, at {UTILISATION:.0%} of the matmul throughput measured on this machine; "
    "ignores padding, evaluation, checkpointing and, for preference data, the reference model"
)


@dataclass
class CheckReport:
    """The outcome of :func:`check_data`: every problem, and statistics (JSON-serialisable)."""

    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def to_json(self, indent: int | None = 2) -> str:
        payload = {
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "stats": self.stats,
        }
        return json.dumps(payload, indent=indent)

    def render(self, limit: int = 50) -> str:
        """A human report: problems first (errors, then warnings), then the statistics."""
        parts = []
        for title, problems in (("Errors", self.errors), ("Warnings", self.warnings)):
            if problems:
                parts.append(format_problems(problems, f"{title} ({len(problems)}):", limit))
        parts.append(_render_stats(self.stats))
        errors, warnings = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        parts.append(f"{verdict}: {_plural(errors, 'error')}, {_plural(warnings, 'warning')}")
        return "\n\n".join(part for part in parts if part)


def check_data(
    train: str | Path,
    *,
    validation: Sequence[str | Path] = (),
    test: Sequence[str | Path] = (),
    fmt: str | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    context_limit: int | None = None,
    n_params: int | None = None,
    flops_per_second: float | None = None,
    rating_scale: Sequence[float] | None = None,
    labels: Sequence[str] | str | Path | None = None,
    min_class_count: int = 2,
    near_dup_threshold: float = DEFAULT_THRESHOLD,
) -> CheckReport:
    """Check a training file (and optional validation/test files); never raises for bad data.

    ``max_length`` is the length examples must fit; without it the tokenizer's
    ``model_max_length`` or ``context_limit`` (the model's, e.g. ``max_position_embeddings``)
    is used when known. ``n_params`` enables the training-time estimate; ``flops_per_second``
    replaces the matmul probe (measured once per process otherwise). ``rating_scale``
    (``[low, high]``) range-checks ratings; ``labels`` (a list, or a file holding them) are the
    allowed classification labels; a training class with fewer than ``min_class_count``
    examples is a warning; an evaluation example at least ``near_dup_threshold`` similar (word
    3-gram Jaccard) to a training example is a warning. Raises DataError only for an unknown
    ``fmt`` name, a missing labels file or an out-of-range setting.
    """
    scale = _rating_scale(rating_scale)
    declared = _declared_labels(labels)
    if min_class_count < 1:
        raise DataError(f"min_class_count: must be >= 1 (got {min_class_count})")
    if not 0 < near_dup_threshold <= 1:
        raise DataError(f"near-duplicate threshold: must be in (0, 1] (got {near_dup_threshold})")
    files = [("train", Path(train))]
    files += [("validation", Path(p)) for p in validation] + [("test", Path(p)) for p in test]
    report = CheckReport()
    loaded: list[tuple[str, str, list[Example]]] = []
    file_stats = []
    for split, path in files:
        examples, problems = _parse(path, fmt)
        problems += _duplicates(examples) + _off_scale(examples, scale)
        report.problems += problems
        loaded.append((split, str(path), examples))
        file_stats.append(_file_stats(split, str(path), examples, problems))
    report.problems += exact_leakage(loaded)
    report.problems += _near_leakage(loaded, near_dup_threshold)
    report.problems += _classes(loaded, declared, min_class_count)
    report.stats["files"] = file_stats
    if tokenizer is not None:
        limit, origin = _length_limit(tokenizer, max_length, context_limit)
        token_stats, problems = _token_stats(loaded, tokenizer, limit, origin)
        report.problems += problems
        report.stats["tokens"] = token_stats
        train_tokens = token_stats["train"]["tokens"] if "train" in token_stats else 0
        if n_params and train_tokens:
            report.stats["estimate"] = estimate_epoch_time(n_params, train_tokens, flops_per_second)
    order = {str(path): i for i, (_, path) in enumerate(files)}
    report.problems.sort(key=lambda p: (order.get(p.source, len(order)), p.line or 0))
    return report


def _rating_scale(scale: Sequence[float] | None) -> tuple[float, float] | None:
    if scale is None:
        return None
    values = list(scale)
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[0] >= values[1]:
        raise DataError(f"rating scale: expected LOW,HIGH with LOW < HIGH, e.g. 1,5 (got {values})")
    return values[0], values[1]


def _declared_labels(labels: Sequence[str] | str | Path | None) -> list[str] | None:
    """The labels as a list; a str or Path is a file of them (read as ``tuneforge eval`` does)."""
    if labels is None:
        return None
    from tuneforge.eval.tasks import read_labels

    return read_labels(str(labels) if isinstance(labels, (str, Path)) else list(labels))


def _parse(path: Path, fmt: str | None) -> tuple[list[Example], list[Problem]]:
    """parse_examples, with an unreadable file turned into a problem of that file."""
    try:
        return parse_examples(path, fmt)
    except DataFileError as err:
        return [], [Problem(err.path, None, "", err.reason)]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _unit(source: str) -> str:
    return "row" if is_parquet(source) else "line"


def _file_stats(
    split: str, path: str, examples: list[Example], problems: list[Problem]
) -> dict[str, Any]:
    formats = sorted({ex.format for ex in examples})
    stats = {
        "split": split,
        "path": path,
        "format": formats[0] if len(formats) == 1 else None,
        "examples": len(examples),
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
    }
    return stats | _feedback_stats(examples)


def _feedback_stats(examples: list[Example]) -> dict[str, Any]:
    """How ratings spread and how thumbs up/down balance: a skewed set trains a skewed model."""
    ratings = [ex.scores[0] for ex in examples if ex.kind == "rating" and ex.scores]
    labels = [ex.desirable for ex in examples if ex.kind == "unpaired"]
    stats: dict[str, Any] = {}
    if ratings:
        counts = Counter(ratings)
        stats["ratings"] = {f"{value:g}": counts[value] for value in sorted(counts)}
        stats["rating_mean"] = round(sum(ratings) / len(ratings), 2)
    if labels:
        stats["labels"] = {"desirable": labels.count(True), "undesirable": labels.count(False)}
    return stats


# --------------------------------------------------------------------------------------------
# Duplicates and leakage


def example_key(example: Example) -> str:
    """The whole example as text, lowercased with whitespace collapsed, for comparisons."""
    pieces: list[str] = [example.prompt or "", example.completion or ""]
    conversations = [example.messages or [], example.prompt_messages or []]
    conversations += example.responses or []
    for messages in conversations:
        pieces += [f"{m.role}: {m.content}" for m in messages]
    text = " \x00 ".join(pieces)  # NUL is not whitespace, so it survives the collapse
    return " ".join(text.lower().split())


def _duplicates(examples: Iterable[Example]) -> list[Problem]:
    first: dict[str, int] = {}
    problems = []
    for ex in examples:
        key = example_key(ex)
        if key in first:
            message = f"duplicate of {_unit(ex.source)} {first[key]}"
            problems.append(Problem(ex.source, ex.line, "record", message, "warning"))
        else:
            first[key] = ex.line
    return problems


def exact_leakage(loaded: list[tuple[str, str, list[Example]]]) -> list[Problem]:
    """An evaluation example also in train measures memory, not skill: an error."""
    train: dict[str, Example] = {}
    for split, _, examples in loaded:
        if split == "train":
            for ex in examples:
                train.setdefault(example_key(ex), ex)
    problems = []
    for split, _, examples in loaded:
        if split == "train":
            continue
        for ex in examples:
            match = train.get(example_key(ex))
            if match is not None:
                where = location(match.source, match.line)
                message = f"same example as {where} in the training data (train/{split} leakage)"
                problems.append(Problem(ex.source, ex.line, "record", message))
    return problems


def _near_leakage(loaded: list[tuple[str, str, list[Example]]], threshold: float) -> list[Problem]:
    """An evaluation example nearly the same as a training one (a changed name or number) is
    likely the same item: a warning naming the closest training example and their similarity.
    Exact copies are left to :func:`exact_leakage`, which makes them errors."""
    train = [ex for split, _, examples in loaded if split == "train" for ex in examples]
    train_keys = [example_key(ex) for ex in train]
    exact = set(train_keys)
    held_out = [
        (split, ex, key)
        for split, _, examples in loaded
        if split != "train"
        for ex in examples
        if (key := example_key(ex)) not in exact
    ]
    if not train or not held_out:
        return []
    best: dict[int, tuple[float, int]] = {}
    for i, j, score in near_matches([key for _, _, key in held_out], train_keys, threshold):
        if i not in best or score > best[i][0]:  # sorted by j: ties keep the earliest line
            best[i] = (score, j)
    problems = []
    for i, (score, j) in sorted(best.items()):
        split, ex, _ = held_out[i]
        where = location(train[j].source, train[j].line)
        message = (
            f"near-duplicate of {where} in the training data (Jaccard {score:.3f} >= "
            f"{threshold:g}): possible train/{split} leakage"
        )
        problems.append(Problem(ex.source, ex.line, "record", message, "warning"))
    return problems


# --------------------------------------------------------------------------------------------
# Records without training signal


def _off_scale(examples: Iterable[Example], scale: tuple[float, float] | None) -> list[Problem]:
    """Ratings outside the declared scale: a typo (40 for 4) or a file on another scale."""
    if scale is None:
        return []
    low, high = scale
    problems = []
    for ex in examples:
        if ex.kind == "rating" and ex.scores and not low <= ex.scores[0] <= high:
            message = f"{ex.scores[0]:g} is outside the declared rating scale {low:g} to {high:g}"
            problems.append(Problem(ex.source, ex.line, "rating", message))
    return problems


def _classes(
    loaded: list[tuple[str, str, list[Example]]], declared: list[str] | None, min_count: int
) -> list[Problem]:
    """Classification labels a model cannot learn: labels outside the declared list, a training
    set of one class (errors), classes with fewer than ``min_count`` training examples
    (warnings), and evaluation labels that never occur in training (errors)."""
    problems = []
    if declared is not None:
        allowed = ", ".join(declared)
        for ex in (ex for _, _, examples in loaded for ex in examples):
            if ex.label is not None and ex.label not in declared:
                message = f"{ex.label!r} is not one of the declared labels ({allowed})"
                problems.append(Problem(ex.source, ex.line, "label", message))
    train = [ex for split, _, exs in loaded if split == "train" for ex in exs if ex.label]
    if not train:
        return problems
    counts = Counter(ex.label for ex in train)
    if len(counts) == 1:
        message = f"every training example has the label {train[0].label!r}: nothing to tell apart"
        problems.append(Problem(train[0].source, None, "label", message))
    else:
        problems += _rare_classes(train, counts, declared, min_count)
    held_out = [ex for split, _, exs in loaded if split != "train" for ex in exs if ex.label]
    for ex in held_out:
        undeclared = declared is not None and ex.label not in declared  # reported above
        if ex.label not in counts and not undeclared:
            # a warning: the run still trains, and evaluation counts this class as missed; a
            # learning curve's small subsets lack rare classes by design
            message = f"{ex.label!r} never occurs in the training data: the model cannot learn it"
            problems.append(Problem(ex.source, ex.line, "label", message, "warning"))
    return problems


def _rare_classes(
    train: list[Example], counts: Counter, declared: list[str] | None, min_count: int
) -> list[Problem]:
    """A warning at the first example of each class rarer than ``min_count``, and one per
    declared label that training never shows."""
    first: dict[str, Example] = {}
    for ex in train:
        first.setdefault(ex.label, ex)
    problems = []
    for label, count in counts.items():
        if count < min_count:
            few = _plural(count, "training example")
            message = f"the class {label!r} has {few} (fewer than {min_count}): too few to learn"
            ex = first[label]
            problems.append(Problem(ex.source, ex.line, "label", message, "warning"))
    for label in [lab for lab in declared or [] if lab not in counts]:
        message = f"the declared label {label!r} has no training examples"
        problems.append(Problem(train[0].source, None, "label", message, "warning"))
    return problems


# --------------------------------------------------------------------------------------------
# Tokens


def _length_limit(
    tokenizer: Any, max_length: int | None, context_limit: int | None
) -> tuple[int | None, str]:
    """The length to enforce and where it comes from; (None, "") when there is none."""
    if max_length is not None:
        return max_length, "max_length"
    known = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _REAL_LIMIT:
        known.append((tokenizer_limit, "the tokenizer's model_max_length"))
    if context_limit is not None and 0 < context_limit < _REAL_LIMIT:
        known.append((context_limit, "the model's context length"))
    return min(known) if known else (None, "")


# What each response is called in a message, by format (rankings: responses[i]).
RESPONSE_NAMES = {
    "preference": ["chosen", "rejected"],
    "rating": ["response"],
    "unpaired": ["completion"],
}


def templated_sequences(example: Example) -> list[tuple[str, Example]]:
    """What training tokenises: the example, or the prompt with each response in turn (a
    prompt alone, for rollouts, is not tokenised as a training sequence)."""
    if example.kind == "prompt":
        return []
    if example.responses is None:
        return [("messages" if example.messages is not None else "completion", example)]
    names = RESPONSE_NAMES.get(example.format, [])
    out = []
    for i, response in enumerate(example.responses):
        name = names[i] if i < len(names) else f"responses[{i}]"
        messages = (example.prompt_messages or []) + response
        out.append((name, Example(example.source, example.line, "chat", messages=messages)))
    return out


def _token_stats(
    loaded: list[tuple[str, str, list[Example]]], tokenizer: Any, limit: int | None, origin: str
) -> tuple[dict[str, Any], list[Problem]]:
    from tuneforge.data.render import render_sft

    lengths: dict[str, list[tuple[int, int]]] = defaultdict(list)
    problems: list[Problem] = []
    for split, _, examples in loaded:
        failures: dict[str, list[Example]] = defaultdict(list)
        for ex in examples:
            for name, sequence in templated_sequences(ex):
                try:
                    tokens = render_sft(sequence, tokenizer)
                except DataError as err:
                    failures[str(err).removeprefix(f"{ex.where}: ")].append(ex)
                    continue
                total = len(tokens.input_ids)
                trained = sum(label != IGNORE_INDEX for label in tokens.labels)
                lengths[split].append((total, trained))
                if limit is not None and total > limit:
                    message = f"{total} tokens after the chat template; the limit is {limit}"
                    problems.append(Problem(ex.source, ex.line, name, f"{message} ({origin})"))
        problems += _render_failures(failures)
    stats = {split: _split_token_stats(pairs, limit) for split, pairs in lengths.items()}
    for split_stats in stats.values():
        split_stats["limit_from"] = origin or None
    return stats, problems


def _render_failures(failures: dict[str, list[Example]]) -> list[Problem]:
    """One problem per distinct failure: a missing chat template would otherwise fill pages."""
    problems = []
    for message, examples in failures.items():
        first = examples[0]
        more = f" (and {_plural(len(examples) - 1, 'more example')} like it)"
        text = message + (more if len(examples) > 1 else "")
        problems.append(Problem(first.source, first.line, "template", text))
    return problems


def _split_token_stats(pairs: list[tuple[int, int]], limit: int | None) -> dict[str, Any]:
    totals = [total for total, _ in pairs]
    trained = [count for _, count in pairs]
    return {
        "sequences": len(pairs),
        "total": distribution(totals),
        "trained": distribution(trained),
        "tokens": sum(totals),
        "trained_tokens": sum(trained),
        "limit": limit,
        "over_limit": sum(total > limit for total in totals) if limit is not None else 0,
    }


def distribution(values: Sequence[int]) -> dict[str, float] | None:
    """min, mean, p50, p90, p99, max (nearest-rank percentiles); None for no values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": ordered[-1],
    }


# --------------------------------------------------------------------------------------------
# Time estimate


@lru_cache(maxsize=1)
def measure_matmul_flops(seconds: float = 0.3) -> tuple[float, str, str]:
    """``(flop/s, dtype, device)``: the better of an fp32 and a bf16 matmul probe, measured once.

    A matmul probe, not a training step: it is quick, and training speed is mostly matmuls.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 4096 if device == "cuda" else 1024  # smaller sizes understate what training reaches
    best = (0.0, "float32", device)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        flops = _time_matmuls(torch, a, b, seconds / 2)
        if flops > best[0]:
            best = (flops, str(dtype).removeprefix("torch."), device)
    return best


def _time_matmuls(torch: Any, a: Any, b: Any, seconds: float) -> float:
    """flop/s of ``a @ b`` over about ``seconds`` (one slow call is enough where bf16 crawls)."""
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    flops_per_call = 2 * a.shape[0] ** 3
    start = time.perf_counter()
    a @ b  # warm-up: the first call pays for kernel selection and allocation
    sync()
    if (elapsed := time.perf_counter() - start) >= seconds:
        return flops_per_call / elapsed
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        sync()
        count += 1
    return flops_per_call * count / elapsed


def estimate_epoch_time(
    n_params: int, tokens: int, flops_per_second: float | None = None
) -> dict[str, Any]:
    """Seconds per epoch for full fine-tuning and LoRA; see ESTIMATE_ASSUMES for the caveats."""
    if flops_per_second is None:
        flops_per_second, dtype, device = measure_matmul_flops()
    else:
        dtype, device = "given", "given"
    effective = flops_per_second * UTILISATION
    return {
        "n_params": n_params,
        "tokens_per_epoch": tokens,
        "matmul_flops": flops_per_second,
        "probe_dtype": dtype,
        "device": device,
        "utilisation": UTILISATION,
        "full_finetune_seconds": round(6 * n_params * tokens / effective, 1),
        "lora_seconds": round(4 * n_params * tokens / effective, 1),
        "assumes": ESTIMATE_ASSUMES,
    }


# --------------------------------------------------------------------------------------------
# Rendering


def _render_stats(stats: dict[str, Any]) -> str:
    lines = ["Files:", f"  {'split':<11}{'examples':>9}  {'format':<18}file"]
    for f in stats.get("files", []):
        fmt = f["format"] or "-"
        lines.append(f"  {f['split']:<11}{f['examples']:>9}  {fmt:<18}{f['path']}")
    lines += _render_feedback(stats.get("files", []))
    tokens = stats.get("tokens")
    if tokens is None:
        lines += ["", "Tokens: not counted (no tokenizer; pass --model to count them)."]
    else:
        lines += ["", *_render_tokens(tokens)]
    if "estimate" in stats:
        lines += ["", *_render_estimate(stats["estimate"])]
    return "\n".join(lines)


def _render_feedback(files: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in files:
        if "ratings" in f:
            spread = ", ".join(f"{value}: {n}" for value, n in f["ratings"].items())
            lines.append(f"  {f['split']} ratings: {spread} (mean {f['rating_mean']})")
        if "labels" in f:
            up, down = f["labels"]["desirable"], f["labels"]["undesirable"]
            lines.append(f"  {f['split']} labels: {up} desirable, {down} undesirable")
    return lines


def _render_tokens(tokens: dict[str, Any]) -> list[str]:
    columns = ("min", "mean", "p50", "p90", "p99", "max")
    header = f"  {'split':<11}{'':<8}{'seqs':>7}" + "".join(f"{c:>9}" for c in columns)
    lines = ["Tokens per sequence (after the chat template):", header]
    for split, s in tokens.items():
        for kind in ("total", "trained"):
            dist = s[kind] or {}
            cells = "".join(f"{dist.get(c, '-'):>9}" for c in columns)
            lines.append(f"  {split:<11}{kind:<8}{s['sequences']:>7}{cells}")
    for split, s in tokens.items():
        per = " per epoch" if split == "train" else ""
        line = f"  {split}: {s['tokens']:,} tokens{per} ({s['trained_tokens']:,} trained)"
        if s["limit"] is not None:
            line += f"; {s['over_limit']} over the limit of {s['limit']} ({s['limit_from']})"
        lines.append(line)
    return lines


def _render_estimate(est: dict[str, Any]) -> list[str]:
    return [
        f"Training time per epoch (ESTIMATE, {est['n_params']:,} parameters, "
        f"{est['tokens_per_epoch']:,} tokens):",
        f"  full fine-tuning ~ {_duration(est['full_finetune_seconds'])}, "
        f"LoRA ~ {_duration(est['lora_seconds'])}",
        f"  measured matmul throughput: {est['matmul_flops'] / 1e9:,.1f} GFLOP/s "
        f"({est['probe_dtype']}, {est['device']})",
        f"  this is {est['assumes']}",
    ]


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
