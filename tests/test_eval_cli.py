"""`tuneforge eval` end to end on a tiny LoRA run: baselines, report files, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import LABELS, chat_ticket_records, write_splits

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.templates import prompt_and_reference
from tuneforge.eval.classify import classify
from tuneforge.eval.tasks import load_task_examples
from tuneforge.models.loading import load_model
from tuneforge.recipes.sft import run_sft

TEMPLATE = {"system": "Route the ticket.", "user": "Ticket: {text}", "assistant": "Team: {label}"}
CLASS_KEYS = {"n", "accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision",
              "micro_recall", "micro_f1", "per_class", "confusion_matrix", "loss", "perplexity"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step LoRA run on templated ticket classification, with validation task metrics."""
    root = tmp_path_factory.mktemp("evalrun")
    files = write_splits(root / "data")
    config = load_config(None, [], base={
        "output_dir": str(root / "run"),
        "model": {"name": "tiny:llama"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(files["train"]), "validation": str(files["validation"]),
                 "test": str(files["test"]), "template": TEMPLATE},
        "train": {"batch_size": 4, "max_steps": 4, "lr": 5e-3, "bf16": "false", "eval_every": 2,
                  "save_every": 2, "warmup_steps": 1, "progress": False,
                  "metric_for_best": "val_macro_f1"},
    })
    run_sft(config)
    return root / "run"


def test_training_logged_validation_task_metrics(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"val_accuracy", "val_macro_f1", "val_macro_precision", "val_macro_recall"} <= set(r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric_for_best"] == "val_macro_f1"
    assert summary["best_metric"] == max(r["val_macro_f1"] for r in evals)


@pytest.fixture(scope="module")
def evaluated(run) -> str:
    """`tuneforge eval RUN --few-shot 2` once for the module; its printed table."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run), "--few-shot", "2", "--samples", "2"]) == 0
    return out.getvalue()


def test_eval_compares_base_zero_shot_few_shot_and_tuned(run, evaluated):
    assert "base zero-shot" in evaluated and "base 2-shot" in evaluated and "tuned" in evaluated
    result = json.loads((run / "eval" / "eval.json").read_text())
    (name,) = result["tasks"]
    task = result["tasks"][name]
    assert name == "data" and task["type"] == "classification" and task["labels"] == LABELS
    assert list(task["systems"]) == ["base_zero_shot", "base_few_shot", "tuned"]
    for metrics in task["systems"].values():
        assert set(metrics) == CLASS_KEYS and metrics["n"] == 9
    assert len(task["shots"]) == 2 and task["leakage"]["exact"] == task["leakage"]["near"] == 0
    for f in ("report.md", "report.html", "samples.jsonl", "data_confusion.png",
              "data_per_class.png", "data_summary.png", "training_curves.png"):
        assert (run / "eval" / f).is_file(), f
    samples = [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and "generated" in samples[0]["outputs"]["tuned"]
    assert "generated" not in samples[5]["outputs"]["tuned"]  # only --samples 2 are generated
    assert "![data: metrics by system](data_summary.png)" in (run / "eval" / "report.md").read_text()


def test_base_zero_shot_is_the_base_model_scored_on_the_run_template(run, evaluated):
    """The adapter-off figures equal scoring a freshly loaded base model with the same prompts."""
    result = json.loads((run / "eval" / "eval.json").read_text())["tasks"]["data"]
    config = load_config(run / "config.yaml")
    from tuneforge.data.templates import apply_template

    test = [apply_template(ex, config.data.template)
            for ex in load_task_examples(config.data.test, None)]
    model, tok = load_model("tiny:llama")
    scores = classify(model, tok, [prompt_and_reference(ex)[0] for ex in test],
                      [ex.label for ex in test], LABELS, prefix="Team: ", suffix="<|im_end|>")
    assert scores.predicted == [
        s["outputs"]["base_zero_shot"]["predicted"]
        for s in map(json.loads, (run / "eval" / "samples.jsonl").read_text().splitlines())]
    assert result["systems"]["base_zero_shot"]["accuracy"] == scores.accuracy


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_eval_refuses_test_data_that_leaks_from_training(run, tmp_path, capsys):
    config = load_config(run / "config.yaml")
    err = _fails(capsys, "eval", str(run), "--data", config.data.train)
    assert "24 of 24 test examples also appear in the training data" in err
    assert "24 exact, 0 near-exact" in err and "--allow-leakage" in err
    out = tmp_path / "leaky"
    assert main(["eval", str(run), "--data", config.data.train, "--allow-leakage", "--limit", "3",
                 "--samples", "0", "--output-dir", str(out)]) == 0
    assert "WARNING: 3 of 3 test examples also appear" in (out / "report.md").read_text()
    assert json.loads((out / "eval.json").read_text())["tasks"]["data"]["leakage"]["exact"] == 3


def test_eval_user_errors_exit_2_with_a_message(run, tmp_path, capsys):
    assert "not found" in _fails(capsys, "eval", str(run), "--data", str(tmp_path / "none.jsonl"))
    chat = write_splits(tmp_path / "chat", chat_ticket_records)
    err = _fails(capsys, "eval", "tiny:llama", "--data", str(chat["test"]), "--task", "classification")
    assert "classification needs labels" in err
    err = _fails(capsys, "eval", "tiny:llama", "--data", str(chat["test"]), "--few-shot", "2")
    assert "--few-shot needs training examples" in err
    assert "give --data" in _fails(capsys, "eval", "tiny:llama")


def test_eval_of_a_base_model_with_labels_on_chat_data(tmp_path, capsys):
    chat = write_splits(tmp_path / "chat", chat_ticket_records, sizes=(6, 1, 4))
    out = tmp_path / "out"
    assert main(["eval", "tiny:llama", "--data", str(chat["test"]), "--train", str(chat["train"]),
                 "--labels", ",".join(LABELS), "--few-shot", "3", "--samples", "1",
                 "--output-dir", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    task = result["tasks"]["chat"]
    assert result["systems"] == ["base_zero_shot", "base_few_shot"]
    assert task["type"] == "classification" and sorted(task["labels"]) == sorted(LABELS)
    assert len(task["shots"]) == 3
