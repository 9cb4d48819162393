"""Small labelled data sets for the eval tests: distinct tickets, three teams, seeded."""

from __future__ import annotations

import random
from pathlib import Path

from helpers import write_jsonl

LABELS = ["billing", "shipping", "returns"]
_WORDS = {
    "billing": ["charge", "invoice", "refund amount", "card", "fee"],
    "shipping": ["parcel", "courier", "tracking", "delivery", "van"],
    "returns": ["return label", "exchange", "broken item", "wrong size", "send back"],
}


def ticket_records(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    """``n`` classification records ``{"text", "label"}``, labels taking turns."""
    rng = random.Random(seed + start)
    out = []
    for i in range(start, start + n):
        label = LABELS[i % len(LABELS)]
        out.append({"text": f"ticket {i}: about my {rng.choice(_WORDS[label])}, ref {i * 7919 % 10007}",
                    "label": label})
    return out


def chat_ticket_records(n: int, start: int = 0) -> list[dict]:
    """Chat records whose answer is ``Team: <label>`` then a reply line."""
    out = []
    for rec in ticket_records(n, start, seed=1):
        out.append({"messages": [
            {"role": "system", "content": "Route the ticket."},
            {"role": "user", "content": rec["text"]},
            {"role": "assistant", "content": f"Team: {rec['label']}\nReply: we are on it."},
        ]})
    return out


def write_splits(folder: Path, make=ticket_records, sizes=(24, 6, 9)) -> dict[str, Path]:
    """train/val/test files of disjoint records in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    n_train, n_val, n_test = sizes
    return {
        "train": write_jsonl(folder / "train.jsonl", make(n_train, 0)),
        "validation": write_jsonl(folder / "val.jsonl", make(n_val, 1000)),
        "test": write_jsonl(folder / "test.jsonl", make(n_test, 2000)),
    }
