"""Preference optimisation (DPO) throughput: tuneforge against TRL's DPOTrainer, in one run.

    python -m bench.dpo                            # 8 steps, 1 of them warm-up, batch 4 pairs
    python -m bench.dpo --steps 3 --warmup 1 --contenders tuneforge

Every contender trains the same model (``builtin:smollm2-135m-instruct``) with the same LoRA
adapter (r 16, alpha 32, all linear layers, no dropout), sigmoid DPO with beta 0.1, the same
learning rate and schedule, on the same synthetic preference pairs (a prompt and two replies of
log-normal lengths, seeded) in the same order, each in its own fresh process. The reference is
the model with its adapters switched off for everyone. The steps after the warm-up are timed.

Contenders:

- ``tuneforge``: the dpo recipe's objective on the shared loop (bf16 autocast where the CPU has
  it, chosen and rejected packed into one padding-free row, reference log-probs computed once
  per pair with the adapters off).
- ``tuneforge-compile``: the same with ``compile: true`` (decoder layers through torch.compile;
  the warm-up step includes the compilation).
- ``trl-default``: DPOTrainer with DPOConfig's defaults except what must match (fp32, as the
  performance issue measured it).
- ``trl-fast``: the same with ``bf16=True`` and gradient checkpointing off, its fastest CPU
  settings (TRL 1.16 has disabled ``padding_free`` for DPO).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import (
    DATA_DIR,
    Column,
    attn_pairs,
    cold_compile_cache,
    format_table,
    machine_info,
    make_chat_examples,
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
from bench.sft import load_peak

MODEL = "builtin:smollm2-135m-instruct"
CONTENDERS = ("tuneforge", "tuneforge-compile", "trl-default", "trl-fast")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BETA = 0.1
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")

COLUMNS: list[Column] = [
    ("contender", "contender", ""),
    ("pairs_per_s", "pairs/s", ".2f"),
    ("tokens_per_s", "tok/s", ".1f"),
    ("seconds_per_step", "s/step", ".2f"),
    ("first_step_s", "first step s", ".1f"),
    ("peak_rss_gb", "peak RSS GB", ".2f"),
    ("first_loss", "first loss", ".4f"),
    ("final_loss", "final loss", ".4f"),
    ("mfu_bf16_pct", "MFU bf16 %", ".1f"),
    ("vs_trl_default", "x trl-default", ".2f"),
    ("vs_trl_fast", "x trl-fast", ".2f"),
]


def make_pairs(n: int, seed: int, tokenizer) -> list[dict]:
    """``n`` preference records: a user prompt, a chosen and a rejected reply (another record's)."""
    first = make_chat_examples(n, seed, tokenizer)
    second = make_chat_examples(n, seed + 1, tokenizer)
    return [{"prompt": [a["messages"][0]], "chosen": [a["messages"][1]],
             "rejected": [b["messages"][1]]} for a, b in zip(first, second)]


def ensure_pairs(n: int, seed: int, tokenizer, tag: str) -> Path:
    import json

    path = DATA_DIR / f"dpo-pairs-{tag}-n{n}-seed{seed}.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_pairs(n, seed, tokenizer))
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def _order(n: int, args) -> list[int]:
    from tuneforge.train.loop import global_batches

    stream = global_batches(n, args.batch, args.seed)
    return [i for _ in range(args.steps) for i in next(stream)]


def _flops(shape: dict, tokens: int, trained: int, pairs: int) -> float:
    """Policy forward + backward (LoRA) plus one reference forward, over both sequences."""
    reference = (2 * shape["n_body"] * tokens + 2 * shape["n_head"] * trained
                 + 4 * shape["n_layers"] * shape["attn_width"] * pairs)
    return train_flops(shape, "lora", tokens, trained, pairs) + reference


def _summarise(args, shape, steps: list[dict], seconds: float, extra: dict) -> dict:
    timed = steps[args.warmup:]
    tokens = sum(s["tokens"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    pairs = len(timed) * args.batch
    return {"contender": args.worker, "steps": len(steps), "warmup": args.warmup,
            "timed_steps": len(timed), "seconds": seconds, "pairs": pairs, "tokens": tokens,
            "trained_tokens": trained, "pairs_per_s": pairs / seconds if seconds else None,
            "tokens_per_s": tokens / seconds if seconds else None,
            "seconds_per_step": seconds / len(timed) if timed else None,
            "first_step_s": steps[0]["seconds"] if steps else None,
            "train_flops": _flops(shape, tokens, trained, sum(s["attn_pairs"] for s in timed)),
            "peak_rss_gb": peak_rss_gb(), "first_loss": steps[0]["loss"],
            "final_loss": steps[-1]["loss"], "losses": [s["loss"] for s in steps],
            "step_seconds": [s["seconds"] for s in steps], "shape": shape,
            "versions": versions(*PACKAGES), **extra}


def _pair_stats(pair) -> dict:
    lengths = [len(pair.chosen), len(pair.rejected)]
    return {"tokens": sum(lengths), "trained_tokens": pair.chosen.num_targets + pair.rejected.num_targets,
            "attn_pairs": attn_pairs(lengths)}


def _tokenized(args, tokenizer):
    from tuneforge.data.formats import load_examples
    from tuneforge.train.scoring import render_responses

    return [render_responses(e, tokenizer) for e in load_examples(args.data, "preference")]


def work_tuneforge(args) -> dict:
    from tuneforge.config import AdapterConfig, TrainConfig
    from tuneforge.models.adapters import prepare_model
    from tuneforge.models.loading import load_model
    from tuneforge.recipes.dpo import PreferenceObjective
    from tuneforge.train.loop import make_accelerator, train, use_bf16

    model, tokenizer = load_model(args.model, seed=args.seed)
    model.config.use_cache = False
    data = _tokenized(args, tokenizer)
    model = prepare_model(model, AdapterConfig(method="lora", **LORA), seed=args.seed)
    shape = model_shape(model)
    cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, lr=args.lr, schedule="cosine",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16="auto",
                      progress=False, eval_every=0, save_every=0, seed=args.seed,
                      compile="true" if args.worker == "tuneforge-compile" else "false")
    if cfg.compile == "true":  # a cold compilation, as a user's first run has (see cold_compile_cache)
        cold_compile_cache()
    acc = make_accelerator(cfg, model)
    objective = PreferenceObjective(model, "dpo", beta=BETA, reference="cached")
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        result = train(model, data, [], cfg, Path(tmp), accelerator=acc, objective=objective)
    records = [r for r in result.history if "loss" in r]
    order = _order(len(data), args)
    steps, previous = [], 0.0
    for k, r in enumerate(records):
        batch = [_pair_stats(data[i]) for i in order[k * args.batch : (k + 1) * args.batch]]
        steps.append({**{key: sum(b[key] for b in batch) for key in batch[0]},
                      "loss": r["loss"], "seconds": r["elapsed_s"] - previous})
        previous = r["elapsed_s"]
    start = records[args.warmup - 1]["elapsed_s"] if args.warmup else 0.0
    options = {"bf16": use_bf16(cfg.bf16, acc.device), "packing": "chosen+rejected in one row",
               "reference": "adapters off, once per pair", "gradient_checkpointing": False,
               "compile": cfg.compile == "true"}
    return _summarise(args, shape, steps, records[-1]["elapsed_s"] - start,
                      {"options": options, "final_reward_accuracy": records[-1]["reward_accuracy"]})


def work_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from tuneforge.data.formats import read_records
    from tuneforge.models.loading import load_model

    fast = args.worker == "trl-fast"
    model, tokenizer = load_model(args.model, seed=args.seed)
    data = _tokenized(args, tokenizer)  # for token counts: the same templates as TRL's
    records = [r for _, r in read_records(args.data)]
    order = _order(len(records), args)
    dataset = Dataset.from_list([records[i] for i in order])
    options = dict(per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                   max_length=1024, max_steps=args.steps, learning_rate=args.lr, beta=BETA,
                   lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1,
                   save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                   seed=args.seed, data_seed=args.seed, disable_tqdm=True,
                   train_sampling_strategy="sequential")
    options.update(bf16=True, gradient_checkpointing=False) if fast else options.update(bf16=False)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=LORA["target_modules"], task_type="CAUSAL_LM")

    timer = trl_step_timer()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        config = DPOConfig(output_dir=tmp, **options)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        shape = model_shape(trainer.model)
        trainer.train()
    logs = sorted((e for e in trainer.state.log_history if "loss" in e), key=lambda e: e["step"])
    n = len(timer.end)
    if n != args.steps:
        raise RuntimeError(f"expected {args.steps} steps, timed {n}")
    step_seconds = timer.step_seconds()
    steps = []
    for k in range(n):
        batch = [_pair_stats(data[i]) for i in order[k * args.batch : (k + 1) * args.batch]]
        steps.append({**{key: sum(b[key] for b in batch) for key in batch[0]},
                      "loss": logs[k]["loss"] if k < len(logs) else None, "seconds": step_seconds[k]})
    recorded = {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
                "precompute_ref_log_probs": config.precompute_ref_log_probs,
                "padding_free": bool(getattr(trainer, "padding_free", False)),
                "loss_type": config.loss_type}
    accuracy = logs[-1].get("rewards/accuracies") if logs else None
    return _summarise(args, shape, steps, timer.timed_since(args.warmup),
                      {"options": recorded, "final_reward_accuracy": accuracy})


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def derive(rows: list[dict], peak: dict | None) -> None:
    by_name = {r["contender"]: r for r in rows if "error" not in r}
    for row in by_name.values():
        value = mfu(row["train_flops"], row["seconds"], (peak or {}).get("bfloat16", {}).get("gflops"))
        row["mfu_bf16_pct"] = None if value is None else 100 * value
        for ref, key in (("trl-default", "vs_trl_default"), ("trl-fast", "vs_trl_fast")):
            other = by_name.get(ref)
            row[key] = (row["pairs_per_s"] / other["pairs_per_s"]
                        if other and other.get("pairs_per_s") else None)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.dpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--peak-sizes", default="2048,4096")
    p.add_argument("--peak-file", default=None)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and less than --steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        import torch

        torch.manual_seed(args.seed)
        report(work_tuneforge(args) if args.worker.startswith("tuneforge") else work_trl(args))
        return 0
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := [c for c in contenders if c not in CONTENDERS]:
        print(f"bench: unknown contender(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    from tuneforge.models.loading import load_tokenizer

    tag = args.model.split(":", 1)[-1].replace("/", "_")
    data = ensure_pairs(args.steps * args.batch, args.seed, load_tokenizer(args.model), tag)
    peak = load_peak(args)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--lr", str(args.lr), "--seed", str(args.seed), "--model", args.model, "--data", str(data)]
    rows = []
    for name in contenders:
        print(f"bench: dpo / {name}: {args.steps} steps ({args.warmup} warm-up)", file=sys.stderr,
              flush=True)
        row = run_worker("bench.dpo", ["--worker", name, *common], label=name)
        row.setdefault("contender", name)
        rows.append(row)
    derive(rows, peak)
    title = (f"dpo lora: {args.model}, batch {args.batch} pairs, {args.steps} steps "
             f"({args.warmup} warm-up), beta {BETA}, lr {args.lr:g}")
    print("\n" + title)
    if peak and "error" not in peak:
        print(f"matmul peak: bf16 {peak['bfloat16']['gflops']:.1f} GFLOP/s")
    print(format_table(rows, COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"error: {r['contender']}: {r['error']}")
        else:
            print(f"  {r['contender']}: {r['options']}; losses "
                  + " ".join(f"{x:.4f}" for x in r["losses"] if x is not None))
    path = write_results("dpo", {"bench": "dpo", "title": title, "args": vars(args),
                                 "machine": machine_info(), "peak": peak, "rows": rows,
                                 "table_columns": COLUMNS})
    print(f"\nresults: {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
