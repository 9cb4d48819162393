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


def write_recipe_config(tmp_path: Path, recipe: str, train: list[dict], validation: list[dict],
                        section: dict, **train_settings) -> str:
    """A tiny-llama LoRA config of an offline recipe that compares responses (dpo, kto, ...):
    its data files, 6 steps evaluated and saved every 3, and the recipe's own ``section``."""
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", validation)
    settings = {"batch_size": 4, "max_steps": 6, "lr": 5e-3, "bf16": "false", "eval_every": 3,
                "save_every": 3, "warmup_steps": 0, "metric_for_best": "val_reward_accuracy",
                **train_settings}
    cfg = tmp_path / f"{recipe}.yaml"
    cfg.write_text(
        f"recipe: {recipe}\n"
        "model: {name: 'tiny:llama'}\n"
        "adapter: {method: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, validation: {tmp_path / 'val.jsonl'}}}\n"
        f"train: {json.dumps(settings)}\n"
        f"{'preference' if recipe == 'dpo' else recipe}: {json.dumps(section)}\n")
    return str(cfg)
