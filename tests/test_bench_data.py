"""The benchmark's synthetic chat data: deterministic, and spread in length as specified."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench import common  # noqa: E402
from bench.common import (  # noqa: E402
    MAX_TOTAL,
    MIN_TOTAL,
    TokenCounter,
    ensure_chat_dataset,
    format_table,
    make_chat_examples,
    percentile,
    train_flops,
)
from tuneforge.models.tiny import byte_tokenizer  # noqa: E402


def _lengths(records, tokenizer=None):
    counter = TokenCounter(tokenizer)
    prompts = [counter.text(r["messages"][0]["content"]) for r in records]
    replies = [counter.text(r["messages"][1]["content"]) for r in records]
    totals = [counter.chat(r["messages"]) for r in records]
    return prompts, replies, totals


def test_same_seed_same_records_other_seed_other_records():
    a = make_chat_examples(64, seed=3)
    assert a == make_chat_examples(64, seed=3)
    assert a != make_chat_examples(64, seed=4)
    # record i depends on (seed, i) only: a bigger data set starts with the smaller one
    assert make_chat_examples(80, seed=3)[:64] == a


def test_records_are_openai_chat_made_of_vocabulary_words():
    vocabulary = {w.lower() for w in common.VOCABULARY}
    for record in make_chat_examples(32, seed=0):
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        for message in record["messages"]:
            words = [w.strip(",.?").lower() for w in message["content"].split()]
            assert words and set(words) <= vocabulary
            assert message["content"][-1] in ".?"
    assert len(set(common.VOCABULARY)) >= 250


@pytest.mark.parametrize("tokenizer", [None, byte_tokenizer()], ids=["words", "bytes"])
def test_lengths_spread_log_normally_and_totals_are_clipped(tokenizer):
    records = make_chat_examples(256, seed=0, tokenizer=tokenizer)
    prompts, replies, totals = _lengths(records, tokenizer)
    assert all(MIN_TOTAL <= t <= MAX_TOTAL for t in totals)
    for values, median in ((prompts, common.PROMPT_MEDIAN), (replies, common.COMPLETION_MEDIAN)):
        assert 0.85 * median <= percentile(values, 0.5) <= 1.15 * median
        # a real spread, not a constant: the 10th and 90th percentiles are far from the median
        assert percentile(values, 0.1) < 0.65 * median
        assert percentile(values, 0.9) > 1.6 * median
    assert max(totals) == MAX_TOTAL  # the long tail reaches the clip


def test_dataset_file_is_written_once_and_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DATA_DIR", tmp_path)
    path = ensure_chat_dataset(48, seed=1, tag="t")
    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert ensure_chat_dataset(48, seed=1, tag="t") == path
    assert path.read_bytes() == first and path.stat().st_mtime_ns == mtime
    lines = first.decode().splitlines()
    assert len(lines) == 48 and "messages" in json.loads(lines[0])


def test_table_and_flops_helpers():
    table = format_table([{"name": "a", "x": 1.234}, {"name": "bb", "x": None}],
                         [("name", "name", ""), ("x", "value", ".1f")])
    assert table.splitlines() == ["name  value", "----  -----", "a       1.2", "bb        -"]
    shape = {"n_body": 100, "n_head": 10, "n_lora": 0, "n_layers": 2, "attn_width": 4}
    # full: 6 per weight and token (head on trained tokens only), attention 3 x 4 x width x pairs
    assert train_flops(shape, "full", 5, 2, 15) == 6 * 100 * 5 + 6 * 10 * 2 + 12 * 2 * 4 * 15
    assert train_flops(shape, "lora", 5, 2, 15) == 4 * 100 * 5 + 4 * 10 * 2 + 12 * 2 * 4 * 15
