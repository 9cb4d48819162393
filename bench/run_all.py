"""Every benchmark, one after the other, then one combined table (``make bench`` runs this).

    python -m bench.run_all                       # sft lora, sft full, dpo, generate, serve, rl, eval
    python -m bench.run_all --steps 3 --warmup 1  # a quick smoke run of the same

The matmul peak is measured once and handed to every benchmark (``--peak-file``). Each benchmark
runs as its own process, prints its own table and writes ``runs/bench/<name>-<timestamp>.json``;
the combined table is built from the JSON files written during this run. A benchmark's JSON is
read as ``{"bench": name, "rows": [{"contender": ..., "tokens_per_s": ..., ...}]}`` (or
bench/generate.py's ``{"benchmark": name, "results": [{"name": ..., "batch": ..., ...}]}``); the
columns below are shown where a row has them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    ROOT,
    Column,
    best_peak,
    format_table,
    run_worker,
    worker_env,
    write_results,
)

COMBINED: list[Column] = [
    ("bench", "bench", ""),
    ("contender", "contender", ""),
    ("clients", "clients", "d"),  # bench/serve_load.py: concurrent clients
    ("tokens_per_s", "tok/s", ".1f"),
    ("pairs_per_s", "pairs/s", ".2f"),  # bench/dpo.py
    ("trained_tokens_per_s", "trained tok/s", ".1f"),
    ("peak_rss_gb", "peak RSS GB", ".2f"),
    ("first_step_s", "first step s", ".1f"),
    ("final_loss", "final loss", ".4f"),
    ("mfu_bf16_pct", "MFU bf16 %", ".1f"),
    ("mfu_fp32_pct", "MFU fp32 %", ".1f"),
    ("vs_trl_default", "x trl-default", ".2f"),
    ("vs_trl_fast", "x trl-fast", ".2f"),
    ("speedup", "x baseline", ".2f"),  # bench/generate.py: tok/s over model.generate one at a time
    ("examples_per_s", "ex/s", ".1f"),  # bench/eval.py (its speedup: over one prompt at a time)
    ("vs_forward", "x forward", ".2f"),  # bench/eval.py: tok/s over a plain forward of the same tokens
    ("vs_llama_cpp", "x llama.cpp", ".2f"),  # bench/serve_load.py: tok/s over llama.cpp's server
    ("vs_serve", "x serve", ".2f"),  # bench/rl.py: rollout tok/s over the serve engine's
]


def benches(args, peak_file: Path | None) -> list[tuple[str, list[str]]]:
    sft_args = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if args.contenders:
        sft_args += ["--contenders", args.contenders]
    if peak_file is not None:
        sft_args += ["--peak-file", str(peak_file)]
    out = [("sft-lora", ["-m", "bench.sft", "--method", "lora", *sft_args]),
           ("sft-full", ["-m", "bench.sft", "--method", "full", *sft_args])]
    # DPO keeps its own steps and batch (pairs): TRL's DPOTrainer is slow on a CPU
    dpo_args = ["--warmup", str(min(args.warmup, 1))]
    if peak_file is not None:
        dpo_args += ["--peak-file", str(peak_file)]
    out.append(("dpo", ["-m", "bench.dpo", *dpo_args]))
    if (ROOT / "bench" / "generate.py").is_file():  # its own defaults; writes runs/bench/generate-*.json
        out.append(("generate", ["-m", "bench.generate"]))
    # its own defaults (tuneforge and llama.cpp at 1, 8, 16 clients); runs/bench/serve-*.json
    out.append(("serve", ["-m", "bench.serve_load"]))
    # a GRPO and a PPO step split into generation, scoring, update; runs/bench/rl-*.json
    out.append(("rl", ["-m", "bench.rl", "--recipes", "grpo,ppo"]))
    # its own defaults (120 support tickets, 0 and 3 shots); writes runs/bench/eval-*.json
    out.append(("eval", ["-m", "bench.eval"]))
    if args.only:
        wanted = set(args.only.split(","))
        out = [b for b in out if b[0] in wanted]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contenders", default=None, help="for the sft benchmarks (default: theirs)")
    p.add_argument("--only", default=None, help="comma-separated: sft-lora, sft-full, dpo, generate, serve, rl, eval")
    p.add_argument("--peak-sizes", default="2048,4096", help="'none' to skip the matmul peak")
    args = p.parse_args(argv)

    started = time.time()
    peak_file = None
    sizes = [s for s in args.peak_sizes.split(",") if s.strip().isdigit()]
    if sizes:
        print(f"bench: measuring matmul peak ({', '.join(sizes)})", file=sys.stderr, flush=True)
        peak = run_worker("bench.common", ["peak", "--sizes", ",".join(sizes)], label="peak")
        if "error" in peak:
            print(f"bench: {peak['error']}; MFU will be missing", file=sys.stderr)
        else:
            peak_file = write_results("peak", peak)

    failed = []
    for name, cmd in benches(args, peak_file):
        print(f"\n===== {name}: python {' '.join(cmd)}", flush=True)
        rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=worker_env()).returncode
        if rc != 0:
            failed.append(f"{name} (exit status {rc})")

    rows = []
    for path in sorted(RESULTS_DIR.glob("*.json"), key=lambda q: q.stat().st_mtime):
        if path.stat().st_mtime < started or path == peak_file:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        bench = payload.get("bench") or payload.get("benchmark") or path.stem.rsplit("-", 2)[0]
        for row in payload.get("rows") or payload.get("results") or []:
            if isinstance(row, dict):
                row = {"bench": bench, **row}
                if "contender" not in row and "name" in row:  # bench/generate.py's rows
                    batch = f" (batch {row['batch']})" if "batch" in row else ""
                    row["contender"] = f"{row['name']}{batch}"
                rows.append(row)
    print("\n===== all benchmarks")
    if peak_file is not None:
        # measured again now: the best of before and after; MFU rescaled where it rose
        before = json.loads(peak_file.read_text())
        peak = best_peak(before, run_worker("bench.common", ["peak", "--sizes", ",".join(sizes)],
                                            label="peak"))
        for dtype, key in (("float32", "mfu_fp32_pct"), ("bfloat16", "mfu_bf16_pct")):
            scale = before[dtype]["gflops"] / peak[dtype]["gflops"]
            for row in rows:
                if row["bench"] in ("sft-lora", "sft-full", "dpo") and row.get(key) is not None:
                    row[key] *= scale
        print(f"matmul peak ({peak['threads']} threads, best of before and after): "
              f"fp32 {peak['float32']['gflops']:.1f} GFLOP/s, bf16 {peak['bfloat16']['gflops']:.1f} GFLOP/s")
    print(format_table(rows, COMBINED) if rows else "(no results)")
    if rows:
        path = write_results("all", {"bench": "all", "rows": rows, "table_columns": COMBINED,
                                     "peak": peak if peak_file is not None else None})
        print(f"\nresults: {path.relative_to(ROOT)}")
    for f in failed:
        print(f"failed: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
