"""Multi-task runs: the mixture follows the weights; two tasks train and report per task."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from eval_helpers import chat_ticket_records, write_splits

from tuneforge.cli import main
from tuneforge.config import ConfigError, load_config
from tuneforge.data.mixing import mix, task_probabilities
from tuneforge.recipes.sft import run_sft


def test_mixture_counts_follow_the_weights():
    sizes, weights, total = [50, 400], [3.0, 1.0], 4000
    slots = mix(sizes, task_probabilities(sizes, weights), total=total, seed=0)
    counts = Counter(task for task, _ in slots)
    for task, share in enumerate([0.75, 0.25]):
        sd = math.sqrt(total * share * (1 - share))  # binomial spread of a seeded draw
        assert abs(counts[task] - total * share) < 4 * sd, (counts, task)
    # a small task with a big share is repeated evenly: every example before any twice
    per_example = Counter(i for task, i in slots if task == 0)
    assert max(per_example.values()) - min(per_example.values()) <= 1
    assert all(0 <= i < sizes[task] for task, i in slots)
    assert mix(sizes, [0.75, 0.25], total=total, seed=0) == slots
    assert mix(sizes, [0.75, 0.25], total=total, seed=1) != slots


def test_temperature_sampling_moves_from_proportional_towards_uniform():
    sizes = [100, 900]
    assert task_probabilities(sizes, [1, 1], mixing="temperature", temperature=1) == pytest.approx([0.1, 0.9])
    assert task_probabilities(sizes, [1, 1], mixing="temperature", temperature=2) == pytest.approx([0.25, 0.75])
    assert task_probabilities(sizes, [1, 1], mixing="temperature", temperature=1000)[0] == pytest.approx(0.5, abs=0.01)
    assert sum(Counter(t for t, _ in mix(sizes, [0.25, 0.75], seed=0)).values()) == 1000


def test_task_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, [], base={"data": {"train": "x.jsonl", "tasks": [
            {"name": "a", "train": "a.jsonl", "weight": 0}, {"name": "a"}]}})
    message = str(err.value)
    for part in ("leave empty when data.tasks", "data.tasks[0].weight: must be > 0",
                 "'a' names two tasks", "data.tasks[1].train: required"):
        assert part in message


def test_two_tasks_train_and_report_per_task_metrics(tmp_path, capsys):
    tickets = write_splits(tmp_path / "tickets", sizes=(24, 6, 6))
    replies = write_splits(tmp_path / "replies", chat_ticket_records, sizes=(12, 3, 3))
    run = tmp_path / "run"
    config = load_config(None, [], base={
        "output_dir": str(run), "model": {"name": "tiny:llama"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"tasks": [
            {"name": "tickets", **{k: str(v) for k, v in tickets.items()}, "weight": 1,
             "template": {"user": "Ticket: {text}", "assistant": "Team: {label}"}},
            {"name": "replies", **{k: str(v) for k, v in replies.items()}, "weight": 3},
        ]},
        "train": {"batch_size": 4, "max_steps": 2, "lr": 5e-3, "bf16": "false", "eval_every": 2,
                  "warmup_steps": 1, "progress": False, "metric_for_best": "val_tickets_macro_f1"},
    })
    summary = run_sft(config)
    mixed = summary["tasks"]
    assert (mixed["tickets"]["share"], mixed["replies"]["share"]) == (0.25, 0.75)
    assert mixed["tickets"]["mixed_examples"] + mixed["replies"]["mixed_examples"] == 36
    assert summary["train_examples"] == 36 and summary["validation_examples"] == 9
    (val,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in x]
    for key in ("val_tickets_accuracy", "val_tickets_macro_f1", "val_tickets_loss",
                "val_replies_loss", "val_accuracy"):
        assert key in val, key
    assert val["val_accuracy"] == val["val_tickets_accuracy"]

    assert main(["eval", str(run), "--samples", "1", "--max-new-tokens", "4"]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert {name: t["type"] for name, t in result["tasks"].items()} == {
        "tickets": "classification", "replies": "generation"}
    for task in result["tasks"].values():
        assert list(task["systems"]) == ["base_zero_shot", "tuned"]
    assert {"exact_match", "token_f1", "rouge_l", "bleu", "loss"} <= set(
        result["tasks"]["replies"]["systems"]["tuned"])
    assert "macro_f1" in result["tasks"]["tickets"]["systems"]["tuned"]
    printed = capsys.readouterr().out
    assert "tickets (classification" in printed and "replies (generation" in printed
