"""Reading and normalising data files: every format, every malformed case, CSV and Parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tuneforge.data.example import Message
from tuneforge.data.formats import (
    FORMATS,
    Problem,
    detect_format,
    load_examples,
    parse_examples,
    read_records,
)
from tuneforge.errors import DataError


def write_jsonl(path: Path, *records: dict | str) -> Path:
    """Dicts are dumped as JSON; strings are written as the raw line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))


def only_error(path: Path, fmt: str | None = None) -> Problem:
    _, problems = parse_examples(path, fmt)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1, [str(p) for p in problems]
    return errors[0]


# --- detection and normalisation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        (GOOD_CHAT, "chat"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "a", "label": 1}, "classification"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        (
            {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []},
            "preference",
        ),
        ({"prompt": "a", "responses": ["b", "c"]}, "ranking"),
        ({"prompt": "a", "responses": ["b", "c"], "scores": [1, 2]}, "ranking"),
        ({"something": "else"}, None),
    ],
)
def test_detect_format(record: dict, expected: str | None) -> None:
    assert detect_format(record) == expected
    assert expected is None or expected in FORMATS


def test_separator_style_prompt_completion_is_byte_exact(tmp_path: Path) -> None:
    record = {"prompt": "James##\n", "completion": " name\n###\n"}
    [ex] = load_examples(write_jsonl(tmp_path / "d.jsonl", record))
    assert (ex.format, ex.prompt, ex.completion) == (
        "prompt_completion",
        "James##\n",
        " name\n###\n",
    )
    assert ex.messages is None and (ex.source, ex.line) == (str(tmp_path / "d.jsonl"), 1)


def test_conversational_prompt_completion_trains_only_the_completion(tmp_path: Path) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        "completion": [{"role": "assistant", "content": "d"}],
    }
    [ex] = load_examples(write_jsonl(tmp_path / "d.jsonl", record))
    assert [m.content for m in ex.messages] == ["a", "b", "c", "d"]
    assert [m.weight for m in ex.messages] == [None, 0.0, None, None]


def test_chat_keeps_roles_and_weights(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bad", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "good", "weight": 1},
        ],
        "id": 7,
    }
    [ex] = load_examples(write_jsonl(tmp_path / "d.jsonl", record))
    assert ex.format == "chat" and ex.kind == "sft" and ex.extra == {"id": 7}
    assert ex.messages[0] == Message("system", "be brief")
    assert [m.weight for m in ex.messages] == [None, None, 0.0, None, 1.0]


def test_alpaca_joins_instruction_and_input(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say yo", "output": "yo"},
    )
    examples = load_examples(path)
    assert [ex.messages[0].content for ex in examples] == ["Translate\n\nchat", "Say hi", "Say yo"]
    assert examples[0].messages[1] == Message("assistant", "cat")


def test_classification_label_may_be_an_int(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", {"text": "great", "label": 1}, {"text": "bad", "label": "neg"}
    )
    first, second = load_examples(path)
    assert (first.label, first.messages[1].content) == ("1", "1")
    assert (second.messages[0].content, second.label) == ("bad", "neg")


def test_preference_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    [ex] = load_examples(path)
    assert ex.kind == "preference" and ex.prompt_messages == [Message("user", "q")]
    assert ex.responses == [[Message("assistant", "good")], [Message("assistant", "bad")]]


def test_preference_conversational_with_explicit_and_implicit_prompt(tmp_path: Path) -> None:
    user = {"role": "user", "content": "q"}
    good, bad = ({"role": "assistant", "content": c} for c in ("good", "bad"))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},
    )
    for ex in load_examples(path):
        assert ex.prompt_messages == [Message("user", "q")]
        assert [r[0].content for r in ex.responses] == ["good", "bad"]


def test_openai_preference(tmp_path: Path) -> None:
    record = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    [ex] = load_examples(write_jsonl(tmp_path / "d.jsonl", record))
    assert ex.format == "preference" and ex.kind == "preference"
    assert ex.prompt_messages == [Message("user", "q")]
    assert ex.responses == [[Message("assistant", "good")], [Message("assistant", "bad")]]


def test_ranking_sorted_best_first_by_score(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        {"prompt": "q", "responses": ["ok", "best", "worst"], "scores": [2, 5.5, -1]},
        {"prompt": "q", "responses": ["first", "second"]},
    )
    scored, ordered = load_examples(path)
    assert scored.kind == "ranking"
    assert [r[0].content for r in scored.responses] == ["best", "ok", "worst"]
    assert scored.scores == [5.5, 2.0, -1.0]
    assert [r[0].content for r in ordered.responses] == ["first", "second"]
    assert ordered.scores is None


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", {"prompt": "only a prompt"})
    problem = only_error(path, "prompt_completion")
    assert (problem.line, problem.field, problem.message) == (
        1,
        "completion",
        "missing required key",
    )


# --- malformed data: one test per case, exact fragment and line ----------------------------


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", GOOD_CHAT, "", '{"messages": [} ')
    problem = only_error(path)
    assert problem.line == 3 and problem.field == "json"
    assert "invalid JSON" in problem.message and "(column 15)" in problem.message
    assert str(problem) == f"{path}:3: json: {problem.message}"


def test_non_object_line(tmp_path: Path) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", GOOD_CHAT, "[1, 2]"))
    assert (problem.line, problem.message) == (2, "expected a JSON object, got array")


def test_missing_key(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", {"prompt": "a", "completion": "b"}, {"completion": "b"}
    )
    problem = only_error(path)
    assert str(problem) == f"{path}:2: prompt: missing required key"


def test_wrong_type(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", {"prompt": "a", "completion": 3})
    assert str(only_error(path)) == f"{path}:1: completion: expected a string, got number"


def test_empty_content(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", GOOD_CHAT, chat(("user", "hi"), ("assistant", "  ")))
    assert str(only_error(path)) == f"{path}:2: messages[1].content: empty content"


def test_wrong_role_order(tmp_path: Path) -> None:
    record = chat(("user", "a"), ("user", "b"), ("assistant", "c"))
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", record))
    assert (problem.line, problem.field) == (1, "messages[1].role")
    assert "expected role 'assistant' here, got 'user'" in problem.message


def test_system_message_only_first(tmp_path: Path) -> None:
    record = chat(("user", "a"), ("system", "b"), ("assistant", "c"))
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", record))
    assert problem.field == "messages[1].role" and "only allowed first" in problem.message


def test_last_message_not_assistant(tmp_path: Path) -> None:
    record = chat(("user", "a"), ("assistant", "b"), ("user", "c"))
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", GOOD_CHAT, record))
    assert (problem.line, problem.field) == (2, "messages[2].role")
    assert "the last message must be from the assistant, got 'user'" in problem.message


def test_bad_weight(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0.5},
        ]
    }
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", record))
    assert str(problem).endswith(":1: messages[1].weight: weight must be 0 or 1, got 0.5")


def test_weight_on_user_message(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "a", "weight": 1},
            {"role": "assistant", "content": "b"},
        ]
    }
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", record))
    assert problem.field == "messages[0].weight" and "only allowed on assistant" in problem.message


def test_all_weights_zero_is_a_warning(tmp_path: Path) -> None:
    record = chat(("user", "a"), ("assistant", "b"))
    record["messages"][1]["weight"] = 0
    path = write_jsonl(tmp_path / "d.jsonl", record)
    examples, [problem] = parse_examples(path)
    assert len(examples) == 1 and problem.severity == "warning"
    assert "nothing to train on" in problem.message


def test_unknown_role(tmp_path: Path) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", chat(("user", "a"), ("bot", "b"))))
    assert problem.field == "messages[1].role" and "unknown role 'bot'" in problem.message


def test_mixed_formats_name_the_odd_line(tmp_path: Path) -> None:
    pc = {"prompt": "a", "completion": "b"}
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", pc, GOOD_CHAT, pc))
    assert problem.line == 2 and "look like format 'chat'" in problem.message
    assert "'prompt_completion'" in problem.message


def test_undetectable_record(tmp_path: Path) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", {"question": "a", "answer": "b"}))
    assert "cannot tell the format from its keys (answer, question)" in problem.message


def test_ranking_needs_two_responses(tmp_path: Path) -> None:
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", {"prompt": "q", "responses": ["a"]}))
    assert problem.field == "responses" and "at least 2 responses, got 1" in problem.message


def test_ranking_scores_must_align(tmp_path: Path) -> None:
    record = {"prompt": "q", "responses": ["a", "b"], "scores": [1]}
    problem = only_error(write_jsonl(tmp_path / "d.jsonl", record))
    assert problem.field == "scores" and "expected 2 scores" in problem.message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    problem = only_error(path)
    assert problem.line is None and str(problem) == f"{path}: no records: the file is empty"
    with pytest.raises(DataError, match="no records"):
        load_examples(path)


def test_unknown_format_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", GOOD_CHAT)
    with pytest.raises(
        DataError, match="unknown data format 'sharegpt'; use one of: prompt_completion"
    ):
        load_examples(path, "sharegpt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        parse_examples(path)


def test_load_examples_lists_every_problem_capped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", *(["{bad"] * 60))
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 60 problems in the data:")
    assert f"{path}:50: json:" in message and f"{path}:51: json:" not in message
    assert message.endswith("... and 10 more")


# --- CSV and Parquet --------------------------------------------------------------------------


def test_csv_rows_nested_json_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(GOOD_CHAT["messages"])])
        f.write('"multi\nline, not json"\n')  # a quoted cell spanning lines 3-4
        writer.writerow([json.dumps(chat(("user", "a"), ("user", "b"))["messages"])])
    records = read_records(path)
    assert [line for line, _ in records] == [2, 3, 5]
    examples, problems = parse_examples(path)
    assert len(examples) == 1 and examples[0].messages[1].content == "hello"
    assert [(p.line, p.field) for p in problems] == [(3, "messages"), (5, "messages[1].role")]
    assert "expected an array of messages, got string" in problems[0].message


def test_csv_prompt_completion_kept_byte_exact(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt", "completion"], ["James##\n", " name\n###\n"]])
    [ex] = load_examples(path)
    assert (ex.prompt, ex.completion, ex.line) == ("James##\n", " name\n###\n", 2)


def test_parquet_nested_messages_and_row_numbers(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        GOOD_CHAT["messages"],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}],
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": rows}), path)
    examples, problems = parse_examples(path)
    assert len(examples) == 1 and examples[0].messages[0].weight is None
    [problem] = problems
    assert str(problem) == f"{path}:row 2: messages[1].weight: weight must be 0 or 1, got 0.5"
