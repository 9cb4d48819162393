"""``tuneforge data report``: what the report finds (read back from report.json), how the page
shows it (escaped, self-contained), the plots (real PNG files), and errors for bad input."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
from PIL import Image

from tuneforge.cli import main
from tuneforge.data.report import build_report, write_report
from tuneforge.data.validate import check_data
from tuneforge.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Distinct tickets, long enough that one changed word keeps word-3-gram Jaccard above 0.85.
TICKETS = [
    (
        "my parcel was supposed to arrive last monday and the tracking page has not changed "
        "since it left the depot in leeds four days ago",
        "shipping",
    ),
    (
        "i was charged twice for the same lamp on my credit card statement this month and would "
        "like one of the two payments refunded please",
        "billing",
    ),
    (
        "the smart plug keeps dropping off the wifi network every evening around seven even "
        "after i reset the router and reinstalled the app",
        "tech",
    ),
    (
        "could you tell me whether the oak dining table comes flat packed or fully assembled "
        "before i place an order for the spring sale",
        "sales",
    ),
    (
        "the kettle arrived with a cracked lid and a dent in the side so i would like to send "
        "it back for a replacement as soon as possible",
        "returns",
    ),
    (
        "the tracking number you emailed me does not work on the courier website and nobody "
        "answers the phone at the local delivery office",
        "shipping",
    ),
    (
        'my invoice says "Tom & Jerry" <b>bold</b> ltd instead of my own company name, could you '
        "correct it before my accountant closes the books",
        "billing",
    ),
    (
        "please write back to jane.doe@example.com about the wardrobe doors that will not close "
        "properly after following the assembly guide twice",
        "returns",
    ),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def ticket(i: int) -> dict:
    text, label = TICKETS[i]
    return {"text": text, "label": label}


def near_copy(i: int) -> dict:
    """Ticket ``i`` with a greeting in front: a near-duplicate, not an exact one."""
    record = ticket(i)
    record["text"] = "hello " + record["text"]
    return record


@pytest.fixture
def classification(tmp_path: Path) -> tuple[Path, Path]:
    """Train: tickets 0-7, a duplicate of line 7 (line 9), a near-copy of line 3 (line 10).
    Test: ticket 4 again (a leak of train line 5), a near-copy of ticket 5 (train line 6), and
    a ticket of its own."""
    train = [ticket(i) for i in range(8)] + [ticket(6), near_copy(2)]
    own = {
        "text": "the delivery driver left the sofa in the rain outside my garage door",
        "label": "shipping",
    }
    test = [ticket(4), near_copy(5), own]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)


@pytest.fixture
def report_dir(tmp_path: Path, classification: tuple[Path, Path]) -> Path:
    train, test = classification
    out = tmp_path / "report"
    assert write_report(train, out, test=[test], title="Tickets <v1>") == out / "report.html"
    return out


def test_report_json_finds_duplicates_pii_leakage_and_labels(
    report_dir: Path, classification: tuple[Path, Path]
) -> None:
    train, test = classification
    report = json.loads((report_dir / "report.json").read_text())
    files = {f["split"]: f for f in report["files"]}
    assert report["length_unit"] == "words" and "words" in report["length_label"]

    dup = files["train"]["duplicates"]
    assert (dup["exact_clusters"], dup["exact_redundant_records"]) == (1, 1)
    assert [m["where"] for m in dup["exact"][0]["members"]] == [f"{train}:7", f"{train}:9"]
    assert (dup["near_clusters"], dup["near_records"]) == (1, 2)
    assert [m["where"] for m in dup["near"][0]["members"]] == [f"{train}:3", f"{train}:10"]
    assert dup["near"][0]["members"][1]["excerpt"].startswith("user: hello the smart plug")

    pii = files["train"]["pii"]
    assert pii["matches"] == {"EMAIL": 1}
    assert [(r["where"], r["kinds"]) for r in pii["records"]] == [(f"{train}:8", ["EMAIL"])]
    assert "jane.doe" not in json.dumps(pii) and "[EMAIL]" in pii["records"][0]["excerpt"]
    assert files["test"]["pii"]["records_with_pii"] == 0

    leak = files["test"]["leakage"]
    assert (leak["exact_records"], leak["near_records"]) == (1, 1)
    assert (leak["exact"][0]["where"], leak["exact"][0]["train"]) == (f"{test}:1", f"{train}:5")
    assert (leak["near"][0]["where"], leak["near"][0]["train"]) == (f"{test}:2", f"{train}:6")
    assert 0.85 <= leak["near"][0]["jaccard"] < 1
    assert "leakage" not in files["train"]

    assert files["train"]["label_balance"] == {
        "billing": 3,
        "shipping": 2,
        "returns": 2,
        "sales": 1,
        "tech": 2,
    }
    assert files["test"]["label_balance"] == {"returns": 1, "shipping": 2}
    assert files["train"]["format_stats"]["records_per_format"] == {"classification": 10}
    # The check's problems travel with the report: the leak is an error, the duplicate a warning.
    found = {(p["source"], p["line"], p["severity"]) for p in report["problems"]["list"]}
    assert {(str(test), 1, "error"), (str(train), 9, "warning")} <= found
    assert report["problems"]["errors"] == 1
    hist = files["train"]["length_histogram"]
    assert sum(hist["counts"]) == files["train"]["examples"] == 10
    assert files["train"]["length"]["max"] == max(len(t.split()) + 1 for t, _ in TICKETS)


def test_page_is_escaped_self_contained_and_plots_are_pngs(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    report = json.loads((report_dir / "report.json").read_text())
    assert "<title>Tickets &lt;v1&gt;</title>" in page
    excerpt = next(
        m["excerpt"]
        for f in report["files"]
        for c in f["duplicates"]["exact"]
        for m in c["members"]
    )
    assert html.escape(excerpt) in page
    tom = "&quot;Tom &amp; Jerry&quot; &lt;b&gt;bold&lt;/b&gt;"
    assert tom in page and "<b>bold</b>" not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert set(report["figures"]) == {"lengths", "labels", "duplicates", "pii"}
    assert page.count("data:image/png;base64,") == len(report["figures"])
    for name, file in report["figures"].items():
        data = (report_dir / file).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        with Image.open(report_dir / file) as image:
            image.verify()
            assert image.size[0] > 400 and image.size[1] > 200


def test_script_in_a_record_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script> please reset my password"
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": evil, "label": "a"}] * 2)
    page = write_report(train, tmp_path / "out").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_preference_pairs_get_their_own_figures(tmp_path: Path) -> None:
    def pair(prompt: str, chosen: str, rejected: str) -> dict:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    records = [
        pair("What colour is the sky?", "It is blue on a clear day.", "Blue."),
        pair("Name a fruit.", "An apple, for example.", "I do not know that one."),
        pair("Say hi.", "Hello there, friend!", "Go away."),
    ]
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    out = tmp_path / "out"
    write_report(path, out)
    report = json.loads((out / "report.json").read_text())
    [section] = report["files"]
    stats = section["format_stats"]["preference"]
    assert section["format_stats"]["records_per_format"] == {"preference": 3}
    assert stats["records"] == 3
    assert stats["chosen_minus_rejected_values"] == [7 - 1, 4 - 6, 3 - 2]
    assert (stats["chosen_longer_share"], stats["rejected_longer_share"]) == (0.667, 0.333)
    assert stats["chosen_length"]["max"] == 7 and stats["rejected_length"]["min"] == 1
    assert stats["prompt_length"]["p50"] == 3
    # Two sequences per pair (prompt + chosen, prompt + rejected), as training sees them.
    assert section["length"]["min"] == 2 + 2 and sum(section["length_histogram"]["counts"]) == 6
    assert "preference" in report["figures"] and "labels" not in report["figures"]
    assert (out / "preference.png").read_bytes().startswith(PNG_MAGIC)


def test_token_lengths_match_the_check(tmp_path: Path, classification: tuple[Path, Path]) -> None:
    from tuneforge.models.tiny import byte_tokenizer

    train, test = classification
    tokenizer = byte_tokenizer()
    report = build_report(train, test=[test], tokenizer=tokenizer)
    check = check_data(train, test=[test], tokenizer=tokenizer)
    assert report["length_unit"] == "tokens" and "chat template" in report["length_label"]
    for section in report["files"]:
        assert section["length"] == check.stats["tokens"][section["split"]]["total"]
    # Plain-text lengths in the per-format figures: the byte tokenizer gives one token a byte.
    shortest = min(len(text.encode()) for text, _ in TICKETS)
    assert report["files"][0]["format_stats"]["sft"]["prompt_length"]["min"] == shortest


def test_cli_writes_the_report_and_lists_findings(
    tmp_path: Path, classification: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train, test = classification
    before = train.read_bytes()
    code = main(["data", "report", str(train), "--test", str(test), "-o", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 record also in train, 1 nearly so" in out and "1 EMAIL" in out
    assert (tmp_path / "r" / "report.html").is_file() and train.read_bytes() == before


def test_cli_missing_file_exits_2_naming_it(
    tmp_path: Path, classification: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train, _ = classification
    missing = tmp_path / "nope.jsonl"
    code = main(
        [
            "data",
            "report",
            str(train),
            "--validation",
            str(missing),
            "--output",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{missing}: file not found" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_never_writes_over_an_input(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "report.json", [{"text": "a b c", "label": "x"}])
    before = train.read_bytes()
    with pytest.raises(DataError, match="overwrite the input file"):
        write_report(train, tmp_path)
    assert train.read_bytes() == before


def test_chat_answers_with_a_label_line_count_as_labels(tmp_path: Path) -> None:
    def routed(i: int, department: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"ticket number {i}"},
                {"role": "assistant", "content": f"Department: {department}\nReply: thanks ({i})"},
            ]
        }

    train = [routed(i, "Billing" if i % 3 else "Shipping") for i in range(12)]
    test = [routed(i, "Sales") for i in range(20, 22)]
    labelled = build_report(
        write_jsonl(tmp_path / "train.jsonl", train),
        test=[write_jsonl(tmp_path / "test.jsonl", test)],
    )
    assert [f["label_balance"] for f in labelled["files"]] == [
        {"Billing": 8, "Shipping": 4},
        {"Sales": 2},
    ]
    assert labelled["files"][0]["label_source"].endswith("after 'Department: '")
    # Free-text answers are not labels: every first line differs.
    free = [routed(i, f"Desk {i}") for i in range(12)]
    report = build_report(write_jsonl(tmp_path / "free.jsonl", free))
    assert report["files"][0]["label_balance"] == {} and "label_source" not in report["files"][0]
