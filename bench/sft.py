"""Supervised fine-tuning throughput: tuneforge against TRL's SFTTrainer, in one run.

    python -m bench.sft --method lora                 # 20 steps, 2 of them warm-up, batch 8
    python -m bench.sft --method full --steps 3 --warmup 1 --contenders tuneforge

Every contender trains the same model (``builtin:smollm2-135m-instruct``, loaded with tuneforge's
loader), on the same synthetic chat data (tokenised once, by tuneforge's renderer, so every
contender trains the very same tokens and labels), with the same LoRA configuration, learning rate,
schedule, batch size and number of optimizer steps, each in its own fresh process. The steps
after the warm-up steps are timed. See bench/README.md for what the columns mean.

Contenders:

- ``tuneforge``: :func:`tuneforge.train.loop.train` with ``bf16="auto"`` (its default).
- ``tuneforge-gc``: the same with ``gradient_checkpointing: true`` (less memory, more compute;
  TRL's SFTConfig turns it on by default).
- ``tuneforge-compile``: ``tuneforge`` with ``compile: true`` (decoder layers through
  torch.compile; the first step compiles, which the ``first step s`` column shows).
- ``tuneforge-compile-gc``: both (the memory-first setting).
- ``trl-default``: SFTTrainer with SFTConfig's defaults except what must match the others
  (fp32, as the performance issue measured it). Examples come in tuneforge's order.
- ``trl-fast``: the same plus ``bf16=True, packing=True`` (bfd packing, which turns on TRL's
  padding-free collator).
- ``trl-fast-nogc`` (not run by default): ``trl-fast`` with ``gradient_checkpointing=False``
  (TRL turns gradient checkpointing on by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Runs as `python -m bench.sft` from the repository root (the runner sets PYTHONPATH too).
from bench.common import (
    Column,
    attn_pairs,
    best_peak,
    cold_compile_cache,
    ensure_chat_dataset,
    format_table,
    machine_info,
    mfu,
    model_shape,
    peak_rss_gb,
    report,
    run_worker,
    train_flops,
    trl_step_timer,
    versions,
    write_results,
)

MODEL = "builtin:smollm2-135m-instruct"
CONTENDERS = ("tuneforge", "tuneforge-gc", "tuneforge-compile", "tuneforge-compile-gc",
              "trl-default", "trl-fast", "trl-fast-nogc")
DEFAULT_CONTENDERS = "tuneforge,tuneforge-gc,tuneforge-compile,tuneforge-compile-gc,trl-default,trl-fast"
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
# dropout 0 for every contender: tuneforge's default (drawing masks costs ~15% of a CPU LoRA step)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")

COLUMNS: list[Column] = [
    ("contender", "contender", ""),
    ("tokens_per_s", "tok/s", ".1f"),
    ("trained_tokens_per_s", "trained tok/s", ".1f"),
    ("seconds_per_step", "s/step", ".2f"),
    ("first_step_s", "first step s", ".1f"),
    ("peak_rss_gb", "peak RSS GB", ".2f"),
    ("final_loss", "final loss", ".4f"),
    ("mfu_bf16_pct", "MFU bf16 %", ".1f"),
    ("mfu_fp32_pct", "MFU fp32 %", ".1f"),
    ("vs_trl_default", "x trl-default", ".2f"),
    ("vs_trl_fast", "x trl-fast", ".2f"),
]


# --------------------------------------------------------------------------------------------
# Workers (run in their own process: `python -m bench.sft --worker NAME ...`)
# --------------------------------------------------------------------------------------------


def _load_train_set(args, tokenizer):
    from tuneforge.data.formats import load_examples
    from tuneforge.data.render import render_sft

    return [render_sft(ex, tokenizer, args.max_length) for ex in load_examples(args.data, "chat")]


def _step_indices(n: int, args) -> list[list[int]]:
    """Example indices of each optimizer step, in tuneforge's data order."""
    from tuneforge.train.loop import global_batches

    stream = global_batches(n, args.batch, args.seed)
    return [next(stream) for _ in range(args.steps)]


def _summarise(args, shape: dict, steps: list[dict], seconds: float, extra: dict) -> dict:
    """The worker's report. ``steps``: per optimizer step ``tokens``, ``trained_tokens``,
    ``attn_pairs``, ``loss``, ``seconds``; ``seconds``: wall time of the timed steps."""
    timed = steps[args.warmup:]
    tokens = sum(s["tokens"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    pairs = sum(s["attn_pairs"] for s in timed)
    flops = train_flops(shape, args.method, tokens, trained, pairs)
    return {
        "contender": args.worker, "method": args.method, "steps": len(steps),
        "warmup": args.warmup, "timed_steps": len(timed), "seconds": seconds,
        "tokens": tokens, "trained_tokens": trained, "attn_pairs": pairs,
        "tokens_per_s": tokens / seconds if seconds else None,
        "trained_tokens_per_s": trained / seconds if seconds else None,
        "seconds_per_step": seconds / len(timed) if timed else None,
        "first_step_s": steps[0]["seconds"] if steps else None,
        "train_flops": flops, "peak_rss_gb": peak_rss_gb(),
        "final_loss": steps[-1]["loss"] if steps else None,
        "losses": [s["loss"] for s in steps],
        "step_seconds": [s["seconds"] for s in steps],
        "step_tokens": [s["tokens"] for s in steps],
        "shape": shape, "versions": versions(*PACKAGES), **extra,
    }


def work_tuneforge(args) -> dict:
    from tuneforge.config import AdapterConfig, TrainConfig
    from tuneforge.models.adapters import prepare_model
    from tuneforge.models.loading import load_model
    from tuneforge.train.loop import make_accelerator, train, use_bf16

    model, tokenizer = load_model(args.model, seed=args.seed)
    model.config.use_cache = False
    train_set = _load_train_set(args, tokenizer)
    adapter = AdapterConfig(method="full") if args.method == "full" else AdapterConfig(method="lora", **LORA)
    model = prepare_model(model, adapter, seed=args.seed)
    shape = model_shape(model)
    cfg = TrainConfig(batch_size=args.batch, grad_accum=1, max_steps=args.steps, lr=args.lr,
                      schedule="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      bf16="auto", progress=False, eval_every=0, save_every=0, seed=args.seed,
                      log_every=1, gradient_checkpointing=args.worker.endswith("-gc"),
                      compile="true" if "-compile" in args.worker else "false")
    if cfg.compile == "true":  # a cold compilation, as a user's first run has (see cold_compile_cache)
        cold_compile_cache()
    acc = make_accelerator(cfg, model)
    rss_loaded = peak_rss_gb()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        result = train(model, train_set, [], cfg, Path(tmp), accelerator=acc)
    records = [r for r in result.history if "loss" in r]
    indices = _step_indices(len(train_set), args)
    steps, previous = [], 0.0
    for k, r in enumerate(records):
        steps.append({"tokens": r["tokens"], "trained_tokens": r["trained_tokens"],
                      "attn_pairs": attn_pairs([len(train_set[i]) for i in indices[k]]),
                      "loss": r["loss"], "seconds": r["elapsed_s"] - previous})
        previous = r["elapsed_s"]
    # elapsed_s is cumulative from the start of the loop, taken at the end of each step
    start = records[args.warmup - 1]["elapsed_s"] if args.warmup else 0.0
    seconds = records[-1]["elapsed_s"] - start
    options = {"bf16": use_bf16(cfg.bf16, acc.device), "packing": "padding-free per micro-batch",
               "gradient_checkpointing": cfg.gradient_checkpointing, "compile": cfg.compile == "true",
               "lr": cfg.lr,
               "schedule": cfg.schedule}
    return _summarise(args, shape, steps, seconds, {"options": options, "rss_loaded_gb": rss_loaded})


class _CountingCollator:
    """Wraps TRL's collator and records, for every batch it builds, in order: non-padding input
    tokens, trained tokens (labels != -100 after the one-token shift, i.e. the tokens the loss
    is taken on) and the causal-attention pairs of its sequences (packed rows carry their
    sequences' lengths in ``seq_lengths``)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[dict] = []

    def __call__(self, examples):
        out = self.inner(examples)
        lengths = []
        for ex in examples:
            seq = ex.get("seq_lengths")
            if seq is not None:
                lengths.extend(int(n) for n in seq)
            else:
                lengths.append(len(ex["input_ids"]))
        labels = out["labels"]
        self.batches.append({"tokens": sum(lengths), "trained_tokens": int((labels[:, 1:] != -100).sum()),
                             "attn_pairs": attn_pairs(lengths), "rows": len(examples)})
        return out

    def __getattr__(self, name):  # anything else the trainer asks of the collator
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def work_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from tuneforge.models.loading import load_model

    fast = args.worker.startswith("trl-fast")
    model, tokenizer = load_model(args.model, seed=args.seed)
    train_set = _load_train_set(args, tokenizer)
    if fast:
        # packed rows: TRL's own packing and shuffling of the whole data set
        order = list(range(len(train_set)))
    else:
        # one example per row: exactly tuneforge's examples, step by step (sequential sampler)
        order = [i for batch in _step_indices(len(train_set), args) for i in batch]
    dataset = Dataset.from_dict({"input_ids": [train_set[i].input_ids for i in order],
                                 "labels": [train_set[i].labels for i in order]})

    options = dict(
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_length=args.max_length, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=args.seed, data_seed=args.seed,
        disable_tqdm=True,
    )
    if fast:
        options.update(bf16=True, packing=True)
        if args.worker == "trl-fast-nogc":
            options.update(gradient_checkpointing=False)
    else:
        options.update(bf16=False, train_sampling_strategy="sequential")
    peft_config = None
    if args.method != "full":
        peft_config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                      lora_dropout=LORA["dropout"],
                                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")

    timer = trl_step_timer()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        config = SFTConfig(output_dir=tmp, **options)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # per-step log dicts on stdout
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        shape = model_shape(trainer.model)
        rss_loaded = peak_rss_gb()
        trainer.train()
    losses = [e["loss"] for e in sorted(trainer.state.log_history, key=lambda e: e.get("step", 0))
              if "loss" in e]
    n = len(timer.end)
    if n != args.steps or len(counter.batches) < n:
        raise RuntimeError(f"expected {args.steps} steps, timed {n} with {len(counter.batches)} batches")
    step_seconds = timer.step_seconds()
    steps = [{**counter.batches[i], "loss": losses[i] if i < len(losses) else None,
              "seconds": step_seconds[i]} for i in range(n)]
    # from the end of the last warm-up step to the end of the last step: everything the training
    # loop does per step (fetching and collating the batch, forward, backward, optimizer, logging)
    seconds = timer.timed_since(args.warmup)
    recorded = {k: options[k] for k in ("bf16",) if k in options}
    recorded.update(packing=config.packing, packing_strategy=config.packing_strategy if config.packing else None,
                    padding_free=bool(getattr(trainer, "padding_free", False)),
                    gradient_checkpointing=config.gradient_checkpointing, lr=config.learning_rate,
                    schedule=getattr(config.lr_scheduler_type, "value", str(config.lr_scheduler_type)),
                    optim=getattr(config.optim, "value", str(config.optim)),
                    sampler=config.train_sampling_strategy,
                    rows_per_step=sum(b["rows"] for b in counter.batches[:n]) / n)
    return _summarise(args, shape, steps, seconds, {"options": recorded, "rss_loaded_gb": rss_loaded})


def worker_main(args) -> int:
    import torch

    torch.manual_seed(args.seed)
    result = work_tuneforge(args) if args.worker.startswith("tuneforge") else work_trl(args)
    report(result)
    return 0


# --------------------------------------------------------------------------------------------
# The benchmark: data, peak, workers, table
# --------------------------------------------------------------------------------------------


def load_peak(args) -> dict | None:
    if args.peak_file:
        return json.loads(Path(args.peak_file).read_text())
    sizes = [int(s) for s in args.peak_sizes.split(",") if s.strip().isdigit()]
    if not sizes:
        return None
    print(f"bench: measuring matmul peak ({', '.join(map(str, sizes))})", file=sys.stderr, flush=True)
    return run_worker("bench.common", ["peak", "--sizes", ",".join(map(str, sizes))], label="peak")


def derive(rows: list[dict], peak: dict | None) -> None:
    """Add MFU and speed ratios to the successful rows, in place."""
    by_name = {r["contender"]: r for r in rows if "error" not in r}
    for row in by_name.values():
        for dtype, key in (("bfloat16", "mfu_bf16_pct"), ("float32", "mfu_fp32_pct")):
            gflops = (peak or {}).get(dtype, {}).get("gflops")
            value = mfu(row["train_flops"], row["seconds"], gflops)
            row[key] = None if value is None else 100 * value
        row["achieved_gflops"] = row["train_flops"] / row["seconds"] / 1e9 if row["seconds"] else None
        for ref, key in (("trl-default", "vs_trl_default"), ("trl-fast", "vs_trl_fast")):
            other = by_name.get(ref)
            row[key] = (row["tokens_per_s"] / other["tokens_per_s"]
                        if other and other.get("tokens_per_s") else None)


def loss_check(rows: list[dict], tolerance: float) -> tuple[str, list[str]]:
    """First and last losses side by side, and warnings where they differ by > ``tolerance``."""
    ok = [r for r in rows if "error" not in r and r.get("losses")]
    if not ok:
        return "", []
    n = max(len(r["losses"]) for r in ok)
    shown = sorted(set(range(min(3, n))) | set(range(max(0, n - 3), n)))
    columns: list[Column] = [("step", "step", "d")] + [(r["contender"], r["contender"], ".4f") for r in ok]
    table_rows = [{"step": i + 1, **{r["contender"]: (r["losses"][i] if i < len(r["losses"]) else None)
                                     for r in ok}} for i in shown]
    warnings = []
    ref = ok[0]
    for r in ok[1:]:
        for label, i in (("first", 0), ("last", -1)):
            a, b = ref["losses"][i], r["losses"][i]
            if a is None or b is None:
                continue
            diff = abs(b - a) / max(abs(a), 1e-12)
            if diff > tolerance:
                note = (" (packed rows: different examples per step, expected to differ)"
                        if r.get("options", {}).get("packing") is True else "")
                warnings.append(f"warning: {label} loss of {r['contender']} ({b:.4f}) differs from "
                                f"{ref['contender']} ({a:.4f}) by {100 * diff:.1f}% > "
                                f"{100 * tolerance:.0f}%{note}")
    return format_table(table_rows, columns), warnings


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma-separated, from: {', '.join(CONTENDERS)}")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 (lora), 2e-5 (full)")
    p.add_argument("--examples", type=int, default=256, help="synthetic data set size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--peak-sizes", default="2048,4096",
                   help="matmul sizes for the peak GFLOP/s ('none' to skip)")
    p.add_argument("--peak-file", default=None, help="read the peak from this JSON instead")
    p.add_argument("--loss-tolerance", type=float, default=0.05)
    p.add_argument("--name", default=None, help="results file name (default sft-METHOD)")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and less than --steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        print(f"bench: unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}",
              file=sys.stderr)
        return 2

    from tuneforge.models.loading import load_tokenizer

    tag = args.model.split(":", 1)[-1].replace("/", "_")
    data = ensure_chat_dataset(args.examples, args.seed, load_tokenizer(args.model), tag=tag)
    peak = load_peak(args)
    common = ["--method", args.method, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--max-length", str(args.max_length), "--lr", str(args.lr),
              "--seed", str(args.seed), "--model", args.model, "--data", str(data)]
    rows = []
    for name in contenders:
        print(f"bench: sft {args.method} / {name}: {args.steps} steps ({args.warmup} warm-up)",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = run_worker("bench.sft", ["--worker", name, *common], label=name)
        row.setdefault("contender", name)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    if peak is not None and not args.peak_file:
        peak = best_peak(peak, load_peak(args))  # again, now that the contenders are done
    derive(rows, peak)

    title = (f"sft {args.method}: {args.model}, batch {args.batch}, max length {args.max_length}, "
             f"{args.steps} steps ({args.warmup} warm-up, {args.steps - args.warmup} timed), lr {args.lr:g}")
    print("\n" + title)
    if peak and "error" not in peak:
        how = f"from {args.peak_file}" if args.peak_file else "best of before and after"
        print(f"matmul peak ({peak['threads']} threads, {how}): "
              f"fp32 {peak['float32']['gflops']:.1f} GFLOP/s, bf16 {peak['bfloat16']['gflops']:.1f} GFLOP/s")
    print(format_table(rows, COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"error: {r['contender']}: {r['error']}")
        else:
            o = r.get("options", {})
            print(f"  {r['contender']}: bf16={o.get('bf16')} packing={o.get('packing')} "
                  f"gradient_checkpointing={o.get('gradient_checkpointing')} "
                  f"compile={o.get('compile', False)} "
                  f"{r['timed_steps']} timed steps, {r['tokens']} tokens ({r['trained_tokens']} trained)")
    losses, warnings = loss_check(rows, args.loss_tolerance)
    if losses:
        print("\nloss per step (same data, same order; trl-fast packs rows differently)")
        print(losses)
    for w in warnings:
        print(w)

    name = args.name or f"sft-{args.method}"
    path = write_results(name, {
        "bench": name, "title": title, "args": {k: v for k, v in vars(args).items()
                                                if k not in ("worker", "data")},
        "data": str(data), "machine": machine_info(), "peak": peak, "rows": rows,
        "table_columns": COLUMNS, "loss_warnings": warnings,
        "versions": versions(*PACKAGES),
    })
    print(f"\nresults: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
