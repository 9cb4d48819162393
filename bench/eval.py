"""Label scoring throughput: the packed scorer against a plain forward of the same tokens.

    python -m bench.eval                          # 120 support tickets, zero-shot and 3-shot
    python -m bench.eval --examples 16 --reference-examples 8 --shots 0   # a quick check

Scores the held-out support tickets (``examples/data/support/test.jsonl``, six departments) on
the built-in model, bf16 where the CPU has it (``tuneforge.eval.classify``'s rule), one process,
every contender on the same prompts in the same run:

- ``scoring``: :func:`tuneforge.eval.classify.classify` as evaluation calls it (tokenising,
  the shared prefix, one packed forward per group of prompts of similar length with every
  candidate label as a branch of its prompt, attention as one batch per forward,
  log-probabilities at the label positions only);
- ``scoring-noprefix``: the same without the shared prefix (every prompt runs in full);
- ``forward``: a plain forward of the very tokens ``scoring`` runs (the shared prefix once,
  then each packed row with causal attention per prompt and no attention to the prefix,
  ``logits_to_keep=1``): the ceiling;
- ``reference``: the plain path, one prompt at a time (prompt with a KV cache, the candidates as
  a padded batch, full-vocabulary log-softmax), on the first ``--reference-examples`` prompts.

``tokens/s`` counts the tokens ``scoring`` runs through the model (for every contender, so the
column compares time); ``x forward`` is a contender's tokens/s over ``forward``'s; ``x
reference`` its examples/s over ``reference``'s. ``agree`` counts the reference prompts where a
contender predicts the reference's label (bf16 rounds the two paths differently, so a near-tie
may go the other way; the tests check the scores in fp32). Prints a table and writes
``runs/bench/eval-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import Column, format_table, machine_info, versions, write_results

MODEL = "builtin:smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "support"
CONTENDERS = ("scoring", "scoring-noprefix", "forward", "reference")

COLUMNS: list[Column] = [
    ("contender", "contender", ""),
    ("examples", "examples", "d"),
    ("seconds", "seconds", ".2f"),
    ("examples_per_s", "ex/s", ".1f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("vs_forward", "x forward", ".2f"),
    ("speedup", "x reference", ".1f"),
    ("accuracy", "accuracy", ".3f"),
    ("agree", "agree", ""),
]


def load_task(shots: int):
    """(prompts, gold labels, TaskSpec) of the support test set, with ``shots`` solved training
    tickets before each question (as ``tuneforge eval --few-shot`` builds them)."""
    from tuneforge.config import TaskConfig
    from tuneforge.data.templates import prompt_and_reference
    from tuneforge.eval.fewshot import pick_shots, with_shots
    from tuneforge.eval.tasks import gold_label, load_task_examples, resolve_task
    from tuneforge.models.loading import load_tokenizer

    test = load_task_examples(DATA / "test.jsonl", None)
    train = load_task_examples(DATA / "train.jsonl", None)
    config = TaskConfig(name="support", type="classification", labels=str(DATA / "labels.json"))
    spec = resolve_task(config, test, train, load_tokenizer(MODEL))
    chosen = pick_shots(train, shots, label_of=lambda ex: gold_label(ex, spec))
    prompts = [with_shots(prompt_and_reference(ex)[0], chosen) for ex in test]
    return prompts, [gold_label(ex, spec) for ex in test], spec


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def plain_forward(model, batches, shared, bf16) -> None:
    """One forward of the shared prefix, then of each packed row, causal per prompt."""
    import torch

    from tuneforge.eval.classify import _autocast
    from tuneforge.models.attention import packed_attention

    with torch.no_grad(), _autocast(model, bf16), packed_attention(model):
        if shared is not None:
            model(input_ids=torch.tensor([shared.ids]), logits_to_keep=1)
        for batch in batches:
            model(input_ids=torch.tensor([batch.ids]), position_ids=torch.tensor([batch.positions]),
                  packed_seq_lens=batch.lengths, logits_to_keep=1)


def measure(model, tokenizer, shots: int, args) -> list[dict]:
    """Every contender on the support prompts with ``shots`` shots; one row each."""

    from tuneforge.eval.classify import (
        SharedPrefix,
        candidate_ids_batch,
        classify,
        label_batches,
        score_packed,
    )

    prompts, gold, spec = load_task(shots)
    prompts, gold = prompts[: args.examples], gold[: args.examples]
    n_ref = min(args.reference_examples, len(prompts))
    labels = spec.labels

    def run_classify(packed, n=None):
        n = len(prompts) if n is None else n
        return classify(model, tokenizer, prompts[:n], gold[:n], labels, prefix=spec.prefix,
                        suffix=spec.suffix, packed=packed)

    tokenised = candidate_ids_batch(tokenizer, prompts, spec.candidates())
    ids, conts = [t[0] for t in tokenised], [t[1] for t in tokenised]
    shared = SharedPrefix.of(model, ids)
    rows = label_batches(ids, conts, shared)
    tokens = sum(len(r.ids) for r in rows) + (len(shared.ids) if shared is not None else 0)
    run_classify(True, min(4, len(prompts)))  # warm-up: first-call allocations, oneDNN kernels

    def without_prefix():
        scores = score_packed(model, ids, conts)
        return [labels[s.index(max(s))] for s in scores]

    results: dict[str, tuple[float, list[str], int]] = {}
    for name in args.contenders:
        if name == "scoring":
            seconds, out = timed(lambda: run_classify(True))
            results[name] = (seconds, out.predicted, len(prompts))
        elif name == "scoring-noprefix":
            seconds, predicted = timed(without_prefix)
            results[name] = (seconds, predicted, len(prompts))
        elif name == "forward":
            seconds, _ = timed(lambda: plain_forward(model, rows, shared, None))
            results[name] = (seconds, None, len(prompts))
        elif name == "reference":
            seconds, out = timed(lambda: run_classify(False, n_ref))
            results[name] = (seconds, out.predicted, n_ref)
        print(f"bench: eval {shots}-shot / {name}: {results[name][0]:.2f} s", file=sys.stderr,
              flush=True)

    from tuneforge.eval.metrics import classification_metrics

    reference = results.get("reference", (None, None, 0))[1]
    forward_tps = tokens / results["forward"][0] if "forward" in results else None
    ref_eps = n_ref / results["reference"][0] if "reference" in results else None
    out = []
    for name, (seconds, predicted, n) in results.items():
        row = {"contender": f"{name}, {shots}-shot", "shots": shots, "examples": n, "seconds": seconds,
               "examples_per_s": n / seconds, "prompt_tokens": sum(map(len, ids[:n])),
               "shared_prefix": len(shared.ids) if shared is not None else 0}
        if name != "reference":
            row["tokens"] = tokens
            row["tokens_per_s"] = tokens / seconds
            row["vs_forward"] = row["tokens_per_s"] / forward_tps if forward_tps else None
        if ref_eps:
            row["speedup"] = row["examples_per_s"] / ref_eps
        if predicted is not None:
            row["accuracy"] = classification_metrics(gold[:n], predicted, labels)["accuracy"]
            if reference is not None:
                same = sum(a == b for a, b in zip(predicted[:n_ref], reference))
                row["agree"] = f"{same}/{n_ref}"
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=120, help="test tickets scored (of 120)")
    p.add_argument("--reference-examples", type=int, default=24,
                   help="tickets for the (slow) one-prompt-at-a-time reference")
    p.add_argument("--shots", default="0,3", help="comma-separated few-shot settings")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--name", default="eval")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        print(f"bench: unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}",
              file=sys.stderr)
        return 2

    import torch

    from tuneforge.models.loading import load_model
    from tuneforge.train.loop import use_bf16

    model, tokenizer = load_model(MODEL)
    model.eval()
    bf16 = use_bf16("auto", torch.device("cpu"))
    rows = []
    for shots in [int(s) for s in args.shots.split(",") if s.strip()]:
        rows += measure(model, tokenizer, shots, args)

    info = machine_info()
    title = (f"label scoring: {MODEL}, support test set, {'bf16 autocast' if bf16 else 'fp32'}, "
             f"{info['cpu']} ({torch.get_num_threads()} threads)")
    print("\n" + title)
    print(format_table(rows, COLUMNS))
    path = write_results(args.name, {
        "bench": args.name, "title": title, "args": vars(args), "machine": info, "bf16": bf16,
        "rows": rows, "table_columns": COLUMNS, "versions": versions("torch", "transformers"),
    })
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
