"""``check_data`` and ``tuneforge data check``: duplicates, leakage, lengths, stats, the CLI.

Token counts use a stand-in for ``tuneforge.data.render`` (one token per word plus one per
message), so these tests need no model and do not depend on the real renderer.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.data import validate
from tuneforge.data.cli import register
from tuneforge.data.example import Example
from tuneforge.data.validate import check_data, distribution, estimate_epoch_time
from tuneforge.errors import DataError


def write_jsonl(path: Path, *records: dict | str) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


class FakeTokenizer:
    model_max_length = int(1e30)  # what HF reports when the limit is unknown
    chat_template: str | None = "{{ fake }}"


def fake_render_sft(example: Example, tokenizer, max_length: int | None = None):
    """One token per message (its role) plus one per word; assistant words are trained."""
    if example.messages is None:
        prompt, completion = example.prompt.split(), example.completion.split()
        ids = [1] * (len(prompt) + len(completion))
        return SimpleNamespace(input_ids=ids, labels=[-100] * len(prompt) + [1] * len(completion))
    if not tokenizer.chat_template:
        raise DataError(f"{example.where}: chat-format data needs a tokenizer with a chat template")
    ids: list[int] = []
    labels: list[int] = []
    for m in example.messages:
        words = m.content.split()
        trained = m.role == "assistant" and m.weight != 0
        ids += [0] + [1] * len(words)
        labels += [-100] + ([1] if trained else [-100]) * len(words)
    return SimpleNamespace(input_ids=ids[:max_length], labels=labels[:max_length])


@pytest.fixture(autouse=True)
def stand_in_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("tuneforge.data.render")
    module.render_sft = fake_render_sft
    monkeypatch.setitem(sys.modules, "tuneforge.data.render", module)
    monkeypatch.setattr(validate, "measure_matmul_flops", lambda: (1e12, "bfloat16", "cpu"))


# --- duplicates, leakage, unreadable files ----------------------------------------------------


def test_duplicate_is_a_warning_naming_the_first_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", chat("Hello  World", "hi"), chat("x", "y"), chat("hello world", "HI")
    )
    report = check_data(path)
    assert report.ok
    [problem] = report.problems
    assert (problem.severity, str(problem)) == ("warning", f"{path}:3: record: duplicate of line 1")


def test_train_test_overlap_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat("a", "b"), chat("c", "d"))
    test = write_jsonl(tmp_path / "test.jsonl", chat("e", "f"), chat("C", " d "))
    valid = write_jsonl(tmp_path / "valid.jsonl", chat("a", "b"))
    report = check_data(train, validation=[valid], test=[test])
    assert not report.ok
    assert [str(p) for p in report.errors] == [
        f"{valid}:1: record: same example as {train}:1 in the training data "
        "(train/validation leakage)",
        f"{test}:2: record: same example as {train}:2 in the training data (train/test leakage)",
    ]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("")
    report = check_data(path)
    assert not report.ok and str(report.errors[0]) == f"{path}: no records: the file is empty"
    assert report.stats["files"][0]["examples"] == 0


def test_missing_file_is_reported_not_raised(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"))
    report = check_data(train, validation=[tmp_path / "nope.jsonl"])
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'nope.jsonl'}: file not found"]


def test_problems_of_all_files_reported_at_once(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", "{bad", chat("a", "b"), {"messages": []})
    valid = write_jsonl(tmp_path / "v.jsonl", chat("x", "y"), chat("a", "b"))
    report = check_data(train, validation=[valid])
    assert [(Path(p.source).name, p.line, p.field) for p in report.errors] == [
        ("t.jsonl", 1, "json"),
        ("t.jsonl", 3, "messages"),
        ("v.jsonl", 2, "record"),
    ]


def test_parquet_duplicates_say_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "a"], "label": ["x", "x"]}), path)
    [problem] = check_data(path).warnings  # (one class, x: also an error, see test_data_degenerate)
    assert str(problem) == f"{path}:row 2: record: duplicate of row 1"


# --- tokens and statistics --------------------------------------------------------------------


def test_token_stats_and_over_length(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("one two", "three"), chat("a", "b c d e f"))
    report = check_data(path, tokenizer=FakeTokenizer(), max_length=6)
    [problem] = report.errors
    assert (
        str(problem)
        == f"{path}:2: messages: 8 tokens after the chat template; the limit is 6 (max_length)"
    )
    tokens = report.stats["tokens"]["train"]
    assert tokens["total"] == {"min": 5, "mean": 6.5, "p50": 5, "p90": 8, "p99": 8, "max": 8}
    assert (
        tokens["trained"]["max"] == 5 and tokens["tokens"] == 13 and tokens["trained_tokens"] == 6
    )
    assert tokens["over_limit"] == 1


def test_tokenizer_limit_used_only_when_real(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a b c d e", "f"))
    tokenizer = FakeTokenizer()
    assert check_data(path, tokenizer=tokenizer).ok  # 1e30 sentinel: stats only
    tokenizer.model_max_length = 4
    [problem] = check_data(path, tokenizer=tokenizer).errors
    assert "the limit is 4 (the tokenizer's model_max_length)" in problem.message
    [problem] = check_data(path, tokenizer=FakeTokenizer(), context_limit=5).errors
    assert "the limit is 5 (the model's context length)" in problem.message


def test_preference_counts_prompt_with_each_response(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", {"prompt": "q", "chosen": "yes", "rejected": "no no no"}
    )
    report = check_data(path, tokenizer=FakeTokenizer(), max_length=5)
    assert report.stats["tokens"]["train"]["sequences"] == 2
    assert [(p.line, p.field) for p in report.errors] == [(1, "rejected")]


def test_render_failures_grouped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"), chat("c", "d"), chat("e", "f"))
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = None
    [problem] = check_data(path, tokenizer=tokenizer).errors
    assert str(problem) == (
        f"{path}:1: template: chat-format data needs a tokenizer with a chat template "
        "(and 2 more examples like it)"
    )


def test_time_estimate(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a b", "c"))  # 5 tokens
    report = check_data(path, tokenizer=FakeTokenizer(), n_params=7_000, flops_per_second=1e6)
    est = report.stats["estimate"]
    assert est["full_finetune_seconds"] == pytest.approx(6 * 7_000 * 5 / (1e6 * 0.35), abs=0.1)
    assert est["lora_seconds"] == pytest.approx(4 * 7_000 * 5 / (1e6 * 0.35), abs=0.1)
    text = report.render()
    assert "ESTIMATE" in text and "6·params·tokens" in text and "LoRA" in text
    assert json.loads(report.to_json())["stats"]["estimate"]["n_params"] == 7_000


def test_estimate_uses_the_probe_when_no_throughput_given() -> None:
    est = estimate_epoch_time(1_000_000, 1_000)
    assert est["matmul_flops"] == 1e12 and est["probe_dtype"] == "bfloat16"


def test_matmul_probe_measures_something(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real probe, short
    flops, dtype, device = validate.measure_matmul_flops.__wrapped__(0.02)
    assert flops > 0 and dtype in ("float32", "bfloat16") and device in ("cpu", "cuda")


def test_distribution_percentiles() -> None:
    assert distribution([]) is None
    assert distribution(list(range(1, 101))) == {
        "min": 1,
        "mean": 50.5,
        "p50": 50,
        "p90": 90,
        "p99": 99,
        "max": 100,
    }


def test_report_render_and_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"), '{"messages": 3}')
    report = check_data(path, tokenizer=FakeTokenizer())
    text = report.render()
    assert text.index("Errors (1):") < text.index("Files:") < text.index("Tokens per sequence")
    assert f"{path}:2: messages: expected an array of messages, got number" in text
    assert text.rstrip().endswith("FAILED: 1 error, 0 warnings")
    payload = json.loads(report.to_json())
    assert payload["ok"] is False and payload["problems"][0]["line"] == 2
    assert payload["stats"]["files"][0] == {
        "split": "train",
        "path": str(path),
        "format": "chat",
        "examples": 1,
        "errors": 1,
        "warnings": 0,
    }


# --- the CLI handler ----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="tuneforge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", *argv])
    code = args.func(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out + captured.err


def test_cli_errors_exit_2_with_file_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"), '{"messages": [{"role": "user"}]}')
    code, out = run_cli(capsys, str(path))
    assert code == 2
    assert f"{path}:2: messages[0].content: missing required key" in out


def test_cli_clean_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"), chat("a", "b"))
    code, out = run_cli(capsys, str(path))
    assert code == 0 and "duplicate of line 1" in out and "OK: 0 errors, 1 warning" in out


def test_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl: file not found" in out


def test_cli_json_and_leakage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"))
    test = write_jsonl(tmp_path / "x.jsonl", chat("a", "b"))
    code, out = run_cli(capsys, str(train), "--test", str(test), "--json")
    assert code == 2
    [problem] = json.loads(out)["problems"]
    assert problem["source"] == str(test) and str(train) + ":1" in problem["message"]


def test_cli_unknown_format_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"))
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, str(path), "--format", "sharegpt")
    assert info.value.code == 2


def test_cli_with_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    model = SimpleNamespace(
        parameters=lambda: [torch.zeros(10, 10), torch.zeros(5)],
        config=SimpleNamespace(max_position_embeddings=4),
    )
    loading = types.ModuleType("tuneforge.models.loading")
    loading.load_model = lambda spec: (model, FakeTokenizer())
    monkeypatch.setitem(sys.modules, "tuneforge.models.loading", loading)
    path = write_jsonl(tmp_path / "t.jsonl", chat("a", "b"), chat("a b c", "d"))
    code, out = run_cli(capsys, str(path), "--model", "tiny:llama")
    assert code == 2
    assert f"{path}:2: messages: 6 tokens after the chat template; the limit is 4" in out
    assert "105 parameters" in out and "ESTIMATE" in out


def test_prompt_files_for_rollouts_are_their_own_format(tmp_path: Path) -> None:
    """A file of prompts alone (with reward columns) is the `prompt` format: checked as such,
    its bad records named by line, never "cannot tell the format"."""
    good = write_jsonl(tmp_path / "prompts.jsonl",
                       {"prompt": "What is 2 + 3?", "answer": 5},
                       {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": 8})
    report = check_data(good, tokenizer=FakeTokenizer())
    assert report.ok and not report.warnings, report.render()
    assert report.stats["files"][0]["format"] == "prompt"
    bad = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "fine"},
                      {"prompt": [{"role": "assistant", "content": "no question"}]})
    errors = check_data(bad).errors
    assert [(e.line, e.field) for e in errors] == [(2, "prompt[0].role")]
