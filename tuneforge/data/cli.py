"""``tuneforge data check``: validate data files before spending compute on them.

The handler prints a report and returns an exit code (0 clean or warnings only, 2 on errors);
data problems never surface as a traceback. The main CLI calls :func:`register`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tuneforge.data.formats import FORMATS
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
    check.set_defaults(func=check_command)


def check_command(args: argparse.Namespace) -> int:
    """Run the checks and print the report; 0 when there are no errors, 2 otherwise."""
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
