"""Serving under load: N concurrent `openai` clients against `tuneforge serve` on loopback,
dynamic batching against one request at a time.

    python -m bench.serve_load                                  # built-in model, defaults below
    python -m bench.serve_load --clients 8 --requests 16 --max-tokens 32    # a quick run
    python -m bench.serve_load --precision bf16 --max-batch-sizes 1,8,16

For each ``--max-batch-sizes`` entry (default ``1,16``: one at a time, then batched) a fresh
server runs in its own process (``tuneforge serve MODEL --no-auth --port 0 --max-batch-size B
--rate-limit 0``, fp32 by default: the server's default), gets two warm-up requests, then
``--clients`` client threads send ``--requests`` chat requests between them (greedy,
``--max-tokens`` new tokens at most, every ``--stream-every``-th one streamed), the prompts of
bench/generate.py in a fixed order. Bounded: no new request starts after ``--time-limit``
seconds; in-flight ones finish. Then the server gets SIGTERM and must exit cleanly.

Reported per server: requests/s, latency p50/p99 (send to last byte, client side), time to
first token p50 (streamed requests), generated tokens/s (from ``usage``), mean rows per batch
(from /metrics), 4xx/5xx errors and *lost* requests (sent, but no response, or no line in the
server's request log), and the speed-up in tokens/s over max batch 1. Greedy fp32 output does
not depend on the batch, so every server generates the same tokens for the same requests.
Writes ``runs/bench/serve-<timestamp>.json``; exit status 1 if any request was lost or got a
5xx.
"""

from __future__ import annotations

import argparse
import itertools
import re
import signal
import subprocess
import sys
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
    ("requests", "requests", "d"),
    ("seconds", "seconds", ".1f"),
    ("requests_per_s", "req/s", ".2f"),
    ("latency_p50_s", "p50 s", ".2f"),
    ("latency_p99_s", "p99 s", ".2f"),
    ("ttft_p50_s", "TTFT p50 s", ".2f"),
    ("tokens_per_s", "tok/s", ".1f"),
    ("mean_batch", "rows/batch", ".1f"),
    ("errors_4xx", "4xx", "d"),
    ("errors_5xx", "5xx", "d"),
    ("lost", "lost", "d"),
    ("speedup", "x batch 1", ".2f"),
]


class Server:
    """`tuneforge serve` in its own process; its stderr is drained (and kept) by a thread."""

    def __init__(self, args, max_batch: int, log_path: Path) -> None:
        cmd = [sys.executable, "-m", "tuneforge", "serve", args.model, "--no-auth", "--port", "0",
               "--max-batch-size", str(max_batch), "--rate-limit", "0", "--max-queue", "4096",
               "--max-tokens", str(max(512, args.max_tokens)), "--precision", args.precision,
               "--request-log", str(log_path)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(600) or not self.url:
            self.proc.kill()
            raise SystemExit("server did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r" on (http://\S+)", line)
            if found and not self.url:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()  # the process ended

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def batch_stats(url: str) -> tuple[float, float]:
    """(batches, rows) so far, from the server's tuneforge_batch_size histogram."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    count = re.search(r"^tuneforge_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^tuneforge_batch_size_sum (\S+)", text, re.M)
    return float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0


def one_request(client, model: str, messages: list[dict], max_tokens: int, stream: bool) -> dict:
    """Send one chat request; {status, latency_s, ttft_s, tokens} or {lost: reason}."""
    import openai

    start = time.perf_counter()
    out: dict = {"stream": stream}
    try:
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content and "ttft_s" not in out:
                    out["ttft_s"] = time.perf_counter() - start
                if chunk.usage is not None:
                    out["tokens"] = chunk.usage.completion_tokens
        else:
            reply = client.chat.completions.create(model=model, messages=messages,
                                                   max_tokens=max_tokens, temperature=0)
            out["tokens"] = reply.usage.completion_tokens
        out["status"] = 200
    except openai.APIStatusError as err:
        out["status"] = err.status_code
    except openai.APIError as err:  # connection reset, timeout: no response at all
        out["lost"] = f"{type(err).__name__}: {err}"
    out["latency_s"] = time.perf_counter() - start
    return out


def run_load(url: str, model: str, prompts: list[str], args) -> tuple[list[dict], float]:
    """``args.clients`` threads share ``args.requests`` requests; (results, wall seconds)."""
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
            if i >= args.requests:
                return
            messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
            stream = args.stream_every > 0 and i % args.stream_every == args.stream_every - 1
            result = one_request(client, model, messages, args.max_tokens, stream)
            with lock:
                results.append(result)
                done = len(results)
            if done % max(1, args.requests // 8) == 0:
                print(f"  {done}/{args.requests} requests", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def measure(args, max_batch: int, prompts: list[str]) -> dict:
    log_path = RESULTS_DIR / f"serve-requests-b{max_batch}-{timestamp()}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"server with max batch {max_batch}: starting", file=sys.stderr, flush=True)
    server = Server(args, max_batch, log_path)
    import openai

    warm = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=900)
    model = warm.models.list().data[0].id
    for stream in (False, True):  # first-call allocations, kernel selection
        one_request(warm, model, [{"role": "user", "content": prompts[0]}], 8, stream)
    before = batch_stats(server.url)
    results, seconds = run_load(server.url, model, prompts, args)
    after = batch_stats(server.url)
    exit_code = server.stop()
    logged = len(log_path.read_text().splitlines()) - 3  # models.list + 2 warm-ups
    return summarise(results, seconds, max_batch, before, after, logged, exit_code)


def summarise(results, seconds, max_batch, before, after, logged, exit_code) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    tokens = sum(r.get("tokens", 0) for r in ok)
    batches, rows = after[0] - before[0], after[1] - before[1]
    answered = sum("status" in r for r in results)
    return {
        "contender": f"max batch {max_batch}", "max_batch": max_batch,
        "requests": len(results), "ok": len(ok), "seconds": round(seconds, 2),
        "requests_per_s": len(results) / seconds,
        "latency_p50_s": float(np.percentile(latency, 50)) if latency else None,
        "latency_p99_s": float(np.percentile(latency, 99)) if latency else None,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
        "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
        "mean_batch": rows / batches if batches else None, "batches": int(batches),
        "errors_4xx": sum(400 <= r.get("status", 0) < 500 for r in results),
        "errors_5xx": sum(r.get("status", 0) >= 500 for r in results),
        "lost": (len(results) - answered) + max(0, answered - logged),
        "lost_reasons": [r["lost"] for r in results if "lost" in r][:5],
        "server_log_lines": logged, "server_exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_load",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48, help="requests per server")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-every", type=int, default=2, help="stream every k-th request (0: never)")
    ap.add_argument("--max-batch-sizes", default="1,16")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds per server after which no new request starts")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.max_batch_sizes.split(",") if s]
    sys.path.insert(0, str(ROOT))
    from bench.generate import PROMPTS

    rows = [measure(args, b, PROMPTS) for b in sizes]
    base = next((r for r in rows if r["max_batch"] == 1), None)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    print(format_table(rows, COLUMNS))
    path = write_results("serve", {
        "bench": "serve", "rows": rows, "settings": vars(args), "machine": machine_info(),
        "versions": versions("torch", "transformers", "fastapi", "uvicorn", "openai"),
    })
    print(f"results: {path.relative_to(ROOT)}")
    bad = [r for r in rows if r["errors_5xx"] or r["lost"] or r["server_exit_code"] != 0]
    for r in bad:
        print(f"FAILED: {r['contender']}: 5xx {r['errors_5xx']}, lost {r['lost']} "
              f"{r['lost_reasons']}, server exit {r['server_exit_code']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
