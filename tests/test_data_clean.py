"""``tuneforge data clean``: PII masking, duplicates, language and length filters, the logs.

The CLI is driven through ``tuneforge.cli.main``; token counts use ``tiny:llama``'s byte-level
tokenizer, built in code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.data import near_duplicates
from tuneforge.data.clean import clean_file, token_count
from tuneforge.data.formats import parse_examples, read_records
from tuneforge.data.pii import find_pii, mask_pii
from tuneforge.errors import DataError

EMAIL = "jane.doe@example.com"


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def run_clean(src: Path, out: Path, *flags: str) -> int:
    return main(["data", "clean", str(src), "--output", str(out), *flags])


# --- PII: each kind, and the look-alikes that must stay -----------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"write to {EMAIL} today", "write to [EMAIL] today"),
        ("call +1 (555) 123-4567 now", "call [PHONE] now"),
        ("call 555-123-4567 or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
        ("card 4111 1111 1111 1111 12/26", "card [CARD] 12/26"),
        ("amex 378282246310005.", "amex [CARD]."),
        ("IBAN DE89 3704 0044 0532 0130 00 THANKS", "IBAN [IBAN] THANKS"),
        ("pay to GB82WEST12345698765432.", "pay to [IBAN]."),
        ("from 192.168.1.20. And 2001:db8::8a2e:370:7334 too", "from [IP]. And [IP] too"),
        ("key sk-proj-Ab3dEf6hIj9kLm2nOp5q", "key [SECRET]"),
        ("Authorization: Bearer abcDEF123456ghiJKL", "Authorization: Bearer [SECRET]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [SECRET]"),
        ("token a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7", "token [SECRET]"),
    ],
)
def test_each_pii_kind_is_masked(text: str, masked: str) -> None:
    assert mask_pii(text)[0] == masked


@pytest.mark.parametrize(
    "text",
    [
        "order 12345678901 shipped",  # a bare digit run is an id, not a phone number
        "on 2024-01-15 10:30 and 15.01.2024",  # dates and times
        "build 10.0.19041.1234, total 1 000 000 000",  # a version, an amount
        "card 4111 1111 1111 1112 failed",  # card-shaped, fails Luhn: not a card nor a phone
        "amex 378282246310006",  # 15 digits failing Luhn
        "IBAN DE89 3704 0044 0532 0130 01",  # fails mod-97
        "ip 999.10.10.10, std::vector and Foo::Bar, loopback ::1",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",  # a git hash
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "class AbstractSingletonProxyFactoryBean2Impl",  # a long CamelCase identifier
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert find_pii(text) == []


def test_mask_counts_each_kind() -> None:
    text = f"{EMAIL}, {EMAIL} and 192.168.0.1"
    assert mask_pii(text) == ("[EMAIL], [EMAIL] and [IP]", {"EMAIL": 2, "IP": 1})


def test_pii_is_masked_in_output_and_logged(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat(f"My email is {EMAIL}, call 555-123-4567", "Thanks, noted."),
        chat("Where is order 12345678901?", "It shipped on 2024-01-15."),
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out) == 0
    first, second = read_jsonl(out)
    assert first["messages"][0]["content"] == "My email is [EMAIL], call [PHONE]"
    assert second == chat("Where is order 12345678901?", "It shipped on 2024-01-15.")
    [entry] = read_jsonl(tmp_path / "removed.jsonl")
    assert entry == {"source": str(src), "line": 1, "action": "masked", "reason": "pii",
                     "pii": {"EMAIL": 1, "PHONE": 1}, "record": read_jsonl(src)[0]}
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["records_in"], summary["records_out"], summary["masked"]) == (2, 2, 1)
    assert summary["pii"] == {"EMAIL": 1, "PHONE": 1}


def test_drop_pii_drops_the_record(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat("Reach me at +33 1 23 45 67 89 please", "Sure."),
        chat("What are your opening hours?", "Nine to five."),
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out, "--drop-pii") == 0
    assert read_jsonl(out) == [chat("What are your opening hours?", "Nine to five.")]
    [entry] = read_jsonl(tmp_path / "removed.jsonl")
    assert (entry["action"], entry["reason"], entry["pii"]) == ("removed", "pii", {"PHONE": 1})


# --- duplicates --------------------------------------------------------------------------------


def test_exact_duplicates_keep_the_first(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat("Hello  World", "hi"), chat("other", "thing"), chat("hello world", "HI"),
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out, "--no-near-dups") == 0
    assert len(read_jsonl(out)) == 2
    [entry] = read_jsonl(tmp_path / "removed.jsonl")
    assert (entry["line"], entry["reason"], entry["duplicate_of"]) == (3, "duplicate", 1)


def test_near_duplicates_split_at_the_threshold(tmp_path: Path) -> None:
    words = ("my order number four never arrived at the house and the tracking page still "
             "says it is waiting at the depot since last week").split()
    base = " ".join(words)
    above = " ".join(words[:5] + ["reached"] + words[6:])  # one word: three shingles differ
    below = " ".join(words[:5] + ["reached", "on"] + words[7:])  # two words: four differ
    answer = "Sorry about that, I will check."
    j_above = near_duplicates.jaccard(f"{base}\n{answer}", f"{above}\n{answer}")
    j_below = near_duplicates.jaccard(f"{base}\n{answer}", f"{below}\n{answer}")
    assert j_below < j_above
    threshold = (j_above + j_below) / 2
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat(base, answer), chat(above, answer), chat(below, answer),
        chat("something else entirely", "ok"),
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out, "--near-dup-threshold", str(threshold)) == 0
    assert [r["messages"][0]["content"] for r in read_jsonl(out)] == [
        base, below, "something else entirely"
    ]
    [entry] = read_jsonl(tmp_path / "removed.jsonl")
    assert (entry["line"], entry["reason"], entry["duplicate_of"]) == (2, "near_duplicate", 1)
    assert entry["similarity"] == pytest.approx(j_above, abs=1e-4)


def test_near_duplicates_off_keeps_them(tmp_path: Path) -> None:
    text = "the parcel was left at the door but it is not there any more today"
    src = write_jsonl(tmp_path / "in.jsonl", [chat(text, "ok"), chat(text + " sadly", "ok")])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out, "--no-near-dups", "--near-dup-threshold", "0.5") == 0
    assert len(read_jsonl(out)) == 2
    assert run_clean(src, out, "--near-dup-threshold", "0.5") == 0
    assert len(read_jsonl(out)) == 1


def test_a_shared_system_prompt_does_not_make_near_duplicates(tmp_path: Path) -> None:
    rules = " ".join(f"Rule {i}: answer in the house style number {i}." for i in range(30))
    system = {"role": "system", "content": f"You route support tickets. {rules}"}
    first, second = chat("my card was charged twice", "Billing"), chat("the lamp arrived broken",
                                                                        "Returns")
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [system, *first["messages"]]}, {"messages": [system, *second["messages"]]},
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out) == 0
    assert len(read_jsonl(out)) == 2


# --- language and length -----------------------------------------------------------------------


def test_language_filter_keeps_wanted_and_short(tmp_path: Path) -> None:
    english = chat("My package has not arrived and I need it by Friday.",
                   "I am sorry, let me check the tracking for you.")
    french = chat("Mon colis n'est pas arrivé et j'en ai besoin pour vendredi.",
                  "Je suis désolé, je vérifie le suivi pour vous.")
    german = chat("Mein Paket ist nicht angekommen und ich brauche es bis Freitag.",
                  "Es tut mir leid, ich prüfe die Sendungsverfolgung für Sie.")
    short = chat("Danke!", "Bitte.")  # too short to judge: kept
    src = write_jsonl(tmp_path / "in.jsonl", [english, french, german, short])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out, "--language", "en") == 0
    assert read_jsonl(out) == [english, short]
    removed = read_jsonl(tmp_path / "removed.jsonl")
    assert [(e["line"], e["reason"], e["language"]) for e in removed] == [
        (2, "language", "fr"), (3, "language", "de")
    ]
    assert run_clean(src, out, "--language", "en,fr") == 0
    assert read_jsonl(out) == [english, french, short]


def test_unknown_language_code_is_refused(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [chat("a", "b")])
    assert run_clean(src, tmp_path / "out.jsonl", "--language", "en,xx") == 2
    assert "unknown language code(s) 'xx'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_token_length_filter_counts_as_training_does(tmp_path: Path) -> None:
    from tuneforge.models.loading import load_tokenizer

    records = [chat("hi", "ok"), chat("a medium question here", "a medium answer here"),
               chat("a much longer question " * 6, "and a much longer answer " * 6)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    tokenizer = load_tokenizer("tiny:llama")
    examples, _ = parse_examples(src)
    counts = [token_count(ex, tokenizer) for ex in examples]
    assert counts[0] < counts[1] < counts[2]
    out = tmp_path / "out.jsonl"
    flags = ["--model", "tiny:llama", "--min-tokens", str(counts[0] + 1),
             "--max-tokens", str(counts[1])]
    assert run_clean(src, out, *flags) == 0
    assert read_jsonl(out) == [records[1]]
    removed = read_jsonl(tmp_path / "removed.jsonl")
    assert [(e["reason"], e["tokens"]) for e in removed] == [
        ("too_short", counts[0]), ("too_long", counts[2])
    ]
    assert counts[1] == templated_tokens(tokenizer, records[1]["messages"])


def test_preference_length_is_the_longest_response(tmp_path: Path) -> None:
    from tuneforge.models.loading import load_tokenizer

    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "Q?", "chosen": "short", "rejected": "a far longer rejected answer"},
    ])
    tokenizer = load_tokenizer("tiny:llama")
    [example], _ = parse_examples(src)
    longest = [{"role": "user", "content": "Q?"},
               {"role": "assistant", "content": "a far longer rejected answer"}]
    assert token_count(example, tokenizer) == templated_tokens(tokenizer, longest)


def templated_tokens(tokenizer, messages: list[dict]) -> int:
    """tiny:llama's byte-level count of a conversation: the chat template's text, one token a
    byte, and <|im_start|> and <|im_end|> one token each."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = rendered.count("<|im_start|>") + rendered.count("<|im_end|>")
    plain = rendered.replace("<|im_start|>", "").replace("<|im_end|>", "")
    return len(plain.encode()) + specials


# --- every format keeps its structure ----------------------------------------------------------

MESSAGES = [{"role": "system", "content": f"Agent mail: {EMAIL}"},
            {"role": "user", "content": "Card 4111 1111 1111 1111 was charged"},
            {"role": "assistant", "content": "Noted.", "weight": 1}]
FORMAT_RECORDS = {
    "prompt_completion": {"prompt": f"From {EMAIL}:\n", "completion": " reply ###", "id": 7},
    "conversational_prompt_completion": {
        "prompt": MESSAGES[1:2], "completion": [{"role": "assistant", "content": "ip 10.0.0.1"}]
    },
    "chat": {"messages": MESSAGES, "meta": {"email": EMAIL}},
    "alpaca": {"instruction": f"Answer {EMAIL}", "input": "tel 555-123-4567", "output": "Done."},
    "classification": {"text": f"Refund to {EMAIL}", "label": EMAIL},
    "preference": {"prompt": f"Hi, {EMAIL}", "chosen": "Hello!", "rejected": f"Bye {EMAIL}"},
    "preference_messages": {"prompt": MESSAGES[1:2],
                            "chosen": [{"role": "assistant", "content": "Yes."}],
                            "rejected": [{"role": "assistant", "content": f"No, {EMAIL}"}]},
    "implicit_prompt": {
        "chosen": [MESSAGES[1], {"role": "assistant", "content": "Refunded."}],
        "rejected": [MESSAGES[1], {"role": "assistant", "content": f"Mail {EMAIL}"}],
    },
    "openai_preference": {"input": {"messages": MESSAGES[:2]},
                          "preferred_output": [{"role": "assistant", "content": "Sure."}],
                          "non_preferred_output": [{"role": "assistant", "content": "No."}]},
    "ranking": {"prompt": f"Rank {EMAIL}", "responses": ["good", f"bad {EMAIL}", "ok"],
                "scores": [3, 1, 2]},
    "rating": {"prompt": f"Rate {EMAIL}", "response": "An answer", "rating": 4},
    "unpaired": {"prompt": f"Hi {EMAIL}", "completion": "Hello", "label": True},
}


def _masked(value):
    """What clean should write: the test's two PII strings replaced, nothing else touched."""
    if isinstance(value, str):
        return (value.replace(EMAIL, "[EMAIL]").replace("4111 1111 1111 1111", "[CARD]")
                .replace("555-123-4567", "[PHONE]").replace("10.0.0.1", "[IP]"))
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: v if k in ("role", "weight") else _masked(v) for k, v in value.items()}
    return value


TEXT_KEYS = {"prompt", "completion", "messages", "instruction", "input", "output", "text",
             "chosen", "rejected", "preferred_output", "non_preferred_output", "responses",
             "response"}


@pytest.mark.parametrize("name", sorted(FORMAT_RECORDS))
def test_every_format_round_trips_its_structure(tmp_path: Path, name: str) -> None:
    record = FORMAT_RECORDS[name]
    src = write_jsonl(tmp_path / "in.jsonl", [record])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out) == 0
    expected = {k: _masked(v) if k in TEXT_KEYS else v for k, v in record.items()}
    assert read_jsonl(out) == [expected]
    assert list(read_jsonl(out)[0]) == list(record)  # key order kept
    [entry] = read_jsonl(tmp_path / "removed.jsonl")
    assert entry["record"] == record and entry["action"] == "masked"


def test_csv_and_parquet_outputs_read_back(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text('text,label\n"Refund to jane.doe@example.com",billing\n"Where, exactly?",'
                   'shipping\n', encoding="utf-8")
    csv_out = tmp_path / "out.csv"
    assert run_clean(src, csv_out) == 0
    assert [r for _, r in read_records(csv_out)] == [
        {"text": "Refund to [EMAIL]", "label": "billing"},
        {"text": "Where, exactly?", "label": "shipping"},
    ]
    pytest.importorskip("pyarrow")
    chat_src = write_jsonl(tmp_path / "chat.jsonl", [chat(f"mail {EMAIL}", "ok"), chat("b", "c")])
    pq_out = tmp_path / "out.parquet"
    assert run_clean(chat_src, pq_out) == 0
    rows = [r for _, r in read_records(pq_out)]
    assert rows[0]["messages"][0] == {"role": "user", "content": "mail [EMAIL]"}
    assert len(rows) == 2


# --- invalid records, the input, the outputs ---------------------------------------------------


def test_invalid_records_are_dropped_with_the_check_message(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat("a question", "an answer"), "{bad json", {"messages": []},
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out) == 0
    assert read_jsonl(out) == [chat("a question", "an answer")]
    removed = read_jsonl(tmp_path / "removed.jsonl")
    assert [e["line"] for e in removed] == [2, 3, 4]
    assert all(e["action"] == "removed" and e["reason"].startswith("invalid: ") for e in removed)
    assert removed[0]["reason"].startswith("invalid: json: invalid JSON")
    assert removed[0]["record"] is None
    assert removed[1]["reason"] == "invalid: messages: empty array of messages"
    assert "unknown role 'bot'" in removed[2]["reason"]


def test_input_is_byte_identical_afterwards(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat(f"mail {EMAIL}", "ok"), chat(f"mail {EMAIL}", "ok"), "not json",
    ])
    before = src.read_bytes()
    assert run_clean(src, tmp_path / "out.jsonl", "--removed", str(tmp_path / "log.jsonl")) == 0
    assert src.read_bytes() == before
    assert len(read_jsonl(tmp_path / "log.jsonl")) == 3
    assert not (tmp_path / "removed.jsonl").exists()


def test_empty_result_exits_2_and_keeps_existing_outputs(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "ok"), chat("hello", "ok")])
    out = tmp_path / "out.jsonl"
    out.write_text("previous result\n")
    log = tmp_path / "removed.jsonl"
    log.write_text("previous log\n")
    assert run_clean(src, out, "--model", "tiny:llama", "--min-tokens", "1000") == 2
    err = capsys.readouterr().err
    assert "no records left after cleaning, so nothing was written" in err
    assert "too_short 2" in err and "Traceback" not in err
    assert out.read_text() == "previous result\n" and log.read_text() == "previous log\n"
    assert not (tmp_path / "out.summary.json").exists()


def test_output_equal_to_input_is_refused(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [chat("a", "b")])
    before = src.read_bytes()
    assert run_clean(src, tmp_path / "." / "in.jsonl") == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jsonl", "file not found"), ("folder.jsonl", "is a directory"),
     ("data.txt", "unknown file type '.txt'"), ("latin1.csv", "not valid UTF-8")],
)
def test_unreadable_input_is_a_clear_error(tmp_path: Path, capsys, name: str, message: str) -> None:
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "data.txt").write_text("hello")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    assert run_clean(tmp_path / name, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_unsupported_output_extension_is_refused(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [chat("a", "b")])
    assert run_clean(src, tmp_path / "out.xlsx") == 2
    assert "cannot write '.xlsx'" in capsys.readouterr().err


def test_api_returns_the_summary(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [chat(f"mail {EMAIL}", "ok"), chat("x", "y"),
                                              chat("X", "Y")])
    summary = clean_file(src, tmp_path / "o.jsonl", pii="drop")
    assert (summary.records_in, summary.records_out) == (3, 1)
    assert dict(summary.removed) == {"pii": 1, "duplicate": 1}
    with pytest.raises(DataError, match="pii must be"):
        clean_file(src, tmp_path / "o.jsonl", pii="hide")


def test_clean_writes_the_quality_report_of_its_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "Write to ann@example.com about order 7", "completion": "Done."},
        {"prompt": "Where is my parcel?", "completion": "On its way."},
        {"prompt": "Where is my parcel?", "completion": "On its way."},
    ])
    out = tmp_path / "out.jsonl"
    assert run_clean(src, out) == 0
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["files"][0]["examples"] == 2  # the report is of OUT: the copy is gone
    assert (tmp_path / "out-report" / "report.html").is_file()
    assert run_clean(src, tmp_path / "b.jsonl", "--no-report", "--report", str(tmp_path / "x")) == 0
    assert not (tmp_path / "b-report").exists() and not (tmp_path / "x").exists()
