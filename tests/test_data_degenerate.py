"""Records without training signal: refused (or flagged) by ``data check`` and before ``train``.

One test per rule: identical preference responses, repeated or too few ranked responses,
ratings off the declared scale, chats not ending with the assistant, classification sets a
model cannot learn from, near-duplicates across train and evaluation (right at the threshold).
The CLI runs through ``tuneforge.cli.main``; one test runs ``tuneforge train`` on a tiny model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import preference_records, write_jsonl

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.formats import parse_examples
from tuneforge.data.near_duplicates import DEFAULT_THRESHOLD, jaccard
from tuneforge.data.splits import load_splits
from tuneforge.data.validate import check_data, example_key
from tuneforge.errors import ConfigError, DataError


def check_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """``tuneforge data check ARGS``: (exit code, stdout + stderr)."""
    code = main(["data", "check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def messages(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def problems(report) -> list[tuple[str, int | None, str, str]]:
    return [(p.severity, p.line, p.field, p.message) for p in report.problems]


# --- 1. preference pairs --------------------------------------------------------------------


SAME = "the same response as {} (after collapsing whitespace): nothing to prefer"


@pytest.mark.parametrize(
    ("record", "field", "first"),
    [
        (
            {"prompt": "q", "chosen": "Yes,  it\nis.", "rejected": " Yes, it is. "},
            "rejected",
            "chosen",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": "Sure thing"}],
                "non_preferred_output": [{"role": "assistant", "content": "Sure\tthing"}],
            },
            "non_preferred_output",
            "preferred_output",
        ),
        (
            {"chosen": messages("q", "same  words"), "rejected": messages("q", "same words")},
            "rejected",
            "chosen",
        ),
    ],
    ids=["trl", "openai", "implicit-prompt"],
)
def test_identical_preference_responses_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict, field: str, first: str
) -> None:
    ok = {"prompt": "q", "chosen": "Yes, it is.", "rejected": "yes, it is."}  # case counts
    path = write_jsonl(tmp_path / "pairs.jsonl", [ok, record])
    report = check_data(path)
    assert problems(report) == [("error", 2, field, SAME.format(first))]
    code, out = check_cli(capsys, path)
    assert code == 2 and f"{path}:2: {field}: the same response as {first}" in out


# --- 2. rankings ----------------------------------------------------------------------------


def test_rankings_need_two_distinct_responses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(
        tmp_path / "ranks.jsonl",
        [
            {"prompt": "q", "responses": ["best", "good", "bad"]},
            {"prompt": "q", "responses": ["a b", "c", " a  b"], "scores": [1, 3, 2]},
            {"prompt": "q", "responses": ["only one"]},
        ],
    )
    assert problems(check_data(path)) == [
        ("error", 2, "responses[2]", SAME.format("responses[0]")),
        ("error", 3, "responses", "a ranking needs at least 2 responses, got 1"),
    ]
    code, out = check_cli(capsys, path)
    assert code == 2 and f"{path}:2: responses[2]: the same response as responses[0]" in out


# --- 3. ratings -----------------------------------------------------------------------------


def rating(value: float) -> dict:
    return {"prompt": "q", "response": f"answer {value}", "rating": value}


def test_ratings_outside_the_declared_scale_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "ratings.jsonl", [rating(1), rating(5), rating(6), rating(0.5)])
    assert check_data(path).ok  # no scale declared: no range check
    off = "is outside the declared rating scale 1 to 5"
    assert problems(check_data(path, rating_scale=[1, 5])) == [
        ("error", 3, "rating", f"6 {off}"),
        ("error", 4, "rating", f"0.5 {off}"),
    ]
    code, out = check_cli(capsys, path, "--rating-scale", "1,5")
    assert code == 2 and f"{path}:3: rating: 6 {off}" in out
    assert check_cli(capsys, path, "--rating-scale", "0,10")[0] == 0
    for bad in ("5,1", "one,five", "1"):
        code, out = check_cli(capsys, path, "--rating-scale", bad)
        assert code == 2 and "expected LOW,HIGH" in out and "Traceback" not in out


def test_the_config_declares_the_scale_for_training(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ratings.jsonl", [rating(1), rating(7)])
    config = load_config(None, [f"data.train={path}", "data.rating_scale=[1, 5]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: rating: 7 is outside")):
        load_splits(config, ("rating",), "reward")
    for bad in ("[5, 1]", "[1, 2, 3]", "[1, .inf]"):
        with pytest.raises(ConfigError, match="data.rating_scale: expected"):
            load_config(None, [f"data.train={path}", f"data.rating_scale={bad}"])


# --- 4. chats -------------------------------------------------------------------------------


def test_a_chat_must_end_with_the_assistant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": messages("hi", "hello")},
            {"messages": [*messages("hi", "hello"), {"role": "user", "content": "and?"}]},
        ],
    )
    message = "the last message must be from the assistant, got 'user'"
    assert problems(check_data(path)) == [("error", 2, "messages[2].role", message)]
    code, out = check_cli(capsys, path)
    assert code == 2 and f"{path}:2: messages[2].role: {message}" in out


# --- 5. classification ----------------------------------------------------------------------


def labelled(*labels: str, tag: str = "t") -> list[dict]:
    return [{"text": f"{tag} ticket number {i}", "label": label} for i, label in enumerate(labels)]


def test_a_single_class_training_set_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", labelled("billing", "billing", "billing"))
    message = "every training example has the label 'billing': nothing to tell apart"
    assert problems(check_data(path)) == [("error", None, "label", message)]
    code, out = check_cli(capsys, path)
    assert code == 2 and f"{path}: label: {message}" in out


def test_rare_classes_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", labelled("a", "b", "a", "c", "b", "a"))
    assert problems(check_data(path)) == [
        (
            "warning",
            4,
            "label",
            "the class 'c' has 1 training example (fewer than 2): too few to learn",
        ),
    ]
    code, out = check_cli(capsys, path, "--min-class-count", "3")
    assert code == 0
    assert f"{path}:2: label: the class 'b' has 2 training examples (fewer than 3)" in out
    assert f"{path}:4: label: the class 'c' has 1 training example (fewer than 3)" in out
    assert check_cli(capsys, path, "--min-class-count", "0")[0] == 2


def test_evaluation_labels_never_seen_in_training_are_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", labelled("a", "b", "a", "b"))
    val = write_jsonl(tmp_path / "val.jsonl", labelled("a", "c", tag="v"))
    test = write_jsonl(tmp_path / "test.jsonl", labelled("d", tag="x"))
    report = check_data(train, validation=[val], test=[test])
    unseen = "never occurs in the training data: the model cannot learn it"
    assert report.ok
    assert [(p.source, p.line, p.message) for p in report.warnings] == [
        (str(val), 2, f"'c' {unseen}"),
        (str(test), 1, f"'d' {unseen}"),
    ]
    code, out = check_cli(capsys, train, "--validation", val, "--test", test)
    assert code == 0 and f"{val}:2: label: 'c' {unseen}" in out


def test_declared_labels_refuse_others_and_flag_missing_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", labelled("a", "b", "a", "b", "z"))
    val = write_jsonl(tmp_path / "val.jsonl", labelled("q", tag="v"))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c"]))
    report = check_data(train, validation=[val], labels=labels)
    undeclared = "is not one of the declared labels (a, b, c)"
    assert sorted(problems(report), key=str) == sorted(
        [
            ("error", 5, "label", f"'z' {undeclared}"),
            ("error", 1, "label", f"'q' {undeclared}"),  # reported once, not also as unseen
            (
                "warning",
                5,
                "label",
                "the class 'z' has 1 training example (fewer than 2): too few to learn",
            ),
            ("warning", None, "label", "the declared label 'c' has no training examples"),
        ],
        key=str,
    )
    code, out = check_cli(capsys, train, "--labels", "a,b,z")
    assert code == 0 and "the declared label" not in out
    code, out = check_cli(capsys, train, "--labels", "a,b")
    assert code == 2 and f"{train}:5: label: 'z' is not one of the declared labels (a, b)" in out
    # training reads data.labels (a list or a file) through the same checks
    config = load_config(None, [f"data.train={train}", f"data.labels={labels}"])
    with pytest.raises(DataError, match=re.escape(f"{train}:5: label: 'z' {undeclared}")):
        load_splits(config)


def test_training_prints_warnings_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", labelled("a", "b", "a", "c", "b", "a"))
    examples, validation = load_splits(load_config(None, [f"data.train={train}"]))
    assert len(examples) == 6 and validation == []
    assert f"warning: {train}:4: label: the class 'c' has 1 training example" in (
        capsys.readouterr().err
    )


# --- 6. near-duplicates across train and evaluation ------------------------------------------


WORDS = [f"word{i}" for i in range(40)]


def variant(changed: int) -> str:
    """The training text with its last ``changed`` words replaced."""
    return " ".join(WORDS[: len(WORDS) - changed] + [f"other{i}" for i in range(changed)])


def pair(prompt: str) -> dict:
    return {"prompt": prompt, "completion": " ok"}


def key_of(path: Path, line: int = 1) -> str:
    examples, _ = parse_examples(path)
    return example_key(next(ex for ex in examples if ex.line == line))


def test_near_duplicates_at_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            pair("an unrelated ticket about something else entirely"),
            pair(variant(0)),
        ],
    )
    # the Jaccard similarity of each variant's whole example to the training one, exactly
    scores = {}
    for changed in range(1, 10):
        path = write_jsonl(tmp_path / f"v{changed}.jsonl", [pair(variant(changed))])
        scores[changed] = jaccard(key_of(train, 2), key_of(path))
    above = max(c for c in scores if scores[c] >= DEFAULT_THRESHOLD)  # the closest above
    below = above + 1
    assert scores[above] >= DEFAULT_THRESHOLD > scores[below]
    val = write_jsonl(
        tmp_path / "val.jsonl",
        [
            pair(variant(above)),
            pair(variant(below)),
            pair(variant(0)),  # an exact copy: the leakage error, no warning
        ],
    )
    report = check_data(train, validation=[val])
    [near] = report.warnings
    assert (near.source, near.line) == (str(val), 1)
    assert near.message == (
        f"near-duplicate of {train}:2 in the training data (Jaccard {scores[above]:.3f} >= "
        f"{DEFAULT_THRESHOLD:g}): possible train/validation leakage"
    )
    [exact] = report.errors
    assert exact.line == 3 and "same example as" in exact.message
    # right at a given threshold: the pair scoring exactly it is flagged, the next one is not
    at = scores[below]
    report = check_data(train, validation=[val], near_dup_threshold=at)
    assert [p.line for p in report.warnings] == [1, 2]
    report = check_data(train, validation=[val], near_dup_threshold=at + 1e-9)
    assert [p.line for p in report.warnings] == [1]
    # warnings alone exit 0
    code, out = check_cli(capsys, train, "--test", tmp_path / f"v{above}.jsonl")
    assert (
        code == 0
        and f"{tmp_path / f'v{above}.jsonl'}:1: record: near-duplicate of {train}:2" in out
    )
    assert "train/test leakage" in out
    code, out = check_cli(capsys, train, "--near-dup-threshold", "1.5")
    assert code == 2 and "must be in (0, 1]" in out


# --- before every train ---------------------------------------------------------------------


def test_train_refuses_identical_chosen_and_rejected(tmp_path: Path) -> None:
    records = preference_records(8)
    records[2]["rejected"] = [dict(records[2]["chosen"][0])]
    records[2]["rejected"][0]["content"] += "  "
    train = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(
        "recipe: dpo\n"
        "model: {name: 'tiny:llama'}\n"
        "adapter: {method: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {train}}}\n"
        "train: {batch_size: 4, max_steps: 2, bf16: false}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"{train}:3: rejected: the same response as chosen" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
