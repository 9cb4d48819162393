"""The data quality report behind ``tuneforge data report``: one HTML page, its PNG plots and
every figure again as JSON.

``tuneforge data check`` answers "can I train on this"; the report answers "what is in it":
how long the examples are, how the labels balance, which records repeat (exactly, or nearly:
the same ticket with one word changed), what personal data they carry, which evaluation
records also sit in the training data, and per-format figures (turns per chat, the length gap
between chosen and rejected answers, how ratings spread). Files are read and checked by
:mod:`tuneforge.data.validate` (its problems and statistics are part of the report), never by a
parser of its own. Near-duplicates come from :mod:`tuneforge.data.near_duplicates` (word
shingles, MinHash LSH, confirmed on exact Jaccard) and personal data from
:mod:`tuneforge.data.pii`.

The page is one self-contained file: inline CSS, the plots embedded as base64 PNGs (and also
written next to it), no scripts, every piece of user text escaped. Outputs are written to a
temporary name and renamed into place, and never over one of the input files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneforge.data.example import Example, Message
from tuneforge.data.formats import DataFileError, location, parse_examples
from tuneforge.data.near_duplicates import (
    DEFAULT_THRESHOLD,
    near_duplicate_clusters,
    near_matches,
)
from tuneforge.data.pii import KINDS, find_pii, mask_pii
from tuneforge.data.validate import (
    RESPONSE_NAMES,
    check_data,
    distribution,
    example_key,
    templated_sequences,
)
from tuneforge.errors import DataError

EXCERPT_CHARS = 160
LISTED_CLUSTERS = 10  # per file in the page; the JSON keeps up to MAX_JSON_ITEMS
LISTED_MEMBERS = 5
LISTED_ROWS = 20  # leaks and PII records per file in the page
LISTED_PROBLEMS = 50
MAX_JSON_ITEMS = 200
HIST_BINS = 30
ANSWER_LABELS = 20  # most distinct answer first lines still read as labels
SPLIT_COLOURS = {"train": "#1f4e79", "validation": "#e67e22", "test": "#27ae60"}

Measure = Callable[[list[str]], list[int]]


def add_report_options(parser: Any) -> None:
    """``--report DIR`` / ``--no-report``: the quality report that ``clean`` and ``synth`` write
    of their output (default folder: ``<OUT stem>-report`` next to OUT)."""
    parser.add_argument("--report", metavar="DIR",
                        help="folder of the quality report of OUT (default: <OUT stem>-report/)")
    parser.add_argument("--no-report", dest="write_report", action="store_false",
                        help="do not write the quality report")


def report_of_output(output: str | Path, args: Any, *, validation: Sequence[str | Path] = (),
                     test: Sequence[str | Path] = ()) -> Path | None:
    """The quality report of a command's output file, as ``add_report_options`` asked; its HTML
    path (printed), or None when switched off."""
    if not getattr(args, "write_report", True):
        return None
    output = Path(output)
    folder = Path(args.report) if getattr(args, "report", None) else output.with_name(f"{output.stem}-report")
    path = write_report(output, folder, validation=validation, test=test,
                        title=f"Data report: {output.name}")
    print(f"quality report: {path}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    return path


def write_report(
    train: str | Path,
    out_dir: str | Path,
    *,
    validation: Sequence[str | Path] = (),
    test: Sequence[str | Path] = (),
    fmt: str | None = None,
    tokenizer: Any = None,
    title: str | None = None,
) -> Path:
    """Write ``out_dir/report.html``, ``report.json`` and the PNG plots; returns the HTML path.

    With a ``tokenizer`` lengths are tokens per sequence after the chat template (what training
    sees), else words. Raises DataError when a file cannot be read (naming it) or when an
    output would overwrite an input; bad records are reported, not raised.
    """
    out = Path(out_dir)
    inputs = [Path(train), *map(Path, validation), *map(Path, test)]
    outputs = [out / "report.html", out / "report.json", *(out / f"{n}.png" for n in _PLOTS)]
    clash = {p.resolve() for p in inputs} & {p.resolve() for p in outputs}
    if clash:
        raise DataError(
            f"the report would overwrite the input file {sorted(clash)[0]}; "
            "choose another --output folder"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} is a file; give a folder")
    report = build_report(train, validation=validation, test=test, fmt=fmt, tokenizer=tokenizer)
    report["title"] = title or f"Data report: {Path(train).name}"
    out.mkdir(parents=True, exist_ok=True)
    from tuneforge.train.checkpoint import atomic_write_bytes  # (torch: imported when writing)

    images = _plots(report)
    for name in _PLOTS:  # a plot left from an earlier report would describe other data
        if name not in images:
            (out / f"{name}.png").unlink(missing_ok=True)
    for name, png in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
    report["figures"] = {name: f"{name}.png" for name in images}
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode("utf-8"))
    html_path = out / "report.html"
    atomic_write_bytes(html_path, render_html(report, images).encode("utf-8"))
    return html_path


def build_report(
    train: str | Path,
    *,
    validation: Sequence[str | Path] = (),
    test: Sequence[str | Path] = (),
    fmt: str | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Every figure of the report as a JSON-serialisable dict (what ``report.json`` holds)."""
    files = [("train", Path(train))]
    files += [("validation", Path(p)) for p in validation] + [("test", Path(p)) for p in test]
    loaded = _load(files, fmt)
    check = check_data(train, validation=validation, test=test, fmt=fmt, tokenizer=tokenizer)
    measure = _measure(tokenizer)
    unit = "tokens" if tokenizer is not None else "words"
    sections = []
    for (_, _, examples), stats in zip(loaded, check.stats["files"]):
        section = dict(stats)
        section["lengths"] = _lengths(examples, tokenizer)
        section["label_balance"] = _label_balance(examples, stats)
        section["format_stats"] = _format_stats(examples, measure)
        section["duplicates"] = _duplicates(examples)
        section["pii"] = _pii(examples)
        sections.append(section)
    _answer_labels(sections, loaded)
    train_examples = loaded[0][2]
    for section, (split, _, examples) in zip(sections, loaded):
        if split != "train":
            section["leakage"] = _leakage(train_examples, examples)
    _add_histograms(sections)
    return {
        "length_unit": unit,
        "length_label": _length_label(unit),
        "near_duplicate_threshold": DEFAULT_THRESHOLD,
        "files": sections,
        "tokens_after_template": check.stats.get("tokens"),
        "problems": {
            "errors": len(check.errors),
            "warnings": len(check.warnings),
            "list": [p.to_dict() for p in check.problems[:MAX_JSON_ITEMS]],
        },
    }


def _load(files: list[tuple[str, Path]], fmt: str | None) -> list[tuple[str, str, list[Example]]]:
    """Every file's examples; one DataError naming every file that cannot be read at all."""
    loaded, unreadable = [], []
    for split, path in files:
        try:
            examples, _ = parse_examples(path, fmt)
        except DataFileError as err:
            unreadable.append(str(err))
            continue
        loaded.append((split, str(path), examples))
    if unreadable:
        raise DataError("cannot read " + "; ".join(unreadable))
    return loaded


# --------------------------------------------------------------------------------------------
# Text of an example


def _pieces(example: Example) -> list[tuple[str, str]]:
    """``(name, text)`` of every part of an example, system turns included, in reading order."""
    pieces = [("prompt", example.prompt)] if example.prompt is not None else []
    pieces += [(m.role, m.content) for m in example.messages or []]
    pieces += [(m.role, m.content) for m in example.prompt_messages or []]
    names = RESPONSE_NAMES.get(example.format, [])
    for i, response in enumerate(example.responses or []):
        name = names[i] if i < len(names) else f"responses[{i}]"
        pieces.append((name, _joined(response)))
    if example.completion is not None:
        pieces.append(("completion", example.completion))
    return pieces


def _joined(messages: list[Message]) -> str:
    return "\n".join(m.content for m in messages)


def content_text(example: Example) -> str:
    """The example's own words, ``name: text`` per part, system turns left out: a system
    prompt is often the same on every record, and would make every pair look alike."""
    return "\n".join(f"{name}: {text}" for name, text in _pieces(example) if name != "system")


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


def _measure(tokenizer: Any) -> Measure:
    """Lengths of plain texts: tokens (no special tokens) with a tokenizer, else words."""
    if tokenizer is None:
        return lambda texts: [len(t.split()) for t in texts]

    def tokens(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return tokens


def _length_label(unit: str) -> str:
    if unit == "tokens":
        return "tokens per sequence, after the chat template (--model's tokenizer)"
    return "words per sequence (no --model given: words, not tokens)"


def _lengths(examples: list[Example], tokenizer: Any) -> list[int]:
    """Length of each sequence training sees (a preference pair is two: prompt + each answer).

    Tokens as :func:`~tuneforge.data.validate.check_data` counts them; a sequence the template
    cannot render is left out (the check reports it).
    """
    sequences = [seq for ex in examples for _, seq in templated_sequences(ex)]
    if tokenizer is None:
        return [sum(len(text.split()) for _, text in _pieces(seq)) for seq in sequences]
    from tuneforge.data.render import render_sft

    lengths = []
    for seq in sequences:
        try:
            lengths.append(len(render_sft(seq, tokenizer).input_ids))
        except DataError:
            continue
    return lengths


def _add_histograms(sections: list[dict[str, Any]]) -> None:
    """Replace each file's raw lengths by their distribution and a histogram on shared bins."""
    import numpy as np

    values = [v for s in sections for v in s["lengths"]]
    if values:
        bins = max(1, min(HIST_BINS, max(values) - min(values)))
        edges = np.histogram_bin_edges(values, bins=bins)
    for s in sections:
        lengths = s.pop("lengths")
        s["length"] = distribution(lengths)
        if values:
            counts, _ = np.histogram(lengths, bins=edges)
            s["length_histogram"] = {
                "edges": [round(float(e), 2) for e in edges],
                "counts": [int(c) for c in counts],
            }


# --------------------------------------------------------------------------------------------
# Figures per file


def _by_count(counts: Counter) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _label_balance(examples: list[Example], stats: dict[str, Any]) -> dict[str, int]:
    """Classification labels, or thumbs up/down of unpaired feedback; {} when neither."""
    labels = Counter(ex.label for ex in examples if ex.label is not None)
    if labels:
        return _by_count(labels)
    return dict(stats.get("labels", {}))


def _answer_labels(
    sections: list[dict[str, Any]],
    loaded: list[tuple[str, str, list[Example]]],
) -> None:
    """Labels from the answers' first lines, when no file has labels of its own.

    A routing task written as chat (``Department: Billing`` then a reply) is classification in
    all but name: when the training answers' first lines take a few values, each repeated
    (at most ANSWER_LABELS, and at most one per five records), they are its labels, counted
    the same way in every file.
    """
    if any(s["label_balance"] for s in sections):
        return
    from tuneforge.data.templates import prompt_and_reference

    counts = [
        Counter(
            prompt_and_reference(ex)[1].strip().split("\n", 1)[0].strip()
            for ex in examples
            if ex.kind == "sft"
        )
        for _, _, examples in loaded
    ]
    records = sum(counts[0].values())
    if not 1 < len(counts[0]) <= min(ANSWER_LABELS, records // 5):
        return
    common = os.path.commonprefix([line for c in counts for line in c])
    prefix = common[: common.rfind(" ") + 1]  # "Department: " of "Department: Billing"
    source = "the first line of each answer" + (f", after {prefix!r}" if prefix else "")
    for section, file_counts in zip(sections, counts):
        labels = Counter({line[len(prefix) :]: n for line, n in file_counts.items()})
        section["label_balance"] = _by_count(labels)
        section["label_source"] = source


def _format_stats(examples: list[Example], measure: Measure) -> dict[str, Any]:
    """Figures that only mean something for one kind of record, keyed by that kind."""
    by_kind: dict[str, list[Example]] = {}
    for ex in examples:
        by_kind.setdefault(ex.kind, []).append(ex)
    stats: dict[str, Any] = {"records_per_format": dict(Counter(ex.format for ex in examples))}
    builders = {
        "sft": _sft_stats,
        "preference": _pair_stats,
        "ranking": _ranking_stats,
        "rating": _single_response_stats,
        "unpaired": _single_response_stats,
    }
    for kind, group in by_kind.items():
        if kind in builders:
            stats[kind] = builders[kind](group, measure)
    return stats


def _prompt_text(example: Example) -> str:
    """The prompt without system turns (those are counted apart: distinct system prompts)."""
    if example.prompt is not None:
        return example.prompt
    return _joined([m for m in example.prompt_messages or [] if m.role != "system"])


def _sft_stats(examples: list[Example], measure: Measure) -> dict[str, Any]:
    from tuneforge.data.templates import prompt_and_reference

    prompts, answers = [], []
    for ex in examples:
        prompt, answer = prompt_and_reference(ex)
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt if m["role"] != "system")
        prompts.append(prompt)
        answers.append(answer)
    stats: dict[str, Any] = {
        "records": len(examples),
        "prompt_length": distribution(measure(prompts)),
        "answer_length": distribution(measure(answers)),
    }
    chats = [ex.messages for ex in examples if ex.messages is not None]
    if chats:
        systems = [m.content for msgs in chats for m in msgs[:1] if m.role == "system"]
        stats["turns_per_chat"] = distribution([sum(m.role != "system" for m in c) for c in chats])
        stats["assistant_turns"] = distribution(
            [sum(m.role == "assistant" for m in c) for c in chats]
        )
        stats["with_system_prompt"] = len(systems)
        stats["distinct_system_prompts"] = len(set(systems))
    return stats


def _pair_stats(examples: list[Example], measure: Measure) -> dict[str, Any]:
    """Chosen vs rejected length: when chosen is nearly always longer, a model learns length."""
    chosen = measure([_joined(ex.responses[0]) for ex in examples])
    rejected = measure([_joined(ex.responses[1]) for ex in examples])
    gaps = [c - r for c, r in zip(chosen, rejected)]
    return {
        "records": len(examples),
        "prompt_length": distribution(measure([_prompt_text(ex) for ex in examples])),
        "chosen_length": distribution(chosen),
        "rejected_length": distribution(rejected),
        "chosen_minus_rejected": distribution(gaps),
        "chosen_minus_rejected_values": gaps[: MAX_JSON_ITEMS * 50],
        "chosen_longer_share": round(sum(g > 0 for g in gaps) / len(gaps), 3),
        "rejected_longer_share": round(sum(g < 0 for g in gaps) / len(gaps), 3),
    }


def _ranking_stats(examples: list[Example], measure: Measure) -> dict[str, Any]:
    responses = [_joined(r) for ex in examples for r in ex.responses]
    return {
        "records": len(examples),
        "responses_per_record": distribution([len(ex.responses) for ex in examples]),
        "with_scores": sum(ex.scores is not None for ex in examples),
        "prompt_length": distribution(measure([_prompt_text(ex) for ex in examples])),
        "response_length": distribution(measure(responses)),
    }


def _single_response_stats(examples: list[Example], measure: Measure) -> dict[str, Any]:
    """Ratings and thumbs up/down: their spread is in the file's ``ratings``/``label_balance``."""
    return {
        "records": len(examples),
        "prompt_length": distribution(measure([_prompt_text(ex) for ex in examples])),
        "response_length": distribution(measure([_joined(ex.responses[0]) for ex in examples])),
    }


def _member(example: Example) -> dict[str, str]:
    return {
        "where": location(example.source, example.line),
        "excerpt": excerpt(content_text(example)),
    }


def _duplicates(examples: list[Example]) -> dict[str, Any]:
    """Exact clusters (same :func:`example_key`) and near-duplicate clusters (similar text,
    not all one exact copy), biggest first."""
    by_key: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_key.setdefault(example_key(ex), []).append(i)
    exact = [group for group in by_key.values() if len(group) > 1]
    near = near_duplicate_clusters([content_text(ex) for ex in examples])
    keys = [example_key(ex) for ex in examples]
    near = [group for group in near if len({keys[i] for i in group}) > 1]

    def listed(clusters: list[list[int]]) -> list[dict[str, Any]]:
        ordered = sorted(clusters, key=lambda g: (-len(g), g[0]))[:MAX_JSON_ITEMS]
        return [{"size": len(g), "members": [_member(examples[i]) for i in g]} for g in ordered]

    return {
        "exact_clusters": len(exact),
        "exact_redundant_records": sum(len(g) - 1 for g in exact),
        "near_clusters": len(near),
        "near_records": sum(len(g) for g in near),
        "exact": listed(exact),
        "near": listed(near),
    }


def _leakage(train: list[Example], held_out: list[Example]) -> dict[str, Any]:
    """Held-out records that are also in train: exactly (same key) or nearly (similar text)."""
    first: dict[str, Example] = {}
    for ex in train:
        first.setdefault(example_key(ex), ex)
    exact = [(ex, first[example_key(ex)]) for ex in held_out if example_key(ex) in first]
    matches = near_matches(
        [content_text(ex) for ex in held_out], [content_text(ex) for ex in train]
    )
    near = [
        (held_out[i], train[j], score)
        for i, j, score in matches
        if example_key(held_out[i]) != example_key(train[j])
    ]

    def pair(ex: Example, match: Example) -> dict[str, Any]:
        return {
            "where": location(ex.source, ex.line),
            "train": location(match.source, match.line),
            "excerpt": excerpt(content_text(ex)),
        }

    return {
        "exact_records": len(exact),
        "near_records": len({id(ex) for ex, _, _ in near}),
        "exact": [pair(ex, m) for ex, m in exact[:MAX_JSON_ITEMS]],
        "near": [pair(ex, m) | {"jaccard": round(score, 3)} for ex, m, score in near][
            :MAX_JSON_ITEMS
        ],
    }


def _pii(examples: list[Example]) -> dict[str, Any]:
    """Matches per kind and the records holding them (excerpts masked: a report is shared)."""
    counts: Counter = Counter()
    records = []
    for ex in examples:
        text = "\n".join(text for _, text in _pieces(ex))
        found = find_pii(text)
        if not found:
            continue
        counts.update(m.kind for m in found)
        masked, _ = mask_pii(content_text(ex))
        marks = [i for kind in KINDS if (i := masked.find(f"[{kind}]")) >= 0]
        start = max(0, min(marks, default=0) - 40)  # show the first masked match,
        start = masked.rfind(" ", 0, start) + 1 if start else 0  # from a word's start
        records.append(
            {
                "where": location(ex.source, ex.line),
                "kinds": sorted({m.kind for m in found}),
                "excerpt": excerpt(("\u2026" if start else "") + masked[start:]),
            }
        )
    return {
        "matches": {kind: counts[kind] for kind in KINDS if counts[kind]},
        "records_with_pii": len(records),
        "records": records[:MAX_JSON_ITEMS],
    }


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)

_PLOTS = ("lengths", "labels", "ratings", "preference", "duplicates", "pii")


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of each plot that has something to show, by name."""
    makers = {
        "lengths": _plot_lengths,
        "labels": _plot_labels,
        "ratings": _plot_ratings,
        "preference": _plot_preference,
        "duplicates": _plot_duplicates,
        "pii": _plot_pii,
    }
    out = {}
    for name in _PLOTS:
        png = makers[name](report)
        if png is not None:
            out[name] = png
    return out


def _figure(width: float = 7.5, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.add_subplot()


def _png(fig: Any, ax: Any) -> bytes:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _name(section: dict[str, Any], sections: list[dict[str, Any]]) -> str:
    """A file's legend name: its split, plus the file name when a split has several files."""
    same = sum(s["split"] == section["split"] for s in sections)
    return section["split"] + (f" ({Path(section['path']).name})" if same > 1 else "")


def _colour(section: dict[str, Any]) -> str:
    return SPLIT_COLOURS.get(section["split"], "#7f8c8d")


def _plot_lengths(report: dict[str, Any]) -> bytes | None:
    files = [s for s in report["files"] if s.get("length_histogram")]
    if not files:
        return None
    fig, ax = _figure()
    for s in files:
        hist = s["length_histogram"]
        total = sum(hist["counts"]) or 1
        shares = [c / total for c in hist["counts"]]
        ax.stairs(
            shares,
            hist["edges"],
            label=f"{_name(s, files)}: {total} sequences",
            color=_colour(s),
            linewidth=2,
        )
    ax.set_xlabel(report["length_label"])
    ax.set_ylabel("share of the file's sequences")
    ax.set_title("Length of the training sequences")
    ax.legend()
    return _png(fig, ax)


def _grouped_bars(
    ax: Any,
    categories: list[str],
    series: list[tuple[str, str, list[float]]],
    counts: list[list[int]] | None = None,
    *,
    rotate: bool | None = None,
) -> None:
    """One group of bars per category, one bar per series; counts written above the bars."""
    width = 0.8 / max(1, len(series))
    for k, (label, colour, values) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        bars = ax.bar(xs, values, width, label=label, color=colour)
        if counts is not None:
            ax.bar_label(bars, labels=[str(c) for c in counts[k]], fontsize=7)
    ax.set_xticks(range(len(categories)))
    if rotate is None:
        rotate = max(len(c) for c in categories) > 10 or len(categories) > 6
    ax.set_xticklabels(categories, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    top = max((v for _, _, values in series for v in values), default=0) or 1
    ax.set_ylim(0, top * 1.3)  # room for the counts and the legend above the bars
    ax.legend(loc="upper center", ncol=min(len(series), 4), fontsize=8)


def _plot_labels(report: dict[str, Any]) -> bytes | None:
    files = [s for s in report["files"] if s["label_balance"]]
    if not files:
        return None
    categories = list(dict.fromkeys(k for s in files for k in s["label_balance"]))
    series, counts = [], []
    for s in files:
        row = [s["label_balance"].get(c, 0) for c in categories]
        series.append((_name(s, files), _colour(s), [c / (sum(row) or 1) for c in row]))
        counts.append(row)
    fig, ax = _figure(max(7.5, 0.9 * len(categories) * len(files) ** 0.5), 4.2)
    _grouped_bars(ax, categories, series, counts)
    ax.set_xlabel("label (counts above the bars)")
    ax.set_ylabel("share of the file's records")
    ax.set_title("Label balance per split")
    return _png(fig, ax)


def _plot_ratings(report: dict[str, Any]) -> bytes | None:
    files = [s for s in report["files"] if s.get("ratings")]
    if not files:
        return None
    categories = sorted({k for s in files for k in s["ratings"]}, key=float)
    counts = [[s["ratings"].get(c, 0) for c in categories] for s in files]
    series = [(_name(s, files), _colour(s), row) for s, row in zip(files, counts)]
    fig, ax = _figure()
    _grouped_bars(ax, categories, series, counts)
    ax.set_xlabel("rating")
    ax.set_ylabel("records")
    ax.set_title("How the ratings spread")
    return _png(fig, ax)


def _plot_preference(report: dict[str, Any]) -> bytes | None:
    files = [s for s in report["files"] if "preference" in s["format_stats"]]
    if not files:
        return None
    fig, ax = _figure()
    gaps = [
        g for s in files for g in s["format_stats"]["preference"]["chosen_minus_rejected_values"]
    ]
    bins = max(1, min(HIST_BINS, max(gaps) - min(gaps)))
    for s in files:
        values = s["format_stats"]["preference"]["chosen_minus_rejected_values"]
        ax.hist(
            values,
            bins=bins,
            range=(min(gaps), max(gaps)),
            histtype="step",
            linewidth=2,
            color=_colour(s),
            label=f"{_name(s, files)}: {len(values)} pairs",
        )
    ax.axvline(0, color="black", linewidth=1)
    unit = report["length_unit"]
    ax.set_xlabel(f"chosen minus rejected length ({unit}); right of 0: chosen is longer")
    ax.set_ylabel("pairs")
    ax.set_title("Length gap between chosen and rejected answers")
    ax.legend()
    return _png(fig, ax)


def _plot_duplicates(report: dict[str, Any]) -> bytes | None:
    files = report["files"]
    measures = {
        "exact duplicates\n(records beyond the first)": lambda s: s["duplicates"][
            "exact_redundant_records"
        ],
        "near-duplicates\n(records in clusters)": lambda s: s["duplicates"]["near_records"],
        "also in train\n(exactly)": lambda s: s.get("leakage", {}).get("exact_records", 0),
        "nearly in train\n(near-duplicate)": lambda s: s.get("leakage", {}).get("near_records", 0),
    }
    counts = [[get(s) for get in measures.values()] for s in files]
    if not any(any(row) for row in counts):
        return None
    series = [(_name(s, files), _colour(s), row) for s, row in zip(files, counts)]
    fig, ax = _figure(8.0, 4.2)
    _grouped_bars(ax, list(measures), series, counts, rotate=False)
    ax.set_ylabel("records")
    ax.set_title("Duplicates within each file and train/evaluation leakage")
    return _png(fig, ax)


def _plot_pii(report: dict[str, Any]) -> bytes | None:
    files = report["files"]
    kinds = [k for k in KINDS if any(s["pii"]["matches"].get(k) for s in files)]
    if not kinds:
        return None
    counts = [[s["pii"]["matches"].get(k, 0) for k in kinds] for s in files]
    series = [(_name(s, files), _colour(s), row) for s, row in zip(files, counts)]
    fig, ax = _figure()
    _grouped_bars(ax, kinds, series, counts)
    ax.set_xlabel("kind of personal data or secret")
    ax.set_ylabel("matches")
    ax.set_title("Personal data and secrets found")
    return _png(fig, ax)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ddd;
padding:.25rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.x{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
.x{color:#444;word-break:break-word}img{max-width:100%;border:1px solid #eee}
.bad{color:#b03a2e;font-weight:600}.ok{color:#1e8449}.note{color:#666;font-size:.9rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"<td class=n>{_e(value)}</td>" if numeric else f"<td>{_e(value)}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _dist_row(label: str, dist: dict[str, float] | None) -> list[Any]:
    keys = ("min", "mean", "p50", "p90", "p99", "max")
    return [label, *((dist or {}).get(k, "-") for k in keys)]


_DIST_HEADER = ("", "min", "mean", "p50", "p90", "p99", "max")


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The report page: self-contained (inline CSS, embedded PNGs, no scripts), text escaped."""
    body = [
        f"<h1>{_e(report['title'])}</h1>",
        _summary(report),
        _files_section(report),
        _lengths_section(report, images),
        _labels_section(report, images),
        _formats_section(report, images),
        _duplicates_section(report, images),
        _leakage_section(report),
        _pii_section(report, images),
        _problems_section(report),
    ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(report['title'])}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def findings(report: dict[str, Any]) -> list[str]:
    """One line per thing worth a look, for the page's summary and the command's output."""
    lines = []
    for s in report["files"]:
        name = f"{s['split']} ({s['path']})"
        d = s["duplicates"]
        if d["exact_clusters"]:
            lines.append(
                f"{name}: {d['exact_redundant_records']} exact duplicate records in "
                f"{d['exact_clusters']} clusters"
            )
        if d["near_clusters"]:
            lines.append(
                f"{name}: {d['near_records']} records in {d['near_clusters']} "
                "near-duplicate clusters"
            )
        leak = s.get("leakage")
        if leak and (leak["exact_records"] or leak["near_records"]):
            lines.append(
                f"{name}: {_plural(leak['exact_records'], 'record')} also in train, "
                f"{leak['near_records']} nearly so"
            )
        if s["pii"]["records_with_pii"]:
            kinds = ", ".join(f"{n} {k}" for k, n in s["pii"]["matches"].items())
            records = _plural(s["pii"]["records_with_pii"], "record")
            lines.append(f"{name}: personal data or secrets in {records} ({kinds})")
    problems = report["problems"]
    if problems["errors"] or problems["warnings"]:
        counts = (
            f"{_plural(problems['errors'], 'error')}, {_plural(problems['warnings'], 'warning')}"
        )
        lines.append(f"data check: {counts}")
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _summary(report: dict[str, Any]) -> str:
    items = findings(report)
    if not items:
        return "<p class=ok>Nothing to flag: no duplicates, leakage, personal data or problems.</p>"
    return "<h2>Worth a look</h2><ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _files_section(report: dict[str, Any]) -> str:
    rows = [
        [
            s["split"],
            s["path"],
            s["format"] or "mixed/none",
            s["examples"],
            s["errors"],
            s["warnings"],
        ]
        for s in report["files"]
    ]
    header = ("split", "file", "format", "records", "errors", "warnings")
    return "<h2>Files</h2>" + _table(header, rows)


def _lengths_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    rows = [
        _dist_row(f"{s['split']}: {Path(s['path']).name}", s["length"]) for s in report["files"]
    ]
    parts = [
        "<h2>Lengths</h2>",
        f"<p class=note>{_e(report['length_label'])}</p>",
        _image(images, "lengths", "length histogram"),
        _table(_DIST_HEADER, rows),
    ]
    tokens = report.get("tokens_after_template")
    if tokens:
        trained = [
            _dist_row(f"{split}: trained tokens", s["trained"]) for split, s in tokens.items()
        ]
        parts += [
            "<p>Tokens that carry the loss (assistant turns), per sequence:</p>",
            _table(_DIST_HEADER, trained),
        ]
    return "".join(parts)


def _labels_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    files = [s for s in report["files"] if s["label_balance"]]
    if not files:
        return (
            "<h2>Label balance</h2><p class=note>No labels: only classification records "
            "and thumbs-up/down feedback carry them.</p>"
        )
    labels = list(dict.fromkeys(k for s in files for k in s["label_balance"]))
    rows = [[label, *(s["label_balance"].get(label, 0) for s in files)] for label in labels]
    header = ["label", *(f"{s['split']}: {Path(s['path']).name}" for s in files)]
    source = files[0].get("label_source")
    note = (
        (
            f"<p class=note>No label field: the labels are {_e(source)}, which takes a few "
            "repeated values.</p>"
        )
        if source
        else ""
    )
    return (
        "<h2>Label balance</h2>"
        + note
        + _image(images, "labels", "label balance")
        + _table(header, rows)
    )


_FORMAT_TITLES = {
    "sft": "Supervised records",
    "preference": "Preference pairs",
    "ranking": "Rankings",
    "rating": "Rated responses",
    "unpaired": "Thumbs up/down (unpaired)",
}


def _formats_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    parts = [
        "<h2>Per-format statistics</h2>",
        f"<p class=note>Lengths here are {_e(report['length_unit'])} of the plain text "
        "(no chat template); prompts leave out system turns.</p>",
    ]
    for s in report["files"]:
        stats = s["format_stats"]
        formats = ", ".join(f"{k}: {n}" for k, n in stats["records_per_format"].items())
        parts.append(
            f"<h3>{_e(s['split'])}: <code>{_e(s['path'])}</code></h3>"
            f"<p>Records per format: {_e(formats or 'none')}</p>"
        )
        for kind, title in _FORMAT_TITLES.items():
            if kind in stats:
                parts.append(f"<p><b>{_e(title)}</b></p>" + _kind_table(stats[kind]))
        if s.get("ratings"):
            spread = ", ".join(f"{k}: {n}" for k, n in s["ratings"].items())
            parts.append(f"<p>Ratings: {_e(spread)} (mean {_e(s['rating_mean'])})</p>")
    parts.append(_image(images, "preference", "chosen minus rejected length"))
    parts.append(_image(images, "ratings", "ratings"))
    return "".join(parts)


def _kind_table(stats: dict[str, Any]) -> str:
    """Distributions as rows of one table, single figures as a line under it."""
    dists = [
        _dist_row(k.replace("_", " "), v)
        for k, v in stats.items()
        if isinstance(v, dict) or (v is None and k != "records")
    ]
    figures = [
        f"{k.replace('_', ' ')}: {v}"
        for k, v in stats.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return _table(_DIST_HEADER, dists) + f"<p class=note>{_e('; '.join(figures))}</p>"


def _duplicates_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    parts = [
        "<h2>Duplicates</h2>",
        "<p class=note>Exact: the same record after lowercasing and collapsing whitespace. "
        f"Near: word-3-gram Jaccard similarity of at least "
        f"{report['near_duplicate_threshold']} (system turns left out), not all one exact "
        "copy. Biggest clusters first.</p>",
        _image(images, "duplicates", "duplicates"),
    ]
    for s in report["files"]:
        d = s["duplicates"]
        parts.append(
            f"<h3>{_e(s['split'])}: <code>{_e(s['path'])}</code></h3>"
            f"<p>{d['exact_clusters']} exact clusters ({d['exact_redundant_records']} "
            f"redundant records); {d['near_clusters']} near-duplicate clusters "
            f"({d['near_records']} records)</p>"
        )
        for kind in ("exact", "near"):
            for cluster in d[kind][:LISTED_CLUSTERS]:
                parts.append(_cluster(kind, cluster))
    return "".join(parts)


def _cluster(kind: str, cluster: dict[str, Any]) -> str:
    members = cluster["members"]
    rows = [[m["where"], m["excerpt"]] for m in members[:LISTED_MEMBERS]]
    more = len(members) - LISTED_MEMBERS
    note = f"<p class=note>and {more} more</p>" if more > 0 else ""
    title = f"<p>{_e(kind)} cluster of {cluster['size']}:</p>"
    return title + _table(("where", "excerpt"), rows).replace("<td>", "<td class=x>") + note


def _leakage_section(report: dict[str, Any]) -> str:
    held_out = [s for s in report["files"] if "leakage" in s]
    if not held_out:
        return (
            "<h2>Train/evaluation leakage</h2><p class=note>No validation or test files given.</p>"
        )
    parts = [
        "<h2>Train/evaluation leakage</h2>",
        "<p class=note>Evaluation records that also appear in train measure memory, not skill.</p>",
    ]
    for s in held_out:
        leak = s["leakage"]
        verdict = "bad" if leak["exact_records"] or leak["near_records"] else "ok"
        parts.append(
            f"<h3>{_e(s['split'])}: <code>{_e(s['path'])}</code></h3>"
            f"<p class={verdict}>{leak['exact_records']} records also in train, "
            f"{leak['near_records']} near-duplicates of train records</p>"
        )
        rows = [[p["where"], p["train"], "exact", p["excerpt"]] for p in leak["exact"]]
        rows += [[p["where"], p["train"], p["jaccard"], p["excerpt"]] for p in leak["near"]]
        if rows:
            parts.append(_table(("record", "in train", "match", "excerpt"), rows[:LISTED_ROWS]))
    return "".join(parts)


def _pii_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    parts = [
        "<h2>Personal data and secrets</h2>",
        "<p class=note>Emails, phone numbers, "
        "payment cards, IBANs, IP addresses and API keys (excerpts masked). "
        "<code>tuneforge data clean</code> can mask them.</p>",
        _image(images, "pii", "personal data counts"),
    ]
    for s in report["files"]:
        pii = s["pii"]
        counts = ", ".join(f"{k}: {n}" for k, n in pii["matches"].items()) or "none found"
        parts.append(
            f"<h3>{_e(s['split'])}: <code>{_e(s['path'])}</code></h3>"
            f"<p>{pii['records_with_pii']} records; {_e(counts)}</p>"
        )
        rows = [
            [r["where"], ", ".join(r["kinds"]), r["excerpt"]] for r in pii["records"][:LISTED_ROWS]
        ]
        if rows:
            parts.append(_table(("record", "kinds", "excerpt (masked)"), rows))
    return "".join(parts)


def _problems_section(report: dict[str, Any]) -> str:
    problems = report["problems"]
    parts = [
        f"<h2>Data check</h2><p>{problems['errors']} errors, {problems['warnings']} "
        "warnings (<code>tuneforge data check</code> lists them all).</p>"
    ]
    rows = [
        [p["severity"], location(p["source"], p["line"]), p["field"], p["message"]]
        for p in problems["list"][:LISTED_PROBLEMS]
    ]
    if rows:
        parts.append(_table(("severity", "where", "field", "message"), rows))
    return "".join(parts)
