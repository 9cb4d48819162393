"""`tuneforge sweep` and `tuneforge curve`: parse, call the library function, print the result.

The main CLI calls :func:`register`. Mistakes in the space file or the arguments are
ConfigErrors: a message naming the key or line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tuneforge.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``sweep`` and ``curve`` commands to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep", help="hyperparameter search (Optuna): grid, random, TPE or GP, with pruning",
        description="Search config values with Optuna. Each trial is a run folder under "
                    "OUTPUT/trials; results.csv, best.yaml and plots are written to OUTPUT. "
                    "Re-run the same command to resume; run it on other machines with the same "
                    "--storage (PostgreSQL) URL and --study-name to join the study.")
    p.add_argument("config", help="the base run config (YAML)")
    p.add_argument("--space", required=True, help="search space YAML (see configs/spaces/demo-support.yaml)")
    _common(p)
    p.add_argument("--trials", type=int, help="trial budget (replaces the space file's)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--sampler", help="grid, random, tpe or gp (replaces the space file's)")
    p.add_argument("--pruner", help="none, median or halving (replaces the space file's)")
    p.add_argument("--objective", help="validation metric to optimise, e.g. val_accuracy")
    p.add_argument("--direction", help="minimize or maximize (default: from the metric's name)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the sweep folder); "
                                     "postgresql://user:password@host/db lets machines share it")
    p.add_argument("--study-name", help="study name in the storage (default: the folder's name)")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel processes")
    p.set_defaults(func=sweep_command)

    p = subparsers.add_parser(
        "curve", help="learning curve: train on nested subsets, fit a power law",
        description="Fine-tune on nested random subsets of the training data with the same "
                    "config, judge each on the same held-out set, plot the metric against the "
                    "number of examples and fit a power law.")
    p.add_argument("config", help="the run config (YAML)")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0",
                   help="comma-separated fractions of the training data (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="subset draws per fraction")
    p.add_argument("--metric", help="validation metric (default: the config's train.metric_for_best)")
    p.add_argument("--target", type=float, help="estimate the examples needed to reach this value")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="the curve counts as flat when doubling the data gains less than this")
    _common(p)
    p.set_defaults(func=curve_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the base config (repeatable)")
    p.add_argument("--output-dir", help="folder for the runs and results (default: runs/NAME)")


def sweep_command(args: argparse.Namespace) -> int:
    from tuneforge.experiments.space import load_space
    from tuneforge.experiments.sweep import format_table, run_sweep

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials: must be >= 1 (got {args.trials})")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout: must be > 0 (got {args.timeout})")
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1 (got {args.workers})")
    space = load_space(args.space, trials=args.trials, timeout=args.timeout, sampler=args.sampler,
                       pruner=args.pruner, objective=args.objective, direction=args.direction)
    summary = run_sweep(args.config, space, overrides=args.overrides, output_dir=args.output_dir,
                        storage=args.storage, study_name=args.study_name, workers=args.workers)
    print(format_table(summary.pop("rows")))
    print(json.dumps(summary, indent=2))
    return 0


def curve_command(args: argparse.Namespace) -> int:
    from tuneforge.experiments.curve import run_curve

    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError as err:
        raise ConfigError(f"--fractions: comma-separated numbers, e.g. 0.1,0.25,0.5,1 "
                          f"(got {args.fractions!r})") from err
    result = run_curve(args.config, fractions, repeats=args.repeats, overrides=args.overrides,
                       metric=args.metric, target=args.target, output_dir=args.output_dir,
                       tolerance=args.tolerance)
    for p in result["points"]:
        print(f"{p['examples']:>8} examples  repeat {p['repeat']}  {result['metric']} "
              f"{p['value']:.4f}  {p['run_dir']}")
    fit = result["fit"]
    print(f"fit: {fit['formula']}  a={fit['a']:.4g} b={fit['b']:.4g} c={fit['c']:.4g} "
          f"(rmse {fit['rmse']:.3g})")
    print(result["verdict"])
    print(f"plot: {result['plot']}")
    return 0
