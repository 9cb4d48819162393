"""``tuneforge studio``: the web studio on one port, with the API it is a client of.

It serves ``--model`` for the playground and the jobs it fine-tunes, the jobs API over
``--jobs-dir``/``--db``, and the pages over ``--runs-dir``. It binds 127.0.0.1 by default and
then needs no keys; any other address needs ``--api-keys`` (or $TUNEFORGE_API_KEYS), which the
pages ask for at sign-in. ``--worker`` also runs a jobs worker in this process, so that a job
submitted from the New job page trains without a second command.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def register(subparsers: Any) -> None:
    """Add ``tuneforge studio`` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "studio", help="the web studio: runs, comparisons, data, jobs, playground, feedback",
        description="Web pages for run folders, sweeps, data checks, fine-tuning jobs, a "
                    "side-by-side playground and human feedback, served with the "
                    "OpenAI-compatible API and the jobs API on one port.")
    p.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="run, sweep and learning-curve folders to show (default: runs)")
    p.add_argument("--jobs-dir", default="jobs", metavar="DIR",
                   help="uploaded files and the jobs' run folders (default: jobs)")
    p.add_argument("--db", metavar="URL",
                   help="the jobs database (default: JOBS_DIR/jobs.db; postgresql://...)")
    p.add_argument("--feedback-db", default="feedback.db", metavar="PATH",
                   help="the feedback store the labeling pages use (default: feedback.db)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                   help=f"base model for the playground and for jobs (default: {DEFAULT_MODEL})")
    p.add_argument("--fine-tune-models", nargs="+", action="extend", default=[],
                   metavar="SPEC", help="more base models jobs may name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only, no keys needed)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks one)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="API keys, one per line (NAME:KEY or KEY); needed off loopback")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="most new tokens one playground reply may ask for")
    p.add_argument("--worker", action="store_true",
                   help="also run a jobs worker in this process")
    p.set_defaults(func=cmd_studio)


def cmd_studio(args: argparse.Namespace) -> int:
    from tuneforge.jobs.cli import open_store
    from tuneforge.serve.app import ServeSettings
    from tuneforge.serve.cli import bind_socket, keys_from_args, run_server
    from tuneforge.serve.engine import load_served_models
    from tuneforge.studio.app import create_studio_app

    keys = keys_from_args(args, no_auth_on_loopback=True)
    settings = ServeSettings(max_tokens=args.max_tokens, request_log=None)
    settings.check()
    store, jobs_dir = open_store(args)
    runs_dir = Path(args.runs_dir)
    sock = bind_socket(args.host, args.port)
    models = load_served_models(args.model, precision=args.precision, say=_say)
    app = create_studio_app(models, store, jobs_dir, runs_dir, settings, keys,
                            base_models=args.fine_tune_models, feedback_db=args.feedback_db)
    worker = _start_worker(store, jobs_dir) if args.worker else None
    app.state.studio.worker = worker
    try:
        run_server(app, sock, 10, say=_say, what="the studio", path="/studio",
                   details=f"runs {runs_dir}, jobs {jobs_dir}, keys "
                           f"{'off' if keys is None else len(keys)}, worker "
                           f"{'on' if worker else 'off'}", log_level="warning")
    finally:
        if worker is not None:
            worker.stop_event.set()  # a running job goes back to the queue, checkpoints kept
    return 0


def _start_worker(store, jobs_dir: Path):
    from tuneforge.jobs.worker import Worker, WorkerSettings

    worker = Worker(store, jobs_dir, WorkerSettings())
    threading.Thread(target=worker.run, name="studio-worker", daemon=True).start()
    return worker


def _say(message: str) -> None:
    import sys

    print(f"tuneforge studio: {message}", file=sys.stderr, flush=True)
