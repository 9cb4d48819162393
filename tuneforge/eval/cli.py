"""``tuneforge eval``: task metrics of a run or a model on held-out data, against baselines.

The main CLI calls :func:`register`. User mistakes (missing files, absent labels, test data
that leaks from the training data) are TuneforgeErrors: a message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tuneforge.config import TASK_TYPES
from tuneforge.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``eval`` command to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="task metrics on test data: tuned vs base zero-shot and few-shot",
        description="Evaluate a run folder (tuned model vs its base model) or a model spec on "
                    "test data; writes eval.json, samples.jsonl and report.md/.html with plots.")
    p.add_argument("model", help="a run folder, builtin:NAME, tiny:ARCH, a model folder or .gguf")
    p.add_argument("--data", help="test file (default: the run's data.test, per task)")
    p.add_argument("--train", help="training file: few-shot examples and the leakage check "
                                   "(default: the run's data.train)")
    p.add_argument("--task", choices=TASK_TYPES, default="auto",
                   help="task type (default: classification for labelled data, else generation)")
    p.add_argument("--labels", help="allowed labels: a file (JSON list or one per line) or a "
                                    "comma-separated list")
    p.add_argument("--template", help="YAML file with the task template (system, user, "
                                      "assistant, or prompt and completion); default: the run's")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="also score the base model with K examples from the training file")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw")
    p.add_argument("--limit", type=int, help="evaluate the first N test examples only")
    p.add_argument("--samples", type=int, default=5,
                   help="generated replies per system to read side by side (classification)")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default: from the "
                                                      "references)")
    p.add_argument("--output-dir", help="report folder (default: RUN/eval or runs/eval-MODEL)")
    p.add_argument("--allow-leakage", action="store_true",
                   help="evaluate even when test examples also appear in the training data")
    p.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from tuneforge.eval.evaluate import run_eval
    from tuneforge.eval.report import render_text

    if args.few_shot < 0 or (args.limit is not None and args.limit < 1) or args.samples < 0:
        raise ConfigError("--few-shot and --samples must be >= 0, --limit >= 1")
    result = run_eval(
        args.model, data=args.data, train=args.train, task=args.task,
        labels=parse_labels(args.labels), template=read_template(args.template),
        few_shot=args.few_shot, seed=args.seed, output_dir=args.output_dir,
        allow_leakage=args.allow_leakage, limit=args.limit, samples=args.samples,
        max_new_tokens=args.max_new_tokens,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_text(result))
        print(f"\nreport: {Path(result['output_dir']) / 'report.html'} (and report.md, eval.json, "
              "samples.jsonl)")
    return 0


def parse_labels(value: str | None) -> list[str] | str | None:
    """A labels file path stays a path; anything else is a comma-separated list."""
    if value is None or Path(value).is_file():
        return value
    labels = [v.strip() for v in value.split(",") if v.strip()]
    if len(labels) < 2:
        raise ConfigError(f"--labels {value!r}: not a file, and not a comma-separated list of "
                          "two or more labels")
    return labels


def read_template(path: str | None):
    """A TemplateConfig from a YAML file, checked like a config section."""
    if path is None:
        return None
    from tuneforge.config import load_config

    # built through the config loader: unknown keys get the same hints as in a run config
    config = load_config(None, [], base={"data": {"train": "-", "template": _yaml_mapping(path)}})
    return config.data.template


def _yaml_mapping(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--template {path}: file not found")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--template {path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"--template {path}: expected a mapping of system/user/assistant/"
                          "prompt/completion")
    return loaded
