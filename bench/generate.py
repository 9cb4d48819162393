"""Generation throughput: plain ``model.generate`` one prompt at a time vs ``generate_batch``.

    python bench/generate.py                       # batches 1,8,32; 64 new tokens; 32 prompts
    python bench/generate.py --batches 1,8 --new-tokens 32 --prompts 16 --baseline-prompts 4
    python bench/generate.py --variants auto,fp32,autocast,bf16/noint4,bf16/dynamic --batches 1,8
    python bench/generate.py --baseline-prompts 32 --new-tokens 20 --batches 1,8,32  # agreement

Measures new tokens per second (tokens produced, stop tokens included, divided by wall time,
prefill included) on the built-in model, greedy:

- ``(a)``: ``model.generate`` on one prompt at a time, fp32 weights: the peer baseline, on the
  first ``--baseline-prompts`` prompts (it is slow);
- ``(b)``: :func:`tuneforge.generation.generate_batch` at each ``--batches`` size on
  ``--prompts`` prompts (``--batch1-prompts`` at batch size 1), for each ``--variants`` entry:
  ``precision[/option...]`` with precision ``auto`` (bf16 where the CPU has native bf16),
  ``bf16``, ``fp32`` or ``autocast``, options ``noint4`` (no int4 packing of the weights),
  ``bf16act`` (bf16 activations, not only matmul weights), ``dynamic`` / ``static``
  (transformers' DynamicCache / StaticCache instead of ours), ``compile`` (torch.compile the
  decode step; ~40 s per new shape on 2 cores).

It also counts, for each prompt the baseline ran, whether our first ``--match-tokens`` greedy
tokens equal the baseline's (always in fp32; bf16 rounds differently, so a near-tie sometimes
goes the other way). Prints a table and writes JSON to ``runs/bench/generate-<timestamp>.json``.
Standalone: stdlib, torch and tuneforge (``python bench/generate.py`` or ``python -m
bench.generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tuneforge.data.render import render_prompt  # noqa: E402
from tuneforge.generation import generate_batch, inference_copy  # noqa: E402
from tuneforge.models.loading import load_model  # noqa: E402

# Short, realistic requests of the kind a small instruct model serves: support, how-to, facts.
PROMPTS = [
    "My order #4821 arrived with a cracked lid on the blender jar. What should I do?",
    "How do I reset my password if I no longer have access to my old email address?",
    "Can you explain the difference between a debit card and a credit card?",
    "Write a two-sentence apology to a customer whose delivery was three days late.",
    "What are three tips for keeping houseplants alive in winter?",
    "Summarise in one sentence: the meeting moved from Tuesday to Thursday at 3 pm.",
    "Is it safe to put a cast iron pan in the dishwasher?",
    "Give me a short packing list for a weekend camping trip.",
    "How long should I boil an egg to get a soft yolk?",
    "Translate 'Where is the train station?' into French.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a Python function that returns the largest number in a list.",
    "My washing machine is making a loud banging noise during the spin cycle. Any ideas?",
    "Suggest a polite way to decline a meeting invitation.",
    "What does HTTP status code 404 mean?",
    "I was charged twice for the same subscription this month. How can I get a refund?",
    "Explain photosynthesis to a ten-year-old.",
    "What's a good name for a small bakery that sells sourdough bread?",
    "How many minutes are there in a week? Show the calculation.",
    "Recommend a simple stretching routine for people who sit at a desk all day.",
    "The sofa I ordered is the wrong colour. Can I exchange it for the grey one?",
    "Write a haiku about autumn rain.",
    "What is the difference between a virus and a bacterium?",
    "How do I remove a red wine stain from a cotton tablecloth?",
    "List three advantages of learning a second language.",
    "Draft a short out-of-office email reply for a week of holiday.",
    "Why is the sky blue?",
    "My smart thermostat keeps disconnecting from the Wi-Fi. How can I fix it?",
    "Give me a quick recipe for a vegetarian pasta dinner.",
    "What should I check before buying a used bicycle?",
    "Explain what a mortgage is in two sentences.",
    "Which items can I return after 30 days, and do I need the receipt?",
]


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]


@torch.inference_mode()
def run_baseline(model, tokenizer, convs, new_tokens: int) -> tuple[float, int, list[list[int]]]:
    """Plain model.generate, one prompt at a time, greedy: (seconds, new tokens, outputs)."""
    outputs, total = [], 0
    start = time.perf_counter()
    for messages in convs:
        ids = torch.tensor([render_prompt(messages, tokenizer)])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            do_sample=False, top_k=None, temperature=None, top_p=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:  # generate pads nothing for one row; be exact anyway
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        outputs.append(new)
        total += len(new)
    return time.perf_counter() - start, total, outputs


def parse_variant(spec: str) -> dict:
    """``precision[/option...]``: options ``noint4``, ``bf16act``, ``dynamic``, ``static``,
    ``compile``."""
    precision, *options = spec.split("/")
    unknown = set(options) - {"noint4", "bf16act", "dynamic", "static", "compile"}
    if unknown:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)} in {spec!r}")
    cache = "static" if "static" in options else "dynamic" if "dynamic" in options else None
    return {"precision": precision, "compile": "compile" in options,
            "int4": "noint4" not in options, "bf16_activations": "bf16act" in options,
            "cache": cache or "preallocated"}


def run_ours(model, tokenizer, convs, new_tokens, batch, variant):
    inference_copy.PACK_INT4 = variant["int4"]
    inference_copy.BF16_ACTIVATIONS = variant["bf16_activations"]
    built = (inference_copy.PACK_INT4, inference_copy.BF16_ACTIVATIONS)
    if built != getattr(run_ours, "built", None):
        inference_copy.BF16_COPIES.clear()  # the bf16 copy is built for one setting of those
        run_ours.built = built
    start = time.perf_counter()
    results = generate_batch(model, tokenizer, convs, max_new_tokens=new_tokens,
                             batch_size=batch, precision=variant["precision"],
                             compile=variant["compile"], cache=variant["cache"])
    seconds = time.perf_counter() - start
    return seconds, sum(r.num_new_tokens for r in results), [r.token_ids for r in results]


def agreement(ours: list[list[int]], ref: list[list[int]], k: int) -> tuple[int, int]:
    """How many of the reference prompts have identical first ``k`` tokens (or the whole,
    shorter, output)."""
    same = sum(1 for a, b in zip(ours, ref) if a[:k] == b[:k])
    return same, len(ref)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,8,32", help="generate_batch batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per measurement")
    ap.add_argument("--baseline-prompts", type=int, default=8,
                    help="prompts for the (slow) model.generate baseline")
    ap.add_argument("--batch1-prompts", type=int, default=8,
                    help="prompts for generate_batch at batch size 1 (sequential, so slower)")
    ap.add_argument("--variants", default="auto",
                    help="comma-separated precision[/option...]: precision auto, fp32, bf16 or "
                         "autocast; options noint4 (bf16 without int4 packs), bf16act (bf16 "
                         "activations too, not just matmul weights), dynamic or static "
                         "(transformers' caches), compile (torch.compile the decode step)")
    ap.add_argument("--match-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model.eval()
    load_s = time.perf_counter() - t0
    print(f"model {args.model} loaded in {load_s:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    rows: list[dict] = []

    def report(name, batch, precision, seconds, tokens, prompts, match=None, extra=None):
        row = {"name": name, "batch": batch, "precision": precision, "prompts": prompts,
               "new_tokens": tokens, "seconds": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds, 2)}
        if match is not None:
            row["match_first_k"] = {"same": match[0], "of": match[1], "k": args.match_tokens}
        row.update(extra or {})
        rows.append(row)
        base = rows[0]["tokens_per_s"]
        m = f"  first {args.match_tokens} tokens = baseline: {match[0]}/{match[1]}" if match else ""
        print(f"{name:<34} {batch:>5} {tokens:>7} {seconds:>8.2f} {row['tokens_per_s']:>8.1f} "
              f"{row['tokens_per_s'] / base:>6.2f}x{m}", flush=True)

    print(f"{'variant':<34} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs (a)':>7}")
    base_convs = conversations(args.baseline_prompts)
    # Warm-up (first-call allocations, oneDNN kernels) so no variant pays for it.
    run_baseline(model, tokenizer, base_convs[:1], 4)
    seconds, tokens, ref = run_baseline(model, tokenizer, base_convs, args.new_tokens)
    report("(a) model.generate fp32", 1, "fp32", seconds, tokens, len(base_convs))

    for spec in variants:
        variant = parse_variant(spec)
        # Warm-up: builds the bf16 copy (about 2 s for this model), first-call allocations.
        run_ours(model, tokenizer, base_convs[:2], 4, 2, variant)
        for batch in batches:
            n = args.batch1_prompts if batch == 1 else args.prompts
            convs = conversations(n)
            seconds, tokens, outs = run_ours(model, tokenizer, convs, args.new_tokens, batch,
                                             variant)
            match = agreement(outs, ref, args.match_tokens)
            report(f"(b) generate_batch {spec}", batch, variant["precision"], seconds, tokens, n,
                   match, {"variant": variant})

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"generate-{stamp}.json"
    path.write_text(json.dumps({
        "benchmark": "generate",
        "when": stamp,
        "model": args.model,
        "new_tokens": args.new_tokens,
        "greedy": True,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "bf16_native": _bf16_native()},
        "baseline_tokens_per_s": rows[0]["tokens_per_s"],
        "results": [{**r, "speedup": round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2)}
                    for r in rows],
    }, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _bf16_native() -> bool:
    from tuneforge.train.loop import use_bf16

    return use_bf16("auto", torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
