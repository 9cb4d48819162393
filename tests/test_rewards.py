"""Programmatic rewards: each built-in function on hand-made completions, loading a user's own
function by module or file path, and the errors for every way that can go wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tuneforge.errors import ConfigError
from tuneforge.rewards import (
    REWARD_FUNCTIONS,
    answer_format,
    arithmetic,
    call_reward,
    final_number,
    json_object,
    length,
    load_reward_fn,
    support_reply,
)

REPO = Path(__file__).resolve().parents[1]


def test_answer_format() -> None:
    completions = [
        "3 boxes of 4 is 12.\nAnswer: 12",
        "Answer: $1,299.50.",
        "Answer: 12\nHope that helps!",
        "The answer is 12",
        "Answer: twelve",
        "",
    ]
    assert answer_format([""] * 6, completions) == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]


def test_final_number_prefers_the_answer_line() -> None:
    assert final_number("3 + 4 = 7, so ... Answer: -7.5 (not 8)") == -7.5
    assert final_number("we pay $1,250 in total") == 1250.0
    assert final_number("no digits here") is None


def test_arithmetic_compares_with_the_answer_column() -> None:
    completions = ["Answer: 42", "It is 42.0", "Answer: 41", "no idea", "Answer: 1,299"]
    answers = [42, "42", 42, 42, 1299]
    assert arithmetic([""] * 5, completions, answer=answers, other=[0] * 5) == [
        1.0,
        1.0,
        0.0,
        0.0,
        1.0,
    ]


def test_arithmetic_needs_an_answer_column() -> None:
    with pytest.raises(ConfigError, match="needs a column 'answer' in the prompt data"):
        arithmetic(["q"], ["Answer: 1"])
    with pytest.raises(ConfigError, match="holds 'seven', not a number"):
        arithmetic(["q"], ["Answer: 1"], answer=["seven"])


def test_length_band_default_and_per_record() -> None:
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    assert length(["", "", "", ""], [words(4), words(20), words(60), words(100)]) == [
        0.5,
        1.0,
        0.5,
        0.0,
    ]
    assert length([""], [words(3)], min_words=[1], max_words=[2]) == [0.5]


def test_json_object() -> None:
    completions = ['{"a": 1, "b": 2}', '```json\n{"a": 1}\n```', "[1, 2]", "{not json", '{"b": 1}']
    keys = [["a", "b"], "a", [], [], "a, b"]
    assert json_object([""] * 5, completions, json_keys=keys) == [1.0, 1.0, 0.0, 0.0, 0.5]
    assert json_object([""], ['{"x": 1}']) == [1.0]


def test_support_reply_format_and_department() -> None:
    completions = [
        "Department: Billing\nReply: We'll refund the duplicate charge within 5 days.",
        "Department: Shipping\nReply: Your parcel is on its way.",
        "Department: Sales desk\nReply: Hello.",
        "Billing. We will refund you.",
        "Department: Billing\nReply:   ",
    ]
    departments = ["Billing", "Returns", "Sales", "Billing", "Billing"]
    assert support_reply([""] * 5, completions, department=departments) == [
        1.0,
        0.5,
        0.0,
        0.0,
        0.0,
    ]
    assert support_reply([""], completions[:1]) == [1.0]


def test_every_registered_reward_returns_one_number_per_completion() -> None:
    columns = {"answer": [1, 2], "department": ["Billing", "Sales"]}
    for name in REWARD_FUNCTIONS:
        fn = load_reward_fn(name)
        values = call_reward(fn, ["p", "q"], ["Answer: 1", "Department: Sales\nReply: Hi"], columns)
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), name


# --- the user's own functions -------------------------------------------------------------


USER_REWARDS = """
def shout(prompts, completions, **columns):
    return [float(c.isupper()) for c in completions]

def wrong_count(prompts, completions, **columns):
    return [1.0]

def not_numbers(prompts, completions, **columns):
    return ["high" for _ in completions]

def no_arguments():
    return []

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_load_from_a_file_path(user_file: Path) -> None:
    fn = load_reward_fn(f"{user_file}:shout")
    assert call_reward(fn, ["a", "b"], ["LOUD", "quiet"]) == [1.0, 0.0]


def test_load_from_an_importable_module(user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(user_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    fn = load_reward_fn("my_rewards:shout")
    assert fn(["a"], ["YES"]) == [1.0]
    assert load_reward_fn("tuneforge.rewards:arithmetic") is arithmetic


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("correctness", "reward 'correctness' unknown; use one of answer_format, arithmetic"),
        ("no_such_module_xyz:fn", "cannot import no_such_module_xyz"),
        ("/nowhere/r.py:fn", "no such file /nowhere/r.py"),
        ("{file}:missing", "has no 'missing' (functions: no_arguments, not_numbers, shout"),
        ("{file}:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
        ("{file}:no_arguments", "must take (prompts, completions, **columns)"),
    ],
)
def test_load_errors(user_file: Path, ref: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_reward_fn(ref.format(file=user_file))
    assert message in str(info.value)


def test_a_module_that_fails_to_load_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"loading .*broken\.py failed: RuntimeError: boom"):
        load_reward_fn(f"{path}:fn")


def test_call_reward_checks_what_comes_back(user_file: Path) -> None:
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        call_reward(load_reward_fn(f"{user_file}:wrong_count"), ["a", "b"], ["x", "y"])
    with pytest.raises(ConfigError, match="returned 'high' for completion 0"):
        call_reward(load_reward_fn(f"{user_file}:not_numbers"), ["a"], ["x"])


def test_shipped_prompt_files_carry_the_columns_their_rewards_need() -> None:
    folder = REPO / "examples" / "data" / "feedback"
    for name, reward in (("arithmetic", "arithmetic"), ("replies", "support_reply")):
        for split in ("train", "test"):
            rows = [json.loads(line) for line in (folder / f"{name}_{split}.jsonl").open()]
            columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
            prompts = [r["prompt"] for r in rows]
            values = call_reward(load_reward_fn(reward), prompts, ["?"] * len(rows), columns)
            assert values == [0.0] * len(rows)
