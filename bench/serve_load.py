"""Serving under load: `tuneforge serve` (continuous batching) against llama.cpp's server, on
the same model, with N concurrent `openai` clients on loopback.

    python -m bench.serve_load                         # built-in model: a 2-step LoRA run, 1,8,16 clients
    python -m bench.serve_load --run runs/demo         # an existing run folder
    python -m bench.serve_load --clients 1,8 --requests-per-client 2 --max-tokens 16   # a smoke run
    python -m bench.serve_load --contenders tuneforge,tuneforge-b1   # without llama.cpp

The model is a run folder (``--run``; default: a 2-step LoRA run on the built-in model, trained
once into ``runs/bench/serve-run``). ``tuneforge export RUN --format gguf --dtype
--gguf-type`` writes its GGUF (the adapter merged in), which llama.cpp serves; tuneforge serves
the run folder itself. Contenders (``--contenders``), each in its own server process:

- ``tuneforge``: ``tuneforge serve RUN --no-auth --port 0 --max-batch-size B --rate-limit 0
  --precision P`` (``--max-batch``, default 16; ``--precision``, default auto: bf16 where the
  CPU has it);
- ``tuneforge-b1``: the same with ``--max-batch-size 1`` (one request at a time);
- ``llama-cpp``: ``python -m llama_cpp.server --model GGUF --n_threads T --n_threads_batch T
  --n_ctx 2048 --interrupt_requests False`` (llama-cpp-python, the ``bench`` extra; ``T`` = the
  cores torch uses). Skipped, with the reason, when llama-cpp-python cannot be imported.

For each ``--clients`` level (default 1, 8 and 16) a server gets two warm-up requests, then that
many client threads send ``clients x --requests-per-client`` chat requests between them (at least
``--min-requests``): the prompts of bench/generate.py in a fixed order, greedy (llama.cpp also
gets ``repeat_penalty=1``: its default is 1.1), ``--max-tokens`` new tokens at most, every
``--stream-every``-th one streamed. No new request starts after ``--time-limit`` seconds.

Reported per contender and level: output tokens/s (``usage.completion_tokens`` of every answered
request over the wall time; llama-cpp-python's streams carry no usage, so a streamed request
there counts its chunks with text, one per token as it sends them), requests/s, latency
p50/p99, time to first token p50/p99 (streamed requests: send to the first chunk with text),
mean rows per decode step (tuneforge, from /metrics), 4xx/5xx counts, lost requests (no response; for tuneforge also no line in its request
log), whether every request's prompt token count equals the first contender's (the same prompt
ids; where both report it), and tokens/s as a multiple of llama.cpp's at the same level. Writes
``runs/bench/serve-<timestamp>.json``; exit status 1 if a request was lost or got a 5xx.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    RESULTS_DIR,
    ROOT,
    format_table,
    machine_info,
    timestamp,
    versions,
    worker_env,
    write_results,
)

COLUMNS = [
    ("contender", "server", ""),
    ("clients", "clients", "d"),
    ("requests", "requests", "d"),
    ("tokens_per_s", "tok/s", ".1f"),
    ("requests_per_s", "req/s", ".2f"),
    ("latency_p50_s", "p50 s", ".2f"),
    ("latency_p99_s", "p99 s", ".2f"),
    ("ttft_p50_s", "TTFT p50 s", ".2f"),
    ("ttft_p99_s", "TTFT p99 s", ".2f"),
    ("mean_batch", "rows/step", ".1f"),
    ("errors_4xx", "4xx", "d"),
    ("errors_5xx", "5xx", "d"),
    ("lost", "lost", "d"),
    ("same_prompt_tokens", "same prompt", ""),
    ("vs_llama_cpp", "x llama.cpp", ".2f"),
]
CONTENDERS = ("tuneforge", "tuneforge-b1", "llama-cpp")
LLAMA_CPP_PROBE = "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"


class Server:
    """A server process; its stderr is drained (and kept) by a thread. ``url`` ends in /v1."""

    def __init__(self, cmd: list[str], name: str, ready_url: str | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ready_url or ""
        threading.Thread(target=self._drain, daemon=True).start()
        if ready_url is None:
            started = self.ready.wait(600) and self.url
        else:
            started = self._poll(ready_url)
        if not started:
            self.proc.kill()
            raise SystemExit(f"{name} did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r" on (http://\S+)", line)
            if found and not self.url:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()  # the process ended

    def _poll(self, url: str) -> bool:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(url + "/models", timeout=5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def start_tuneforge(args, run: Path, max_batch: int, log_path: Path) -> Server:
    cmd = [sys.executable, "-m", "tuneforge", "serve", str(run), "--no-auth", "--port", "0",
           "--max-batch-size", str(max_batch), "--rate-limit", "0", "--max-queue", "4096",
           "--max-tokens", str(max(512, args.max_tokens)), "--precision", args.precision,
           "--request-log", str(log_path)]
    return Server(cmd, f"tuneforge (max batch {max_batch})")


def start_llama_cpp(args, gguf: Path) -> Server:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(args.threads)
    cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(gguf),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", threads, "--n_threads_batch", threads,
           "--interrupt_requests", "False"]
    return Server(cmd, "llama.cpp", ready_url=f"http://127.0.0.1:{port}/v1")


def llama_cpp_status(python: str) -> tuple[str | None, str]:
    """(llama-cpp-python's version, "") if ``python`` can run its server, else (None, why)."""
    proc = subprocess.run([python, "-c", LLAMA_CPP_PROBE], capture_output=True, text=True,
                          env=worker_env())
    if proc.returncode == 0:
        return proc.stdout.strip(), ""
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return None, (f"llama-cpp-python is not importable by {python} ({tail}); install the bench "
                  "extra (pip install '.[bench]', which builds it from source)")


# ----------------------------------------------------------------------------- the model


def ensure_run(args) -> Path:
    """The run folder to serve: ``--run``, or a 2-step LoRA run on ``--model`` trained once."""
    if args.run:
        return Path(args.run)
    folder = RESULTS_DIR / f"serve-run-{args.model.replace(':', '-')}"
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import chat_records, write_jsonl  # tests/helpers.py: small chat records

    from tuneforge.config import load_config
    from tuneforge.recipes.sft import run_sft

    print(f"training a 2-step LoRA run on {args.model} into {folder}", file=sys.stderr, flush=True)
    (RESULTS_DIR / "data").mkdir(parents=True, exist_ok=True)
    data = write_jsonl(RESULTS_DIR / "data" / "serve-run-train.jsonl", chat_records(16))
    run_sft(load_config(None, base={
        "output_dir": str(folder), "model": {"name": args.model},
        "adapter": {"method": "lora", "r": 8, "alpha": 16}, "data": {"train": str(data)},
        "train": {"batch_size": 2, "max_steps": 2, "lr": 1e-3, "eval_every": 0, "save_every": 0,
                  "progress": False},
    }), overwrite=True)
    return folder


def export_gguf(run: Path, gguf_type: str, out: Path) -> Path:
    """``tuneforge export RUN --format gguf --dtype TYPE --out OUT``, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "export", str(run), "--format",
                           "gguf", "--dtype", gguf_type, "--out", str(out), "--overwrite"],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True)
    found = sorted(out.glob("*.gguf"))
    if proc.returncode != 0 or not found:
        raise SystemExit(f"tuneforge export failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return found[0]


# ----------------------------------------------------------------------------- the load


def batch_stats(url: str) -> tuple[float, float]:
    """(decode steps, rows) so far, from a tuneforge server's tuneforge_batch_size histogram."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    count = re.search(r"^tuneforge_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^tuneforge_batch_size_sum (\S+)", text, re.M)
    return float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0


def one_request(client, model: str, messages: list[dict], max_tokens: int, stream: bool,
                extra: dict) -> dict:
    """Send one chat request; {status, latency_s, ttft_s, tokens, prompt_tokens, text} or
    {lost: reason}."""
    import openai

    start = time.perf_counter()
    out: dict = {"stream": stream}
    try:
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra or None)
            pieces = []
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    out.setdefault("ttft_s", time.perf_counter() - start)
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    out["tokens"] = chunk.usage.completion_tokens
                    out["prompt_tokens"] = chunk.usage.prompt_tokens
            out["text"] = "".join(pieces)
            if "tokens" not in out:  # llama-cpp-python's stream has no usage: a chunk a token
                out["tokens"], out["tokens_from_chunks"] = len(pieces), True
        else:
            reply = client.chat.completions.create(model=model, messages=messages,
                                                   max_tokens=max_tokens, temperature=0,
                                                   extra_body=extra or None)
            out["tokens"] = reply.usage.completion_tokens
            out["prompt_tokens"] = reply.usage.prompt_tokens
            out["text"] = reply.choices[0].message.content
        out["status"] = 200
    except openai.APIStatusError as err:
        out["status"] = err.status_code
    except openai.APIError as err:  # connection reset, timeout: no response at all
        out["lost"] = f"{type(err).__name__}: {err}"
    out["latency_s"] = time.perf_counter() - start
    return out


def run_load(url: str, model: str, prompts: list[str], clients: int, requests: int, args,
             extra: dict) -> tuple[list[dict], float]:
    """``clients`` threads share ``requests`` requests; (results by request index, seconds)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900)
    counter = itertools.count()
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + args.time_limit

    def client_loop() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= requests:
                return
            messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
            stream = args.stream_every > 0 and i % args.stream_every == args.stream_every - 1
            result = one_request(client, model, messages, args.max_tokens, stream, extra)
            result["index"] = i
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r["index"]), time.perf_counter() - start


def measure(args, contender: str, run: Path, gguf: Path | None, prompts: list[str]) -> list[dict]:
    """One server for ``contender``; a row per clients level."""
    tuneforge = contender.startswith("tuneforge")
    log_path = RESULTS_DIR / f"serve-requests-{contender}-{timestamp()}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{contender}: starting", file=sys.stderr, flush=True)
    if tuneforge:
        server = start_tuneforge(args, run, 1 if contender == "tuneforge-b1" else args.max_batch,
                                 log_path)
    else:
        server = start_llama_cpp(args, gguf)
    extra = {} if tuneforge else {"repeat_penalty": 1.0}
    import openai

    warm = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=900)
    model = warm.models.list().data[0].id
    for stream in (False, True):  # first-call allocations, kernel selection
        one_request(warm, model, [{"role": "user", "content": prompts[0]}], 8, stream, extra)
    rows = []
    for clients in args.clients:
        requests = max(args.min_requests, clients * args.requests_per_client)
        print(f"{contender}: {clients} clients, {requests} requests", file=sys.stderr, flush=True)
        before = batch_stats(server.url) if tuneforge else None
        results, seconds = run_load(server.url, model, prompts, clients, requests, args, extra)
        after = batch_stats(server.url) if tuneforge else None
        rows.append(summarise(contender, clients, results, seconds, before, after))
    exit_code = server.stop()
    if tuneforge:  # every answered request has a line in the request log
        logged = len(log_path.read_text().splitlines()) - 3  # models.list + 2 warm-ups
        answered = sum(r["answered"] for r in rows)
        for row in rows:
            row["server_log_lines"] = logged
        rows[-1]["lost"] += max(0, answered - logged)
    for row in rows:
        row["server_exit_code"] = exit_code
    return rows


def summarise(contender, clients, results, seconds, before, after) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    tokens = sum(r.get("tokens") or 0 for r in ok)
    answered = sum("status" in r for r in results)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    row = {
        "contender": contender, "clients": clients, "requests": len(results), "ok": len(ok),
        "seconds": round(seconds, 2), "requests_per_s": len(results) / seconds,
        "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_samples": len(ttft),
        "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
        "tokens_from_chunks": sum(bool(r.get("tokens_from_chunks")) for r in ok),
        "errors_4xx": sum(400 <= r.get("status", 0) < 500 for r in results),
        "errors_5xx": sum(r.get("status", 0) >= 500 for r in results),
        "lost": len(results) - answered, "answered": answered,
        "lost_reasons": [r["lost"] for r in results if "lost" in r][:5],
        "prompt_tokens": [r.get("prompt_tokens") for r in results],
        "texts": [r.get("text") for r in results],
    }
    if before is not None:
        steps, rows = after[0] - before[0], after[1] - before[1]
        row["mean_batch"] = rows / steps if steps else None
        row["decode_steps"] = int(steps)
    return row


def compare_rows(rows: list[dict]) -> None:
    """Same prompt token counts and texts as the first contender at the same level; tokens/s as
    a multiple of llama.cpp's."""
    for row in rows:
        peers = [r for r in rows if r["clients"] == row["clients"]]
        first, cpp = peers[0], next((r for r in peers if r["contender"] == "llama-cpp"), None)
        pairs = [(a, b) for a, b in zip(first["prompt_tokens"], row["prompt_tokens"])
                 if a is not None and b is not None]  # llama.cpp's streams have no usage
        row["same_prompt_tokens"] = "yes" if all(a == b for a, b in pairs) else "no"
        row["same_text_as_first"] = sum(a == b and a is not None for a, b in
                                        zip(first["texts"], row["texts"]))
        row["vs_llama_cpp"] = (row["tokens_per_s"] / cpp["tokens_per_s"]
                               if cpp and cpp["tokens_per_s"] else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_load",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="a run folder (default: a 2-step LoRA run)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct",
                    help="base model of the default run")
    ap.add_argument("--contenders", default="tuneforge,llama-cpp",
                    help=f"comma-separated: {', '.join(CONTENDERS)}")
    ap.add_argument("--clients", default="1,8,16", help="concurrent clients, one level each")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-every", type=int, default=2, help="stream every k-th request (0: never)")
    ap.add_argument("--max-batch", type=int, default=16, help="tuneforge's --max-batch-size")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    ap.add_argument("--gguf-type", default="f16", help="tuneforge export --dtype for llama.cpp")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads (default: torch's, i.e. the cores)")
    ap.add_argument("--llama-cpp-python", default=sys.executable,
                    help="the interpreter that runs llama_cpp.server")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds per level after which no new request starts")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contender(s) {sorted(unknown)}; use {', '.join(CONTENDERS)}")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    sys.path.insert(0, str(ROOT))
    from bench.generate import PROMPTS

    skipped: dict[str, str] = {}
    cpp_version = None
    if "llama-cpp" in contenders:
        cpp_version, why = llama_cpp_status(args.llama_cpp_python)
        if cpp_version is None:
            skipped["llama-cpp"] = why
            contenders.remove("llama-cpp")
            print(f"llama-cpp: skipped: {why}", file=sys.stderr, flush=True)
    run = ensure_run(args)
    gguf = None
    if "llama-cpp" in contenders:
        gguf = export_gguf(run, args.gguf_type,
                           Path(tempfile.mkdtemp(prefix="tuneforge-serve-gguf-")) / "gguf")
    rows = [row for c in contenders for row in measure(args, c, run, gguf, PROMPTS)]
    compare_rows(rows)
    print(format_table(rows, COLUMNS))
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    path = write_results("serve", {
        "bench": "serve", "rows": rows, "settings": {**vars(args), "run": str(run)},
        "gguf": str(gguf) if gguf else None, "skipped": skipped, "machine": machine_info(),
        "versions": {**versions("torch", "transformers", "fastapi", "uvicorn", "openai"),
                     "llama-cpp-python": cpp_version},
    })
    print(f"results: {path.relative_to(ROOT)}")
    # llama-cpp-python's server does not catch SIGTERM: it ends by the signal
    clean = {"llama-cpp": (0, -signal.SIGTERM)}
    bad = [r for r in rows if r["errors_5xx"] or r["lost"]
           or r["server_exit_code"] not in clean.get(r["contender"], (0,))]
    for r in bad:
        print(f"FAILED: {r['contender']} at {r['clients']} clients: 5xx {r['errors_5xx']}, lost "
              f"{r['lost']} {r['lost_reasons']}, server exit {r['server_exit_code']}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
