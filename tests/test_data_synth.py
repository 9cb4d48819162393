"""`tuneforge data synth` on tiny random models: a tiny model writes junk text, so these tests
check what holds for any text: records parse as `data check` reads them, nothing repeats the
seed or an evaluation file, a killed run resumes to the file an uninterrupted run writes, a
real `tuneforge serve` teacher samples what the local teacher samples, and label scoring
decides which paraphrases stay."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import chat_records, write_jsonl

from tuneforge.cli import main as tuneforge_main
from tuneforge.data.formats import load_examples
from tuneforge.data.synth import Deduplicator, SynthOptions, synth
from tuneforge.data.validate import check_data, example_key
from tuneforge.errors import ConfigError

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
PROMPTS = [f"Write a short note about parcel {i} and where it is going next week." for i in range(6)]


def options(seed_file: Path, out: Path, **kw) -> SynthOptions:
    base = {"teacher": "tiny:llama", "batch_size": 4, "max_new_tokens": 24, "precision": "fp32",
            "progress": False}
    return SynthOptions(str(seed_file), str(out), **(base | kw))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


# ----------------------------------------------------------------------------- preference


def test_preference_pairs_from_a_local_teacher_pass_data_check(prompts_file, tmp_path, one_thread):
    out = tmp_path / "pairs.jsonl"
    summary = synth(options(prompts_file, out, mode="preference", num=6, k=3, reward="length"),
                    say=lambda _: None)
    assert summary["records"] == 6 and len(lines(out)) == 6
    report = check_data(out)
    assert report.ok and not report.warnings, report.render()
    pairs = load_examples(out)
    assert {ex.format for ex in pairs} == {"preference"}
    assert len({example_key(ex) for ex in pairs}) == 6
    from tuneforge.rewards import length

    for ex in pairs:
        chosen, rejected = (r[0].content for r in ex.responses)
        assert ex.prompt_messages[0].content in PROMPTS
        assert chosen != rejected
        assert length([], [chosen])[0] > length([], [rejected])[0]  # best over worst, no tie

    rankings = tmp_path / "rankings.jsonl"
    synth(options(prompts_file, rankings, mode="preference", num=3, k=3, reward="length",
                  output_format="rankings"), say=lambda _: None)
    for ex in load_examples(rankings):
        assert ex.format == "ranking" and len(set(ex.scores)) == len(ex.scores) >= 2
        assert ex.scores == sorted(ex.scores, reverse=True)


def test_preference_ordered_by_a_reward_model_run_agrees_with_tuneforge_score(
        prompts_file, tmp_path, one_thread):
    from test_reward import write_reward_config

    from tuneforge.config import load_config
    from tuneforge.recipes import run_recipe
    from tuneforge.score import score_file

    run = tmp_path / "reward-run"
    config = write_reward_config(tmp_path, max_steps=2, eval_every=0, save_every=0,
                                 progress=False)
    run_recipe(load_config(config, [f"output_dir={run}"]), resume=False, overwrite=True)
    out = tmp_path / "pairs.jsonl"
    synth(options(prompts_file, out, mode="preference", num=3, k=3, reward_model=str(run)),
          say=lambda _: None)
    scored, summary = score_file(str(run), str(out), progress=False)
    assert len(scored) == 3 and summary["pairwise_accuracy"] == 1.0
    assert all(r["rewards"][0] > r["rewards"][1] for r in scored)


def test_outputs_never_repeat_a_validation_or_test_record(tmp_path, one_thread):
    story = ("Write a short note to the customer about parcel 3 which left the depot on Monday "
             "morning and was scanned in the northern sorting centre late that night, then "
             "delayed by the storm, and which should now reach the shop on Friday before noon "
             "if the roads stay open and the van has room for it")
    prompts = [*PROMPTS[:3], story]
    seed = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    test = write_jsonl(tmp_path / "test.jsonl", [{"messages": [
        {"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "ok"}]}])
    respaced = PROMPTS[2].replace("next week", "next  Week")  # the same after normalising
    one_word = story.replace("Monday", "Tuesday")  # a near-duplicate (Jaccard about 0.89)
    validation = write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": "ok"}
                                                      for p in (respaced, one_word)])
    out = tmp_path / "pairs.jsonl"
    summary = synth(options(seed, out, mode="preference", num=4, k=2, reward="length",
                            test=[str(test)], validation=[str(validation)]), say=lambda _: None)
    asked = {ex.prompt_messages[0].content for ex in load_examples(out)}
    assert asked == {PROMPTS[0]}  # the other three prompts all leak, exactly or nearly
    assert summary["dropped"]["leak"] >= 3
    report = check_data(out, validation=[validation], test=[test])
    assert report.ok, report.render()


# ----------------------------------------------------------------------------- resume


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, one_thread, capsys):
    seed = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    args = ["data", "synth", str(seed), "--teacher", "tiny:llama", "--num", "16",
            "--batch-size", "2", "--max-new-tokens", "32", "--precision", "fp32", "--seed", "3",
            "--no-progress"]
    reference = tmp_path / "reference.jsonl"
    synth(options(seed, reference, num=16, batch_size=2, max_new_tokens=32, seed=3),
          say=lambda _: None)

    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "tuneforge", *args, "--out", str(out)]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < 16, "the run finished before it was killed"
    with open(out, "ab") as f:  # as if the kill had landed in the middle of a line
        f.write(b'{"messages": [{"role": "user", "cont')

    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dropped a torn last line" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == reference.read_text()
    records = lines(out)
    assert len(records) == 16 == len(set(records))
    assert check_data(out).ok
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["files"][0]["examples"] == 16  # the quality report of the finished OUT

    assert tuneforge_main([*args, "--out", str(out)]) == 0  # finished: nothing more to do
    assert tuneforge_main([*args, "--out", str(out), "--temperature", "0.5"]) == 2
    assert "--temperature: 0.8 then, 0.5 now" in capsys.readouterr().err
    assert out.read_text() == reference.read_text()


def test_instruct_mode_keeps_the_seed_format_and_never_overwrites(tmp_path, one_thread, capsys):
    seed = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": f"Name a colour for item {i}.", "input": "", "output": "Red."}
        for i in range(5)])
    out = tmp_path / "new.jsonl"
    synth(options(seed, out, num=3), say=lambda _: None)
    examples = load_examples(out)
    assert [ex.format for ex in examples] == ["alpaca"] * 3
    assert all(set(json.loads(line)) == {"instruction", "input", "output"} for line in lines(out))

    mine = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "keep me", "completion": "!"}])
    before = mine.read_bytes()
    code = tuneforge_main(["data", "synth", str(seed), "--out", str(mine), "--num", "2",
                           "--teacher", "tiny:llama", "--no-progress"])
    assert code == 2 and "synth never overwrites a file" in capsys.readouterr().err
    assert mine.read_bytes() == before


def test_unreadable_seed_file_names_the_line(tmp_path, capsys):
    seed = tmp_path / "bad.jsonl"
    seed.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    code = tuneforge_main(["data", "synth", str(seed), "--out", str(tmp_path / "o.jsonl"),
                           "--num", "2", "--teacher", "tiny:llama", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{seed}:2: json: invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- HTTP teachers


def test_synth_against_tuneforge_serve_samples_what_the_local_teacher_samples(prompts_file,
                                                                              tmp_path, one_thread):
    from test_serve import LiveServer

    from tuneforge.serve.app import ServeSettings, create_app
    from tuneforge.serve.engine import load_served_models

    server = LiveServer(create_app(load_served_models("tiny:llama"),
                                   ServeSettings(batch_wait_ms=20, rate_limit=0), None))
    try:
        remote = tmp_path / "remote.jsonl"
        synth(options(prompts_file, remote, mode="preference", num=4, k=2, reward="length",
                      teacher=None, teacher_url=f"{server.url}/v1"), say=lambda _: None)
    finally:
        server.close()
    local = tmp_path / "local.jsonl"
    synth(options(prompts_file, local, mode="preference", num=4, k=2, reward="length"),
          say=lambda _: None)
    assert check_data(remote).ok
    assert remote.read_text() == local.read_text()


class _Teacher(BaseHTTPRequestHandler):
    """An OpenAI-shaped server that answers junk (or nothing, in time)."""

    reply = b"<html>upstream error</html>"
    delay = 0.0

    def do_GET(self):  # noqa: N802
        self._send(json.dumps({"data": [{"id": "junk-model"}]}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        self._send(self.reply)

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_teacher(**attrs) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Teacher", (_Teacher,), attrs))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_synth(seed: Path, out: Path, *extra: str) -> int:
    return tuneforge_main(["data", "synth", str(seed), "--out", str(out), "--num", "3",
                           "--no-progress", *extra])


def test_teacher_url_that_refuses_or_stalls_exits_2(prompts_file, tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "out.jsonl"
    assert run_synth(prompts_file, out, "--teacher-url", f"http://127.0.0.1:{port}/v1") == 2
    err = capsys.readouterr().err
    assert "refused the connection" in err and "tuneforge serve" in err and "Traceback" not in err

    server = serve_teacher(delay=3.0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert run_synth(prompts_file, out, "--teacher-url", url, "--timeout", "0.3") == 2
    finally:
        server.shutdown()
    assert "did not answer POST /chat/completions within 0.3 s" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("reply", [b"<html>upstream error</html>",
                                   json.dumps({"choices": [{"message": {"content": " "}}]}).encode()])
def test_a_teacher_returning_junk_stops_with_what_it_said(prompts_file, tmp_path, capsys, reply):
    server = serve_teacher(reply=reply)
    out = tmp_path / "out.jsonl"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        code = run_synth(prompts_file, out, "--teacher-url", url, "--patience", "4",
                         "--batch-size", "2")
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the teacher gave nothing usable in the last 4 attempts (dropped: 4 empty)" in err
    assert ("upstream error" if b"html" in reply else "it said lately: (empty); (empty)") in err
    assert "nothing was written" in err and not out.exists()


# ----------------------------------------------------------------------------- paraphrase


def test_paraphrases_keep_only_texts_scored_back_into_their_label(tmp_path, one_thread):
    from tuneforge.eval.classify import classify
    from tuneforge.models.loading import load_model

    # A random model scores a 1-byte label far above a 16-byte one (each byte costs about
    # log 259 nats), so it keeps the "x" paraphrases and drops every "zzz..." one.
    long_label = "z" * 16
    seed = write_jsonl(tmp_path / "labelled.jsonl", [
        {"text": f"My parcel number {i} has not arrived yet.", "label": "x" if i % 2 else long_label}
        for i in range(6)])
    out = tmp_path / "para.jsonl"
    summary = synth(options(seed, out, mode="paraphrase", num=3), say=lambda _: None)
    kept = load_examples(out)
    assert len(kept) == 3 and {ex.label for ex in kept} == {"x"}
    assert summary["dropped"]["label_changed"] >= 3
    model, tok = load_model("tiny:llama")
    from tuneforge.eval.tasks import end_of_answer

    scores = classify(model, tok, [[{"role": "user", "content": ex.messages[0].content}]
                                   for ex in kept], ["x"] * 3, ["x", long_label],
                      suffix=end_of_answer(tok, raw=False))
    assert scores.predicted == [ex.label for ex in kept]


# ----------------------------------------------------------------------------- dedup


def test_deduplicator_finds_leaks_duplicates_and_near_duplicates():
    words = "the parcel left the depot on monday and should reach the shop by friday noon"
    dedup = Deduplicator(0.8, {"seed": ["Reset my password please"], "validation": [],
                               "test": [words]})
    dedup.add("", "an earlier record made by this run")
    near_words = words.replace("noon", "evening")
    items = [(t, "", t) for t in (
        near_words,                                 # near a test record
        "reset my   PASSWORD please",               # the seed, exactly (case, spaces)
        "An earlier record made by this run",       # made before
        "a brand new question about the weather up north in the spring time",
        "a brand new question about the weather up north in the spring time!",  # near the one before
        "something else entirely",
    )]
    assert dedup.verdicts(items) == ["leak", "duplicate", "duplicate", None, "near_duplicate",
                                     None]
    # Preference groups: the same responses to another prompt are not duplicates.
    assert dedup.verdicts([("q1", "q1", "same reply"), ("q2", "q2", "same reply")]) == [None, None]


def test_a_run_judges_paraphrases_with_its_own_template_as_tuneforge_eval_does(tmp_path, one_thread):
    """--judge RUN: the tuned run scores each paraphrase back the way `tuneforge eval` scores
    that run (its system prompt and answer template): every kept text is one the run labels
    right under eval, and the texts it labels otherwise are dropped."""
    seed = write_jsonl(tmp_path / "labelled.jsonl", [
        {"text": f"Ticket {i}: my parcel number {i} has not arrived yet.", "label": lab}
        for i, lab in enumerate(["Shipping", "Billing"] * 4)])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "model": {"name": "tiny:llama"}, "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(seed), "labels": ["Shipping", "Billing"],
                 "template": {"system": "Route the ticket.", "assistant": "Department: {label}"}},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0,
                  "bf16": "false", "progress": False}}))
    assert tuneforge_main(["train", str(cfg)]) == 0
    out = tmp_path / "para.jsonl"
    summary = synth(options(seed, out, mode="paraphrase", num=4, judge=str(tmp_path / "run"),
                            max_attempts=200), say=lambda _: None)
    assert summary["records"] == 4
    assert tuneforge_main(["eval", str(tmp_path / "run"), "--data", str(out), "--samples", "0",
                           "--output-dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    tuned = next(iter(result["tasks"].values()))["systems"]["tuned"]
    assert tuned["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="--judge"):
        SynthOptions(str(seed), str(out), 4, mode="instruct", judge="x").check()
