"""``tuneforge jobs serve`` and ``tuneforge jobs worker``; the main CLI calls :func:`register`.

``jobs serve MODEL --jobs-dir DIR`` is ``tuneforge serve MODEL`` (every flag of it) with the
files and fine-tuning jobs endpoints added; ``jobs worker --jobs-dir DIR`` claims and runs the
jobs. Both use ``DIR/jobs.db`` unless ``--db`` names another database (a ``postgresql://`` URL
lets workers on several machines share the queue; they then share DIR too, e.g. over NFS).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``jobs`` command (``serve``, ``worker``) to the main CLI's subparsers."""
    from tuneforge.serve.cli import register as register_serve

    jobs = subparsers.add_parser("jobs", help="fine-tuning jobs API (OpenAI's shapes) and its "
                                              "workers")
    commands = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND", required=True)

    # `jobs serve` takes every flag of `serve`: borrow its parser as a parent
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    register_serve(scratch)
    serve = commands.add_parser(
        "serve", parents=[scratch.choices["serve"]], conflict_handler="resolve",
        help="serve a model with the /v1/files and /v1/fine_tuning/jobs endpoints",
        description="`tuneforge serve` plus OpenAI's files and fine-tuning jobs API. Jobs "
                    "fine-tune MODEL (and --fine-tune-models); a succeeded job's model "
                    "(ft:MODEL:SUFFIX:JOB) is served at once to the key that made it. Start "
                    "`tuneforge jobs worker` with the same --jobs-dir/--db to run the jobs.")
    _add_store_flags(serve)
    serve.add_argument("--fine-tune-models", nargs="+", action="extend", default=[],
                       metavar="SPEC", help="more base models jobs may name (trained, but "
                       "served only by a server of that base)")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser(
        "worker", help="claim and run fine-tuning jobs from the jobs database",
        description="Claims jobs (exactly one worker gets each), checks their files, trains "
                    "them as run folders under DIR/runs/, heartbeats, and picks up the jobs "
                    "of workers that went silent (resumed from their last checkpoint).")
    _add_store_flags(worker)
    worker.add_argument("--heartbeat", type=float, default=5.0, metavar="S",
                        help="seconds between heartbeats of a running job (default 5)")
    worker.add_argument("--stale-after", type=float, default=60.0, metavar="S",
                        help="a job silent this long is re-queued (default 60)")
    worker.add_argument("--poll", type=float, default=2.0, metavar="S",
                        help="seconds between looks at an empty queue (default 2)")
    worker.add_argument("--save-every", type=int, metavar="N",
                        help="checkpoint every N steps (default: each epoch)")
    worker.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a run config value for every job, e.g. "
                        "--set train.bf16=false (repeatable)")
    worker.add_argument("--until-idle", action="store_true",
                        help="exit when no job is waiting instead of polling")
    worker.set_defaults(func=cmd_worker)


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs-dir", required=True, metavar="DIR",
                   help="uploaded files and the jobs' run folders")
    p.add_argument("--db", metavar="URL",
                   help="the jobs database (default: DIR/jobs.db; postgresql://... for many "
                        "machines)")


def open_store(args: argparse.Namespace):
    from tuneforge.jobs.store import JobStore, default_url

    jobs_dir = Path(args.jobs_dir)
    jobs_dir.mkdir(parents=True, exist_ok=True)
    return JobStore(args.db or default_url(jobs_dir)), jobs_dir


def cmd_worker(args: argparse.Namespace) -> int:
    from tuneforge.jobs.worker import Worker, WorkerSettings

    settings = WorkerSettings(heartbeat_s=args.heartbeat, stale_after_s=args.stale_after,
                              poll_s=args.poll, save_every=args.save_every,
                              overrides=args.overrides, until_idle=args.until_idle)
    store, jobs_dir = open_store(args)
    worker = Worker(store, jobs_dir, settings)

    def stop(*_):  # finish nothing new; a running job goes back to the queue
        worker.stop_event.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    _say(f"worker {worker.name} on {store.url} (jobs folder {jobs_dir})")
    done = worker.run()
    _say(f"worker {worker.name} stopped after {done} job step(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.jobs.api import create_jobs_app
    from tuneforge.serve.cli import bind_socket, keys_from_args, run_server, settings_from_args
    from tuneforge.serve.engine import load_served_models, parse_adapter_args

    store, jobs_dir = open_store(args)
    settings = settings_from_args(args, request_log=args.request_log or jobs_dir / "requests.jsonl")
    keys = keys_from_args(args)
    sock = bind_socket(args.host, args.port)
    models = load_served_models(args.model, parse_adapter_args(args.adapters),
                                precision=args.precision, say=_say)
    app = create_jobs_app(models, store, jobs_dir, settings, keys, args.fine_tune_models)
    run_server(app, sock, args.shutdown_timeout, say=_say,
               what=f"{', '.join(models.ids)} and the jobs API",
               details=f"jobs in {store.url}; run `tuneforge jobs worker --jobs-dir {jobs_dir}"
                       f"{' --db URL' if args.db else ''}` to train them")
    return 0


def _say(message: str) -> None:
    import sys

    print(f"tuneforge jobs: {message}", file=sys.stderr, flush=True)
