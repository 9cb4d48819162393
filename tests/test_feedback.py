"""Feedback collection: the SQLite store, the terminal loop on a real tiny model, crash-safety
of a real `tuneforge feedback collect` process killed mid-session, and exports that load as data.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.data.formats import load_examples
from tuneforge.feedback.cli import (
    Generator,
    Terminal,
    collect,
    parse_choice,
    parse_ranking,
    parse_rating,
)
from tuneforge.feedback.export import DATA_FORMAT, EXPORT_TARGETS, export_feedback
from tuneforge.feedback.store import FeedbackError, FeedbackStore

REPO = Path(__file__).resolve().parents[1]
QUESTION = "(s skip, q quit)> "


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def new_store(tmp_path: Path, mode: str, k: int, prompts: int = 3) -> tuple[FeedbackStore, object]:
    store = FeedbackStore(tmp_path / "fb.sqlite")
    session = store.start_session("s", mode, "tiny:llama", k)
    store.add_prompts(
        session, [(user(f"q{i}"), {"i": i}, f"p.jsonl:{i + 1}") for i in range(prompts)]
    )
    return store, session


def with_candidates(store: FeedbackStore, session, texts: list[list[str]]) -> list[list[int]]:
    """Store given candidate texts for the session's prompts, as a web UI's generator would."""
    ids = []
    for prompt, candidate_texts in zip(store.prompts(session), texts):
        stored = store.add_candidates(prompt.id, candidate_texts, model="m", params={"seed": 1})
        ids.append([c.id for c in stored])
    return ids


# --- the store --------------------------------------------------------------------------------


def test_store_sets_up_a_durable_database(tmp_path: Path) -> None:
    store, _ = new_store(tmp_path, "rank", 3)
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta").fetchone()[0] == "1"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "prompts", "candidates", "judgements"} <= tables


def test_sessions_resume_only_with_the_same_settings(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rank", 3)
    assert store.start_session("s", "rank", "tiny:llama", 3) == session
    with pytest.raises(FeedbackError, match="was started with mode rank, model tiny:llama, k=3"):
        store.start_session("s", "rate", "tiny:llama", 3)
    with pytest.raises(FeedbackError, match="needs at least 2 candidates"):
        store.start_session("t", "choose", "m", 1)
    with pytest.raises(FeedbackError, match=r"no session 'x' \(sessions: s\)"):
        store.session("x")


def test_prompts_are_added_once_and_a_longer_file_extends(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "choose", 2, prompts=2)
    added = store.add_prompts(session, [(user(f"q{i}"), {}, None) for i in range(4)])
    assert added == 2 and store.progress(session, "ann") == (0, 4)


def test_rate_mode_resumes_at_the_first_unrated_candidate(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rate", 2)
    ids = with_candidates(store, session, [["a", "b"], ["c", "d"]])
    store.rate(ids[0][0], 4, "ann")
    first = store.next_prompt(session, "ann")
    assert first.position == 0 and [c.text for c in store.unrated(first.id, "ann")] == ["b"]
    store.rate(ids[0][1], 2, "ann")
    assert store.next_prompt(session, "ann").position == 1
    assert store.next_prompt(session, "bob").position == 0  # annotators are independent
    store.skip(store.next_prompt(session, "ann").id, "ann")
    third = store.next_prompt(session, "ann")
    assert third.position == 2 and store.candidates(third.id) == []  # not generated yet
    assert store.progress(session, "ann") == (2, 3)


def test_answers_are_checked(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rank", 3)
    [first, second] = with_candidates(store, session, [["a", "b", "c"], ["d", "e", "f"]])
    prompt_id = store.next_prompt(session, "ann").id
    with pytest.raises(FeedbackError, match="lists each of prompt"):
        store.rank(prompt_id, first[:2], "ann")
    with pytest.raises(FeedbackError, match="lists each of prompt"):
        store.rank(prompt_id, [first[0], first[1], second[0]], "ann")
    with pytest.raises(FeedbackError, match="in a rank session; a rating is not"):
        store.rate(first[0], 3, "ann")
    with pytest.raises(FeedbackError, match="in a rank session; a choice is not"):
        store.choose(prompt_id, first[0], "ann")
    with pytest.raises(FeedbackError, match="annotator name must not be empty"):
        store.rank(prompt_id, first, " ")
    rate_store = FeedbackStore(tmp_path / "rate.sqlite")
    rate_session = rate_store.start_session("r", "rate", "m", 1)
    rate_store.add_prompts(rate_session, [(user("q"), {}, None)])
    [[candidate]] = with_candidates(rate_store, rate_session, [["x"]])
    for bad in (0, 6, 2.5, True):
        with pytest.raises(FeedbackError, match="a whole number from 1 to 5"):
            rate_store.rate(candidate, bad, "ann")


def test_answering_again_replaces_the_answer(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "choose", 2, prompts=1)
    [[a, b]] = with_candidates(store, session, [["a", "b"]])
    prompt_id = store.next_prompt(session, "ann").id
    store.choose(prompt_id, a, "ann")
    store.choose(prompt_id, b, "ann")
    [judgement] = list(store.judgements())
    assert (judgement.kind, judgement.value) == ("choice", b)


def test_a_second_connection_sees_each_answer_at_once(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "choose", 2, prompts=1)
    [[a, _]] = with_candidates(store, session, [["a", "b"]])
    reader = FeedbackStore(store.path, create=False)  # as a web server beside the terminal
    store.choose(store.next_prompt(session, "ann").id, a, "ann")
    assert reader.progress(reader.session("s"), "ann") == (1, 1)


def test_bad_database_files(tmp_path: Path) -> None:
    with pytest.raises(FeedbackError, match="no such feedback database"):
        FeedbackStore(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()
    with pytest.raises(FeedbackError, match="is a directory"):
        FeedbackStore(tmp_path)
    (tmp_path / "text.sqlite").write_text("not a database at all, just some text\n" * 50)
    with pytest.raises(FeedbackError, match="not a feedback database"):
        FeedbackStore(tmp_path / "text.sqlite")
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    with pytest.raises(FeedbackError, match="a SQLite database, but not a feedback database"):
        FeedbackStore(tmp_path / "other.sqlite")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left as it was


# --- answers typed in the terminal --------------------------------------------------------------


def test_parse_answers() -> None:
    assert parse_rating("4") == 4
    for bad in ("0", "6", "4.5", "four", "-1"):
        with pytest.raises(ValueError, match="whole number from 1 to 5"):
            parse_rating(bad)
    assert parse_choice("B", 2) == 1
    for bad in ("c", "ab", "1"):
        with pytest.raises(ValueError, match="one letter: a or b"):
            parse_choice(bad, 2)
    for text in ("2 1 3", "2,1,3", "2 > 1 > 3", "213"):
        assert parse_ranking(text, 3) == [1, 0, 2]
    for bad in ("1 2", "1 1 2", "1 2 4", "a b c", "1 2 3 4"):
        with pytest.raises(ValueError, match="every candidate number 1-3 once"):
            parse_ranking(bad, 3)


def run_loop(store, session, answers: str, annotator: str = "ann") -> tuple[int, str]:
    out = io.StringIO()
    params = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 0, "precision": "fp32"}
    answered = collect(
        store,
        session,
        annotator,
        Generator("tiny:llama", session.k, params),
        Terminal(io.StringIO(answers), out),
    )
    return answered, out.getvalue()


def test_loop_on_a_tiny_model_reasks_bad_input_and_stores_every_answer(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rank", 3, prompts=2)
    answered, out = run_loop(store, session, "1 2\n\n2 1 3\n2 3 1\n")
    assert answered == 2 and out.count("generating 3 candidates") == 2
    assert "not understood: '1 2': list every candidate number 1-3 once" in out
    assert "list every candidate number 1-3 once, best first, e.g. '3 2 1'" in out  # the empty line
    first, second = [j for j in store.judgements()]
    assert [c.position for c in first.candidates] == [0, 1, 2]
    assert first.value == [first.candidates[i].id for i in (1, 0, 2)]
    assert second.value == [second.candidates[i].id for i in (1, 2, 0)]
    assert first.candidates[0].params["seed"] == 0 and second.candidates[0].params["seed"] == 1
    assert "2/2 prompts finished by ann" in out


def test_loop_skip_and_quit(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "choose", 2, prompts=3)
    answered, out = run_loop(store, session, "s\nB\nq\n")
    assert answered == 1 and "run the same command again" in out
    kinds = [j.kind for j in store.judgements()]
    assert kinds == ["skip", "choice"] and store.progress(session, "ann") == (2, 3)
    # End of input stops like q; the third prompt's candidates were made once and kept.
    candidates = store.candidates(store.next_prompt(session, "ann").id)
    answered, out = run_loop(store, session, "")
    assert answered == 0 and "generating" not in out
    assert store.candidates(store.next_prompt(session, "ann").id) == candidates


# --- a real process, killed mid-session ---------------------------------------------------------


class Collector:
    """`tuneforge feedback collect` in a subprocess, answered through a pipe."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "tuneforge", "feedback", "collect", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.output = b""

    def wait_for_questions(self, count: int, deadline: float = 180.0) -> str:
        """Read until ``count`` questions have been asked in all (or the process ends)."""
        end = time.monotonic() + deadline
        while self.output.decode(errors="replace").count(QUESTION) < count:
            assert time.monotonic() < end, self.output.decode(errors="replace")
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.output += chunk
        return self.output.decode(errors="replace")

    def answer(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()


def ratings_in(db: Path) -> dict[int, int]:
    with FeedbackStore(db, create=False) as store:
        return {j.candidate_id: j.value for j in store.judgements() if j.kind == "rating"}


def test_killed_session_loses_nothing_and_resumes_at_the_next_item(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ticket {i}"}) + "\n" for i in range(3)))
    db = tmp_path / "fb.sqlite"
    args = [
        "tiny:llama",
        "--prompts",
        str(prompts),
        "--db",
        str(db),
        "--mode",
        "rate",
        "-k",
        "2",
        "--annotator",
        "ann",
        "--max-new-tokens",
        "6",
    ]
    first = Collector(args, tmp_path)
    answers = ["5", "1", "4", "2", "3", "1"]  # prompt 0: c0 c1, prompt 1: c0 c1, prompt 2: ...
    first.wait_for_questions(1)
    for n, answer in enumerate(answers[:3], start=1):
        first.answer(answer)
        first.wait_for_questions(n + 1)  # the next question is shown only after the commit
    first.answer(answers[3])
    first.proc.send_signal(signal.SIGKILL)  # at once: the 4th answer may or may not be in
    first.proc.wait()
    first.proc.stdout.close()
    first.proc.stdin.close()

    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    saved = ratings_in(db)
    with FeedbackStore(db, create=False) as store:
        session = store.session("prompts")
        before = [c for p in store.prompts(session) for c in store.candidates(p.id)]
    assert len(before) == 4  # prompts 0 and 1 have their candidates; prompt 2 not yet
    assert saved == {c.id: int(a) for c, a in zip(before, answers[: len(saved)])}
    assert len(saved) in (3, 4)

    second = Collector(args, tmp_path)
    out = second.wait_for_questions(1)
    expected_candidate = "candidate 2 of 2" if len(saved) == 3 else "candidate 1 of 2"
    expected_prompt = "prompt 2 " if len(saved) == 3 else "prompt 3 "
    head = out[: out.index(QUESTION)]
    assert expected_prompt in head and expected_candidate in head, out
    remaining = answers[len(saved) :]
    for n, answer in enumerate(remaining, start=1):
        second.answer(answer)
        if n < len(remaining):
            second.wait_for_questions(n + 1)
    stdout, _ = second.proc.communicate(timeout=180)
    assert second.proc.returncode == 0
    assert "3/3 prompts finished by ann" in (second.output + stdout).decode(errors="replace")

    with FeedbackStore(db, create=False) as store:
        after = [c for p in store.prompts(session) for c in store.candidates(p.id)]
    assert after[:4] == before  # candidates made before the kill were kept, not regenerated
    assert ratings_in(db) == {c.id: int(a) for c, a in zip(after, answers, strict=True)}


# --- exports ---------------------------------------------------------------------------------


def export_and_load(store: FeedbackStore, tmp_path: Path, to: str, **kw) -> list:
    out = tmp_path / f"{to}.jsonl"
    result = export_feedback(store, to, out, **kw)
    examples = load_examples(out, DATA_FORMAT[to])
    assert len(examples) == result.records
    return examples


def test_exports_from_rankings(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rank", 3, prompts=2)
    [first, second] = with_candidates(store, session, [["a", "b", "c"], ["d", "e", "f"]])
    prompts = [store.next_prompt(session, "ann").id, None]
    store.rank(prompts[0], [first[2], first[0], first[1]], "ann")
    prompts[1] = store.next_prompt(session, "ann").id
    store.rank(prompts[1], second, "bob")
    pairs = export_and_load(store, tmp_path, "pairs")
    texts = [(p.responses[0][0].content, p.responses[1][0].content) for p in pairs]
    assert texts == [("c", "a"), ("c", "b"), ("a", "b"), ("d", "e"), ("d", "f"), ("e", "f")]
    assert pairs[0].prompt_messages[0].content == "q0"
    assert pairs[0].extra["meta"] == {"session": "s", "prompt": 0, "annotator": "ann"}
    [ranked, _] = export_and_load(store, tmp_path, "ranking")
    assert [r[0].content for r in ranked.responses] == ["c", "a", "b"]
    unpaired = export_and_load(store, tmp_path, "unpaired", annotator="ann")
    assert [(u.responses[0][0].content, u.desirable) for u in unpaired] == [
        ("c", True),
        ("b", False),
    ]
    with pytest.raises(FeedbackError, match="nothing to export as rating: it needs ratings"):
        export_feedback(store, "rating", tmp_path / "r.jsonl")


def test_exports_from_ratings(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "rate", 3, prompts=2)
    [first, second] = with_candidates(store, session, [["a", "b", "c"], ["d", "e", " "]])
    for candidate, rating in zip(first, (2, 5, 3)):
        store.rate(candidate, rating, "ann")
    for candidate, rating in zip(second, (4, 4, 1)):
        store.rate(candidate, rating, "ann")
    rated = export_and_load(store, tmp_path, "rating")
    assert [(r.responses[0][0].content, r.scores) for r in rated] == [
        ("a", [2.0]),
        ("b", [5.0]),
        ("c", [3.0]),
        ("d", [4.0]),
        ("e", [4.0]),
    ]
    pairs = export_and_load(store, tmp_path, "pairs")
    assert [(p.responses[0][0].content, p.responses[1][0].content) for p in pairs] == [
        ("b", "c"),
        ("b", "a"),
        ("c", "a"),
    ]  # d = e tie: no pair; the empty reply: dropped
    [ranking] = export_and_load(store, tmp_path, "ranking")
    assert [r[0].content for r in ranking.responses] == ["b", "c", "a"]
    assert ranking.scores == [5.0, 3.0, 2.0]
    unpaired = export_and_load(store, tmp_path, "unpaired", good_min=5, bad_max=2)
    assert [(u.responses[0][0].content, u.desirable) for u in unpaired] == [
        ("a", False),
        ("b", True),
    ]
    with pytest.raises(FeedbackError, match="--bad-max \\(3\\) must be below --good-min \\(3\\)"):
        export_feedback(store, "unpaired", tmp_path / "u.jsonl", good_min=3, bad_max=3)


def test_exports_from_choices(tmp_path: Path) -> None:
    store, session = new_store(tmp_path, "choose", 2, prompts=2)
    [first, second] = with_candidates(store, session, [["a", "b"], ["same", "same"]])
    store.choose(store.next_prompt(session, "ann").id, first[1], "ann")
    store.choose(store.next_prompt(session, "ann").id, second[0], "ann")
    [pair] = export_and_load(store, tmp_path, "pairs")  # identical texts make no pair
    assert (pair.responses[0][0].content, pair.responses[1][0].content) == ("b", "a")
    [ranking] = export_and_load(store, tmp_path, "ranking")  # "same" > "same" ranks nothing
    assert [r[0].content for r in ranking.responses] == ["b", "a"]
    assert len(export_and_load(store, tmp_path, "unpaired")) == 4
    other = store.start_session("other", "choose", "m", 2)
    store.add_prompts(other, [(user("q9"), {}, None)])
    [[c, _]] = with_candidates(store, other, [["x", "y"]])
    store.choose(store.next_prompt(other, "ann").id, c, "ann")
    assert len(export_and_load(store, tmp_path, "pairs")) == 2
    [pair] = export_and_load(store, tmp_path, "pairs", session="s")
    assert pair.extra["meta"]["session"] == "s"


# --- the commands -------------------------------------------------------------------------------


def test_commands_end_to_end_and_their_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "tickets.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "hi", "answer": 1}) + "\n" + json.dumps({"prompt": "yo"}) + "\n"
    )
    db = str(tmp_path / "fb.sqlite")
    common = [
        "feedback",
        "collect",
        "tiny:llama",
        "--prompts",
        str(prompts),
        "--db",
        db,
        "--max-new-tokens",
        "4",
        "--precision",
        "fp32",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    assert main([*common, "--mode", "choose", "--annotator", "ann"]) == 0
    assert "session 'tickets' (choose, k=2, tiny:llama): 2 prompts" in capsys.readouterr().out

    assert main(["feedback", "stats", "--db", db]) == 0
    assert "ann: 2/2 prompts finished (2 choice)" in capsys.readouterr().out
    for to in EXPORT_TARGETS[:2]:
        out = tmp_path / f"{to}.jsonl"
        code = main(["feedback", "export", "--db", db, "--to", to, "--out", str(out)])
        assert code == 0 and f"records to {out}" in capsys.readouterr().out

    cases = [
        ([*common, "--mode", "rank"], "session 'tickets' in"),  # same session, another mode
        (
            [*common, "--mode", "rank", "-k", "3", "--temperature", "0", "--session", "n"],
            "--temperature 0 is greedy: all 3 candidates would be the same",
        ),
        (["feedback", "stats", "--db", str(tmp_path / "nope.sqlite")], "no such feedback database"),
        (
            [
                "feedback",
                "export",
                "--db",
                db,
                "--to",
                "rating",
                "--out",
                str(tmp_path / "r.jsonl"),
            ],
            "nothing to export as rating",
        ),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    cases.append(
        (
            [*common[:4], str(bad), *common[5:], "--mode", "rate"],
            f"{bad}:2: prompt: missing required key",
        )
    )
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
