"""``tuneforge data check``: validate data files before spending compute on them.

The handler prints a report and returns an exit code (0 clean or warnings only, 2 on errors);
data problems never surface as a traceback. The main CLI calls :func:`register`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tuneforge.data.formats import FORMATS
from tuneforge.data.near_duplicates import DEFAULT_THRESHOLD
from tuneforge.data.validate import check_data
from tuneforge.errors import TuneforgeError


def register(subparsers: Any) -> None:
    """Add the ``data`` command (with ``check``) to the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="inspect and validate data files")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="report every problem in a data set, with file:line, and its statistics",
        description="Check data files: format, duplicates, train/eval leakage, lengths.",
    )
    check.add_argument("file", help="training data (.jsonl, .csv, .tsv or .parquet)")
    check.add_argument(
        "--validation", nargs="+", action="extend", default=[], metavar="F", help="validation files"
    )
    check.add_argument(
        "--test", nargs="+", action="extend", default=[], metavar="F", help="test files"
    )
    check.add_argument("--format", choices=FORMATS, help="data format (default: detect per file)")
    check.add_argument("--model", help="model spec: count tokens and estimate training time")
    check.add_argument("--max-length", type=int, help="flag examples longer than this (tokens)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_signal_flags(check)
    check.set_defaults(func=check_command)
    _add_report_command(commands)
    from tuneforge.data.clean import register as register_clean

    register_clean(commands)

    from tuneforge.data.synth import add_synth_parser

    add_synth_parser(commands)  # data synth: grow a seed set with a teacher model


def _add_signal_flags(check: argparse.ArgumentParser) -> None:
    """check's flags for records without training signal (see validate.check_data)."""
    check.add_argument(
        "--rating-scale", metavar="LOW,HIGH", help="refuse ratings outside this scale, e.g. 1,5"
    )
    check.add_argument(
        "--labels",
        help="allowed classification labels: a file (JSON list or one per line) or a "
        "comma-separated list",
    )
    check.add_argument(
        "--min-class-count",
        type=int,
        default=2,
        metavar="N",
        help="warn about classes with fewer training examples than this (default: 2)",
    )
    check.add_argument(
        "--near-dup-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        metavar="J",
        help="warn about validation/test examples this similar (word 3-gram Jaccard) to a "
        f"training example (default: {DEFAULT_THRESHOLD})",
    )


def _parse_scale(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise TuneforgeError(f"--rating-scale {value!r}: expected LOW,HIGH, e.g. 1,5") from None


def check_command(args: argparse.Namespace) -> int:
    """Run the checks and print the report; 0 when there are no errors, 2 otherwise."""
    from tuneforge.eval.cli import parse_labels

    try:
        model_info = _model_info(args.model) if args.model else {}
        if args.max_length is not None and not args.model:
            print("note: --max-length needs --model (a tokenizer) to count tokens; ignored")
        report = check_data(
            args.file,
            validation=args.validation,
            test=args.test,
            fmt=args.format,
            max_length=args.max_length,
            rating_scale=_parse_scale(args.rating_scale),
            labels=parse_labels(args.labels),
            min_class_count=args.min_class_count,
            near_dup_threshold=args.near_dup_threshold,
            **model_info,
        )
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.render())
    return 0 if report.ok else 2


def _model_info(spec: str) -> dict[str, Any]:
    """Tokenizer, parameter count and context length of a model, for check_data."""
    try:
        from tuneforge.models.loading import load_model
    except ImportError as err:
        raise TuneforgeError(f"--model needs tuneforge.models.loading: {err}") from err
    model, tokenizer = load_model(spec)
    config = getattr(model, "config", None)
    return {
        "tokenizer": tokenizer,
        "n_params": sum(p.numel() for p in model.parameters()),
        "context_limit": getattr(config, "max_position_embeddings", None),
    }


def _add_report_command(commands: Any) -> None:
    """``data report``: one train file (positional), evaluation files by flag, like ``check``."""
    report = commands.add_parser(
        "report",
        help="write an HTML quality report (lengths, labels, duplicates, PII, leakage) with plots",
        description="Write DIR/report.html (self-contained), DIR/report.json and PNG plots: "
        "length histograms, label balance, exact and near-duplicate clusters, personal data, "
        "train/validation/test leakage and per-format statistics. FILE is the training data; "
        "give evaluation files with --validation/--test (each file gets its own section).",
    )
    report.add_argument("file", metavar="FILE", help="training data (.jsonl, .csv, .tsv, .parquet)")
    report.add_argument(
        "--validation", nargs="+", action="extend", default=[], metavar="F", help="validation files"
    )
    report.add_argument(
        "--test", nargs="+", action="extend", default=[], metavar="F", help="test files"
    )
    report.add_argument("--format", choices=FORMATS, help="data format (default: detect per file)")
    report.add_argument("--model", help="model spec: lengths in its tokens (default: words)")
    report.add_argument("--title", help="the report's title (default: from the file name)")
    report.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write to")
    report.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    """Write the report and list what is worth a look; 2 when a file cannot be read."""
    import json

    from tuneforge.data.report import findings, write_report

    try:
        tokenizer = None
        if args.model:
            from tuneforge.models.loading import load_tokenizer

            tokenizer = load_tokenizer(args.model)
        path = write_report(args.file, args.output, validation=args.validation, test=args.test,
                            fmt=args.format, tokenizer=tokenizer, title=args.title)
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = json.loads(path.with_name("report.json").read_text(encoding="utf-8"))
    for line in findings(report):
        print(f"  {line}")
    print(f"wrote {path} and {path.with_name('report.json')}")
    return 0
