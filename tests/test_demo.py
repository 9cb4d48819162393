"""The demo's evaluation on a tiny run: three systems through run_eval, the table, the report."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_jsonl

from tuneforge.config import load_config
from tuneforge.demo import evaluate_demo, render_table
from tuneforge.recipes.sft import run_sft

LABELS = ["Billing", "Shipping", "Returns"]


def support_records(n: int, start: int) -> list[dict]:
    """Tickets in the demo's layout: 'Department: <label>' then a reply line."""
    return [{"messages": [
        {"role": "system", "content": "Route the ticket: Billing, Shipping or Returns."},
        {"role": "user", "content": f"ticket {i}: about my {LABELS[i % 3].lower()}"},
        {"role": "assistant", "content": f"Department: {LABELS[i % 3]}\nReply: on it ({i})."},
    ]} for i in range(start, start + n)]


def test_demo_evaluates_base_zero_shot_few_shot_and_tuned(tmp_path: Path):
    data = tmp_path / "support"
    data.mkdir()
    for name, n, start in (("train", 12, 0), ("validation", 3, 100), ("test", 6, 200)):
        write_jsonl(data / f"{name}.jsonl", support_records(n, start))
    (data / "labels.json").write_text(json.dumps(LABELS))
    run_dir = tmp_path / "run"
    config = load_config(None, [], base={
        "output_dir": str(run_dir), "model": {"name": "tiny:llama"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                 "test": str(data / "test.jsonl")},
        "train": {"batch_size": 4, "max_steps": 2, "eval_every": 2, "save_every": 2,
                  "bf16": "false", "progress": False},
    })
    summary = run_sft(config)

    result = evaluate_demo(run_dir, data, few_shot=2)
    assert list(result["systems"]) == ["base_zero_shot", "base_few_shot", "tuned"]
    assert result["labels"] == LABELS and result["test_examples"] == 6
    for metrics in result["systems"].values():
        assert {"accuracy", "macro_precision", "macro_recall", "macro_f1"} <= set(metrics)
        assert set(metrics["per_class"]) == set(LABELS)
    assert result["sample"]["gold"] == "Department: Sales".replace("Sales", LABELS[200 % 3])
    assert set(result["sample"]["replies"]) == set(result["systems"])
    for f in ("report.md", "report.html", "eval.json", "support_confusion.png",
              "support_per_class.png", "training_curves.png"):
        assert (run_dir / "eval" / f).is_file(), f

    result.update(train_summary=summary, seconds_train=1.0, seconds_total=2.0)
    table = render_table(result)
    header = next(line for line in table.splitlines() if "base zero-shot" in line)
    assert "base 2-shot" in header and "tuned" in header
    for row in ("accuracy", "macro precision", "macro recall", "macro F1", "F1 Returns",
                "(chance accuracy)", "report: ", "ticket: ticket 200"):
        assert row in table, row
    tuned_f1 = result["systems"]["tuned"]["macro_f1"]
    assert next(line for line in table.splitlines() if line.startswith("macro F1")).endswith(
        f"{tuned_f1:.3f}")
