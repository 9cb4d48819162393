"""Hold-out hygiene: test examples found in the training data, exactly or nearly, with counts."""

from __future__ import annotations

import pytest
from eval_helpers import ticket_records
from helpers import write_jsonl

from tuneforge.data.formats import load_examples
from tuneforge.eval.holdout import LeakageError, check_holdout, find_leaks


def _files(tmp_path, train_records, test_records):
    train = load_examples(write_jsonl(tmp_path / "train.jsonl", train_records))
    test = load_examples(write_jsonl(tmp_path / "test.jsonl", test_records))
    return train, test


def test_exact_and_near_copies_are_found_and_fresh_examples_are_not(tmp_path):
    train_records = ticket_records(20)
    long = {"text": "my parcel from the warehouse in leeds never arrived and the courier app "
                    "shows it as delivered to a neighbour i have never met", "label": "shipping"}
    near = dict(long, text=long["text"].replace("leeds", "york").upper() + "!!")
    test_records = [train_records[3], near, *ticket_records(5, start=500)]
    train, test = _files(tmp_path, [*train_records, long], test_records)
    leaks = find_leaks(train, test)
    assert [(leak.test.line, leak.train.line, leak.kind) for leak in leaks] == [(1, 4, "exact"),
                                                                                (2, 21, "near")]
    assert leaks[1].similarity == pytest.approx(21 / 23)  # 22 distinct words, one swapped
    assert "test.jsonl:2 ~ " in str(leaks[1]) and "train.jsonl:21" in str(leaks[1])


def test_the_same_question_with_a_different_answer_still_leaks(tmp_path):
    record = {"text": "the bill for order 123 shows a card fee i did not expect", "label": "billing"}
    train, test = _files(tmp_path, [record], [dict(record, label="returns")])
    assert [leak.kind for leak in find_leaks(train, test)] == ["near"]


def test_check_holdout_refuses_with_counts_unless_allowed(tmp_path):
    train_records = ticket_records(10)
    test_records = [train_records[0], train_records[1], *ticket_records(3, start=100)]
    train, test = _files(tmp_path, train_records, test_records)
    with pytest.raises(LeakageError, match=r"2 of 5 test examples also appear .*: 2 exact, 0 near"):
        check_holdout(train, test, allow=False, train_path="train.jsonl")
    summary, leaks = check_holdout(train, test, allow=True, train_path="train.jsonl")
    assert (summary["exact"], summary["near"], summary["test_examples"], len(leaks)) == (2, 0, 5, 2)
    clean, _ = check_holdout(train, test[2:], allow=False, train_path="train.jsonl")
    assert clean["exact"] == clean["near"] == 0 and clean["examples"] == []


def test_the_shipped_demo_split_is_clean():
    from tuneforge.demo import find_demo_data

    data = find_demo_data()
    train, test = load_examples(data / "train.jsonl"), load_examples(data / "test.jsonl")
    assert find_leaks(train, test) == []
