"""The feedback data formats: ratings (prompt + response + rating) and unpaired thumbs up/down
(prompt + completion + boolean label, TRL's "unpaired preference"), in JSONL, CSV and Parquet,
with their malformed cases and their ``data check`` statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_data_formats import only_error, write_jsonl

from tuneforge.data.cli import register
from tuneforge.data.example import Message
from tuneforge.data.formats import (
    FORMATS,
    detect_format,
    load_examples,
    load_prompts,
    parse_examples,
)
from tuneforge.data.validate import check_data
from tuneforge.errors import DataError

RATED = {"prompt": "q", "response": "a", "rating": 4}
THUMBS_UP = {"prompt": "q", "completion": "a", "label": True}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (RATED, "rating"),
        ({"prompt": "q", "rating": 2}, "rating"),  # missing response: still a rating record
        (THUMBS_UP, "unpaired"),
        ({"completion": "a", "label": False}, "unpaired"),
        ({"text": "a", "label": "pos"}, "classification"),  # text+label stays classification
        ({"text": "a", "label": 1, "prompt": "x"}, "classification"),
    ],
)
def test_detect_feedback_formats(record: dict, expected: str) -> None:
    assert detect_format(record) == expected and expected in FORMATS


def test_rating_is_one_response_with_its_score(tmp_path: Path) -> None:
    user = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    path = write_jsonl(
        tmp_path / "d.jsonl", RATED | {"id": 3}, {"prompt": user, "response": "b", "rating": 1.5}
    )
    first, second = load_examples(path)
    assert (first.format, first.kind, first.extra) == ("rating", "rating", {"id": 3})
    assert first.prompt_messages == [Message("user", "q")]
    assert first.responses == [[Message("assistant", "a")]] and first.scores == [4.0]
    assert [m.role for m in second.prompt_messages] == ["system", "user"]
    assert second.scores == [1.5] and second.desirable is None


def test_unpaired_keeps_the_label(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        THUMBS_UP,
        {"prompt": "q", "completion": [{"role": "assistant", "content": "b"}], "label": False},
    )
    up, down = load_examples(path)
    assert (up.format, up.kind, up.desirable) == ("unpaired", "unpaired", True)
    assert up.responses == [[Message("assistant", "a")]] and up.scores is None
    assert (down.desirable, down.responses) == (False, [[Message("assistant", "b")]])


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"prompt": "q", "response": "a", "rating": "4"}, "rating", 'got "4"'),
        ({"prompt": "q", "response": "a", "rating": True}, "rating", "got true"),
        ({"prompt": "q", "response": "a", "rating": None}, "rating", "got null"),
        ({"prompt": "q", "rating": 3}, "response", "missing required key"),
        ({"response": "a", "rating": 3}, "prompt", "missing required key"),
        ({"prompt": "q", "response": " ", "rating": 3}, "response", "empty content"),
    ],
)
def test_bad_rating_records(tmp_path: Path, record: dict, field: str, message: str) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", RATED, record))
    assert (problem.line, problem.field) == (2, field) and message in problem.message


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"prompt": "q", "completion": "a", "label": "true"}, "label", "expected true or false"),
        ({"prompt": "q", "completion": "a", "label": 1}, "label", "got 1"),
        ({"prompt": "q", "label": True}, "completion", "missing required key"),
        (
            {"prompt": "q", "completion": [{"role": "user", "content": "x"}], "label": True},
            "completion[0].role",
            "a response holds assistant messages",
        ),
    ],
)
def test_bad_unpaired_records(tmp_path: Path, record: dict, field: str, message: str) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", THUMBS_UP, record))
    assert (problem.line, problem.field) == (2, field) and message in problem.message


def test_rating_line_in_an_unpaired_file_is_named(tmp_path: Path) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", THUMBS_UP, RATED, THUMBS_UP))
    assert problem.line == 2 and "look like format 'rating'" in problem.message


def test_csv_cells_are_read_as_numbers_and_booleans(tmp_path: Path) -> None:
    ratings, thumbs = tmp_path / "r.csv", tmp_path / "u.csv"
    with ratings.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [["prompt", "response", "rating"], ["q", "a", "5"], ["q", "b", "2.5"], ["q", "c", "x"]]
        )
    with thumbs.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [["prompt", "completion", "label"], ["q", "a", "True"], ["q", "b", "false"]]
        )
    examples, [problem] = parse_examples(ratings)
    assert [ex.scores for ex in examples] == [[5.0], [2.5]]
    assert str(problem) == f'{ratings}:4: rating: expected a finite number, got "x"'
    assert [ex.desirable for ex in load_examples(thumbs)] == [True, False]


def test_parquet_keeps_types(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "u.parquet"
    table = {"prompt": ["q", "q"], "completion": ["a", "b"], "label": [True, False]}
    pq.write_table(pa.table(table), path)
    assert [ex.desirable for ex in load_examples(path)] == [True, False]


def test_data_check_reports_rating_spread_and_label_balance(tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "r.jsonl",
        *(RATED | {"response": f"a{i}", "rating": i % 5 + 1} for i in range(7)),
    )
    test = write_jsonl(
        tmp_path / "u.jsonl", THUMBS_UP, THUMBS_UP | {"completion": "b", "label": False}
    )
    report = check_data(train, test=[test])
    assert report.ok
    rated, thumbs = report.stats["files"]
    assert rated["format"] == "rating"
    assert rated["ratings"] == {"1": 2, "2": 2, "3": 1, "4": 1, "5": 1}
    assert rated["rating_mean"] == pytest.approx(18 / 7, abs=0.01)
    assert thumbs["labels"] == {"desirable": 1, "undesirable": 1}
    text = report.render()
    assert "train ratings: 1: 2, 2: 2, 3: 1, 4: 1, 5: 1 (mean 2.57)" in text
    assert "test labels: 1 desirable, 1 undesirable" in text


def test_same_response_in_train_and_test_is_leakage(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", RATED)
    test = write_jsonl(tmp_path / "test.jsonl", RATED | {"rating": 1})
    [problem] = check_data(train, test=[test]).errors
    assert problem.line == 1 and "train/test leakage" in problem.message


def test_data_check_command_accepts_the_new_format_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    path = write_jsonl(tmp_path / "u.jsonl", THUMBS_UP)
    args = parser.parse_args(["data", "check", str(path), "--format", "unpaired", "--json"])
    assert args.func(args) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["files"][0]["labels"] == {"desirable": 1, "undesirable": 0}


# --- prompt files (feedback collection, PPO/GRPO) ----------------------------------------------


def test_load_prompts_text_messages_and_columns(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "2 + 3?", "answer": 5},
        {"prompt": chat[:2]},
        {"messages": chat},
    )
    text, conversational, from_chat = load_prompts(path)
    assert (text.kind, text.prompt_messages, text.extra) == (
        "prompt",
        [Message("user", "2 + 3?")],
        {"answer": 5},
    )
    assert [m.content for m in conversational.prompt_messages] == ["s", "u1"]
    assert [m.content for m in from_chat.prompt_messages] == ["s", "u1", "a1", "u2"]


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"question": "q"}, "prompt", "missing required key"),
        ({"prompt": ""}, "prompt", "empty content"),
        ({"prompt": [{"role": "assistant", "content": "x"}]}, "prompt[0].role", "expected role"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages", "no user message"),
    ],
)
def test_load_prompts_errors_name_the_line(
    tmp_path: Path, record: dict, field: str, message: str
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "fine"}, record)
    with pytest.raises(DataError) as info:
        load_prompts(path)
    assert f"{path}:2: {field}: " in str(info.value) and message in str(info.value)
