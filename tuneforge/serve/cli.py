"""``tuneforge serve`` and ``tuneforge monitor``; the main CLI calls :func:`register`."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, TuneforgeError


def register(subparsers: Any) -> None:
    """Add the ``serve`` and ``monitor`` commands to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a model or a run over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) "
                    "with dynamic batching, API keys, rate limits, /health, /metrics and a "
                    "JSONL request log. Ctrl-C (SIGINT/SIGTERM) lets in-flight requests finish.")
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="a run folder, builtin:NAME, tiny:ARCH, a model folder or .gguf")
    p.add_argument("--adapters", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="more LoRA adapters on the same base (run or PEFT folders), each served "
                        "as model NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-keys", metavar="FILE",
                   help="keys, one per line as NAME:KEY or KEY (also $TUNEFORGE_API_KEYS, "
                        "comma-separated)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without a key (loopback hosts only)")
    p.add_argument("--rate-limit", type=float, default=600.0, metavar="RPM",
                   help="requests per minute per key, 0 = unlimited (default 600)")
    p.add_argument("--rate-burst", type=int, default=60, help="requests a key may send at once")
    p.add_argument("--auth-fail-limit", type=float, default=10.0, metavar="PER_MIN",
                   help="failed authentications a minute per client address once its "
                        "--auth-fail-burst is spent; beyond that every request from the address "
                        "gets 429 until its allowance refills; 0 = unlimited (default 10)")
    p.add_argument("--auth-fail-burst", type=int, default=10,
                   help="failed authentications an address may make at once (default 10)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="most new tokens a request may ask for, per choice (default 512)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000,
                   help="larger bodies get 413; JSON nested over 64 levels gets 400")
    p.add_argument("--max-upload-bytes", type=int, default=100_000_000,
                   help="larger multipart/form-data bodies (file uploads) get 413 "
                        "(default 100 MB)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="rows generated together (1 = one request at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long an idle worker waits for more requests to batch")
    p.add_argument("--max-queue", type=int, default=256,
                   help="choices waiting at most; beyond it requests get 503")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32: exact, a request's greedy output never depends on its batch; "
                        "bf16: faster on a bf16 CPU, greedy near-ties may flip")
    p.add_argument("--request-log", metavar="PATH",
                   help="JSONL request log (default: RUN/requests.jsonl for a run, else "
                        "./requests.jsonl)")
    p.add_argument("--no-request-log", action="store_true")
    p.add_argument("--log-prompts", action="store_true",
                   help="also log prompt and completion texts (off: they may be personal data)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to wait for in-flight requests at shutdown")
    p.set_defaults(func=cmd_serve)

    m = subparsers.add_parser(
        "monitor", help="summarise a serve request log: volume, errors, latency, drift",
        description="Volume, error rate, latency percentiles and output-length drift over time "
                    "from the JSONL request log of `tuneforge serve`, with a plot.")
    m.add_argument("log", metavar="LOG", help="requests.jsonl written by tuneforge serve")
    m.add_argument("--bucket", default="auto",
                   help="time bucket: auto, or a duration such as 30s, 5m, 1h, 1d")
    m.add_argument("--plot", metavar="PNG", help="where to save the plot (default: LOG.png)")
    m.add_argument("--no-plot", action="store_true")
    m.add_argument("--json", action="store_true", help="print the summary as JSON")
    m.set_defaults(func=cmd_monitor)


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.serve.engine import load_served_models, parse_adapter_args

    settings = settings_from_args(args, request_log=_request_log_path(args))
    adapters = parse_adapter_args(args.adapters)
    keys = keys_from_args(args)
    sock = bind_socket(args.host, args.port)  # before the slow model load: fail fast on a busy port
    models = load_served_models(args.model, adapters, precision=args.precision, say=_say)
    from tuneforge.serve.app import create_app

    app = create_app(models, settings, keys)
    run_server(app, sock, args.shutdown_timeout, say=_say, what=", ".join(models.ids),
               details=f"auth {'off' if keys is None else f'on, {len(keys)} keys'}, request "
                       f"log {settings.request_log or 'off'}")
    return 0


def settings_from_args(args: argparse.Namespace, request_log: Path | None):
    """The ServeSettings of ``serve``'s flags (also ``jobs serve``'s), checked."""
    from tuneforge.serve.app import ServeSettings

    settings = ServeSettings(
        max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, rate_limit=args.rate_limit, rate_burst=args.rate_burst,
        auth_fail_limit=args.auth_fail_limit, auth_fail_burst=args.auth_fail_burst,
        max_upload_bytes=args.max_upload_bytes,
        request_log=None if args.no_request_log else request_log,
        log_prompts=args.log_prompts,
    )
    settings.check()
    return settings


def keys_from_args(args: argparse.Namespace, *, no_auth_on_loopback: bool = False):
    """The API keys of ``--api-keys`` / $TUNEFORGE_API_KEYS, or None (no authentication):
    with ``--no-auth``, or with no keys at all when ``no_auth_on_loopback`` (the studio).
    Either way only on a loopback host: anything else is a ConfigError."""
    from tuneforge.serve.auth import ENV_VAR, load_keys

    keys = None if getattr(args, "no_auth", False) else load_keys(args.api_keys)
    if keys is not None and not len(keys):
        if not no_auth_on_loopback:
            raise ConfigError(f"no API keys: give --api-keys FILE or set ${ENV_VAR} "
                              "(or --no-auth for a server on loopback only)")
        keys = None
    if keys is None and not is_loopback(args.host):
        raise ConfigError(f"without API keys --host {args.host} would serve anyone who can "
                          f"reach it: give --api-keys FILE (or set ${ENV_VAR}); without keys it is "
                          "allowed on a loopback host only (127.0.0.1, ::1, localhost)")
    return keys


def run_server(app, sock: socket.socket, shutdown_timeout: float, *, say, what: str,
               details: str, path: str = "/v1", log_level: str = "info") -> None:
    """Listen on ``sock``, say where, and serve ``app`` until SIGINT/SIGTERM, letting in-flight
    requests finish (at most ``shutdown_timeout`` seconds)."""
    import uvicorn

    # Listen before saying where: a client that connects at once waits in the backlog until
    # uvicorn accepts, instead of being refused while uvicorn starts up.
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    say(f"serving {what} on http://{shown}:{port}{path} ({details}); Ctrl-C stops after "
        "in-flight requests finish")
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    _graceful_server_class()(config).run(sockets=[sock])
    say("stopped")


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that after a graceful stop on SIGINT/SIGTERM the process
        exits normally (status 0) instead of re-raising the signal."""

        @contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def _request_log_path(args) -> Path:
    if args.request_log:
        return Path(args.request_log)
    from tuneforge.models.runs import find_run_output

    model = Path(args.model)
    output = find_run_output(model) if model.is_dir() else None
    if output is not None:
        run_dir = output.parent if output.name in ("adapter", "model") else output
        return run_dir / "requests.jsonl"
    return Path("requests.jsonl")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port) for uvicorn; TuneforgeError if not.

    Made with its protocol number (IPPROTO_TCP): asyncio turns Nagle off only on such sockets'
    connections, and with Nagle on every response waits ~40 ms for a delayed ACK.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be within 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise TuneforgeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.set_inheritable(True)
    return sock


def _say(message: str) -> None:
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)


def cmd_monitor(args: argparse.Namespace) -> int:
    from tuneforge.serve.monitor import plot_summary, read_log, render_summary, summarise

    records, skipped = read_log(args.log)
    summary = summarise(records, bucket=args.bucket)
    summary["skipped_lines"] = skipped
    if not args.no_plot:
        path = Path(args.plot) if args.plot else Path(f"{args.log}.png")
        plot_summary(summary, path)
        summary["plot"] = str(path)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        print(render_summary(summary))
    return 0
