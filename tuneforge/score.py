"""`tuneforge score RUN --data FILE [--out FILE]`: the rewards a trained reward model gives.

Reads any file with a prompt and response(s): preference pairs, rankings, ratings or unpaired
(thumbs up/down) records, and scores every response. Writes one JSON line per record::

    {"source": "pairs_test.jsonl:1", "kind": "preference", "rewards": [1.92, -0.40]}

``rewards`` follow the record's responses as read: chosen then rejected; a ranking best first
(a ranking given with ``scores`` is read sorted by them, and its line carries them sorted too);
a rating or unpaired record has one reward, with its ``rating`` or ``label``. The summary says
how well the rewards agree with the file's judgements (see
:func:`tuneforge.recipes.reward_model.held_out_metrics`): pairwise accuracy (chance is 0.5), Kendall
tau and Spearman per ranking; Pearson and Spearman against ratings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tuneforge.errors import DataError

SCORABLE = ("preference", "ranking", "rating", "unpaired")


def score_file(run: str, data: str, *, out: str | None = None, batch_size: int = 8,
               device: str | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Score every response of ``data`` with the reward model of ``run``.

    Returns ``(records, summary)``; with ``out``, the records are also written there as JSONL.
    """
    import torch
    from tqdm import tqdm

    from tuneforge.data.formats import load_examples
    from tuneforge.models.heads import load_reward_model
    from tuneforge.recipes.reward_model import held_out_metrics
    from tuneforge.train.scoring import render_responses

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(data).is_file():
        raise DataError(f"{data}: no such file")
    examples = load_examples(data)
    for ex in examples:
        if ex.kind not in SCORABLE:
            raise DataError(f"{ex.where}: {ex.format} records have no response to score; "
                            "score reads preference, ranking, rating or unpaired records")
    scorer = load_reward_model(run, device=device, batch_size=batch_size)
    items = [render_responses(ex, scorer.tokenizer) for ex in examples]
    sequences = [seq for item in items for seq in item.sequences]
    with tqdm(total=len(sequences), unit="response", desc="score", file=sys.stderr,
              disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        rewards = scorer.score_sequences(sequences, on_batch=bar.update)
    records = []
    for ex, item in zip(examples, items):
        n = len(item.sequences)
        item.last_scores, rewards = rewards[:n], rewards[n:]
        records.append(_record(ex, item.last_scores))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = {k: None if v != v else v for k, v in held_out_metrics(items).items()}  # NaN: null
    summary = {"run": str(run), "data": str(data), "records": len(records),
               "responses": len(sequences), **figures}
    return records, summary


def _record(example, rewards: list[float]) -> dict:
    record = {"source": example.where, "kind": example.kind, "rewards": rewards}
    if example.kind == "rating":
        record["rating"] = example.scores[0]
    elif example.kind == "unpaired":
        record["label"] = example.desirable
    elif example.scores is not None:
        record["scores"] = example.scores
    return record


def describe(summary: dict) -> str:
    """One line for a person: how many were scored and how well they agree."""
    text = f"scored {summary['records']} records ({summary['responses']} responses)"
    if summary.get("pairwise_accuracy") is not None:
        text += (f"; pairwise accuracy {summary['pairwise_accuracy']:.4f} over "
                 f"{summary['pairs']} ordered pairs (chance 0.5)")
    for key in ("kendall_tau", "spearman", "pearson"):
        if summary.get(key) is not None:
            text += f"; {key.replace('_', ' ')} {summary[key]:.4f}"
    return text


def register(sub) -> None:
    p = sub.add_parser("score", help="rewards of (prompt, response) pairs from a reward-model run")
    p.add_argument("run", help="a run folder trained with recipe: reward")
    p.add_argument("--data", required=True,
                   help="JSONL/CSV/Parquet of preference, ranking, rating or unpaired records")
    p.add_argument("--out", help="write the rewards here as JSONL (default: print them)")
    p.add_argument("--batch-size", type=int, default=8, help="responses per forward pass")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from tuneforge.errors import TuneforgeError

    if args.batch_size < 1:
        raise TuneforgeError("--batch-size must be >= 1")
    records, summary = score_file(args.run, args.data, out=args.out, batch_size=args.batch_size,
                                  device=args.device)
    if args.out:
        print(json.dumps(summary, indent=2))
    else:
        print("".join(json.dumps(r) + "\n" for r in records), end="", flush=True)
    print(f"tuneforge: {describe(summary)}", file=sys.stderr)
    return 0
