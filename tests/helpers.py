"""Small data builders shared by tests."""

from __future__ import annotations

import json
from pathlib import Path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Short, distinct chat examples: ``n`` questions with a learnable answer pattern."""
    colours = ["red", "green", "blue", "amber", "violet", "teal", "black", "white"]
    out = []
    for i in range(n):
        colour = colours[(i * 7 + seed) % len(colours)]
        out.append({"messages": [
            {"role": "user", "content": f"item {i}: what colour is it?"},
            {"role": "assistant", "content": f"It is {colour}."},
        ]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs with a learnable preference: the colour answer over a refusal."""
    out = []
    for r in chat_records(n, seed):
        user, answer = r["messages"]
        out.append({"prompt": [user], "chosen": [answer],
                    "rejected": [{"role": "assistant", "content": "I cannot say."}]})
    return out
