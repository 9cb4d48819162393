"""The fine-tuning jobs API: the official `openai` client against a real server on loopback,
workers as threads and processes on SQLite and on a real PostgreSQL, a worker killed mid-job,
bad input, and the sweep's PostgreSQL path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import optuna
import pytest
from helpers import chat_records, preference_records, write_jsonl
from starlette.testclient import TestClient
from test_serve import LiveServer
from test_sweep import base_config, sweep

from tuneforge.generation import generate_batch
from tuneforge.jobs.api import create_jobs_app, run_folder
from tuneforge.jobs.store import JobStore, default_url
from tuneforge.jobs.worker import Worker, WorkerSettings
from tuneforge.models.runs import load_for_inference
from tuneforge.serve.app import ServeSettings
from tuneforge.serve.auth import KeyStore
from tuneforge.serve.engine import load_served_models

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
KEYS = [("alice", ALICE, "test"), ("bob", BOB, "test")]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
FAST = dict(heartbeat_s=0.5, stale_after_s=3.0, poll_s=0.2, overrides=["train.bf16=false"])
FINAL = ("succeeded", "failed", "cancelled")


def supervised(n_epochs: int = 1, batch_size: int = 4, **more) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": n_epochs, "batch_size": batch_size, **more}}}


def jobs_app(jobs_dir: Path, db: str | None = None, **settings):
    """The serve app on tiny:llama with the jobs router, keys alice and bob."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(db or default_url(jobs_dir))
    app = create_jobs_app(load_served_models("tiny:llama"), store, jobs_dir,
                          ServeSettings(rate_limit=0, **settings), KeyStore(KEYS))
    return app, store


def auth(key: str = ALICE) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, path: Path, key: str = ALICE) -> str:
    r = client.post("/v1/files", files={"file": (path.name, path.read_bytes())},
                    data={"purpose": "fine-tune"}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client: TestClient, key: str = ALICE, **body) -> dict:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny:llama", **body},
                    headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def start_worker(jobs_dir: Path, db: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "jobs", "worker", "--jobs-dir", str(jobs_dir),
         "--db", db, "--heartbeat", "0.5", "--stale-after", "3", "--poll", "0.2",
         "--set", "train.bf16=false", *extra], env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def all_events(store: JobStore, job_id: str) -> list[dict]:
    return list(reversed(store.list_events(job_id, limit=10_000)[0]))  # oldest first


# ----------------------------------------------------------------------------- the whole flow


def test_the_whole_flow_with_the_openai_client(tmp_path, one_thread):
    """files.create, jobs.create/list/retrieve/list_events/cancel, checkpoints, then chat on
    the tuned model, served by the running server as soon as the job succeeded."""
    jobs_dir = tmp_path / "jobs"
    app, store = jobs_app(jobs_dir)
    server = LiveServer(app)
    worker = Worker(store, jobs_dir, WorkerSettings(**FAST))
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        alice = server.client(ALICE)
        train = write_jsonl(tmp_path / "train.jsonl", chat_records(24))
        val = write_jsonl(tmp_path / "val.jsonl", chat_records(32)[24:])
        with open(train, "rb") as fh:
            train_file = alice.files.create(file=fh, purpose="fine-tune")
        with open(val, "rb") as fh:
            val_file = alice.files.create(file=fh, purpose="fine-tune")
        assert (train_file.filename, train_file.bytes) == ("train.jsonl", train.stat().st_size)
        assert alice.files.content(train_file.id).read() == train.read_bytes()
        assert {f.id for f in alice.files.list()} == {train_file.id, val_file.id}

        job = alice.fine_tuning.jobs.create(
            model="tiny:llama", training_file=train_file.id, validation_file=val_file.id,
            suffix="colours", seed=7,
            method=supervised(n_epochs=1, batch_size=4, learning_rate_multiplier=10))
        assert job.status == "validating_files" and job.fine_tuned_model is None
        other = alice.fine_tuning.jobs.create(model="tiny:llama", training_file=train_file.id)
        assert alice.fine_tuning.jobs.cancel(other.id).status == "cancelled"
        thread.start()

        deadline = time.time() + 240
        while (job := alice.fine_tuning.jobs.retrieve(job.id)).status not in FINAL:
            assert time.time() < deadline, f"job still {job.status}"
            time.sleep(0.3)
        assert job.status == "succeeded", job.error
        name = f"ft:tiny:llama:colours:{job.id}"
        assert job.fine_tuned_model == name and job.trained_tokens > 0
        assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
        assert alice.fine_tuning.jobs.retrieve(other.id).status == "cancelled"
        assert [j.id for j in alice.fine_tuning.jobs.list()] == [other.id, job.id]
        first = alice.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in first.data] == [other.id] and first.has_more

        events = list(alice.fine_tuning.jobs.list_events(job.id, limit=4))  # several pages
        train_events = sorted((e.data["step"], e.data["train_loss"]) for e in events
                              if e.type == "metrics" and "train_loss" in e.data)
        run_dir = run_folder(jobs_dir, job.id)
        assert train_events == train_losses(run_dir)  # JSON floats round-trip exactly
        assert [s for s, _ in train_events] == list(range(1, 7))
        assert any(e.type == "metrics" and e.data.get("valid_loss") for e in events)
        messages = [e.message for e in events]
        assert f"New fine-tuned model created: {name}" in messages
        checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [6]  # one epoch: one checkpoint
        assert checkpoints[0].metrics.valid_loss is not None
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{name}:ckpt-step-6"

        # served at once by the running server, with the job's adapter
        assert name in [m.id for m in alice.models.list()]
        hello = [{"role": "user", "content": "item 3: what colour is it?"}]
        reply = alice.chat.completions.create(model=name, messages=hello, max_tokens=6,
                                              temperature=0)
        model, tok, _ = load_for_inference(str(run_dir))
        expected = generate_batch(model, tok, [hello], max_new_tokens=6, precision="fp32")[0]
        assert reply.choices[0].message.content == tok.decode(expected.token_ids,
                                                              skip_special_tokens=True)
        assert name in app.state.server.models.adapter_ids

        # another key sees none of it
        bob = server.client(BOB)
        assert name not in [m.id for m in bob.models.list()]
        for call in (lambda: bob.chat.completions.create(model=name, messages=hello),
                     lambda: bob.fine_tuning.jobs.retrieve(job.id),
                     lambda: bob.files.retrieve(train_file.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert list(bob.fine_tuning.jobs.list()) == []
    finally:
        worker.stop_event.set()
        server.close()
        thread.join(60) if thread.is_alive() else None


# ----------------------------------------------------------------------------- many workers


def test_two_workers_on_postgresql_run_each_of_four_jobs_exactly_once(tmp_path, postgresql,
                                                                      one_thread):
    jobs_dir = tmp_path / "jobs"
    app, store = jobs_app(jobs_dir, postgresql)
    with TestClient(app) as client:
        file_id = upload(client, write_jsonl(tmp_path / "train.jsonl", chat_records(12)))
        ids = [create(client, training_file=file_id, seed=i, method=supervised())["id"]
               for i in range(4)]
    workers = [start_worker(jobs_dir, postgresql, "--until-idle") for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    for job_id in ids:
        job = store.get_job(job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1 and job["worker"] is None  # claimed for running once
        events = all_events(store, job_id)
        assert [e["message"] for e in events].count("Fine-tuning job started") == 1
        steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
        assert steps == [1, 2, 3]  # each step trained and reported once
        assert train_losses(run_folder(jobs_dir, job_id))[-1][0] == 3
    assert sorted(p.name for p in (jobs_dir / "runs").iterdir()) == sorted(ids)


def test_a_worker_killed_mid_job_is_resumed_from_its_checkpoint_by_another(tmp_path):
    """SIGKILL the worker after the job's first checkpoint: its training dies with it, another
    worker re-queues the silent job and resumes it with --resume; the losses are those of an
    uninterrupted job with the same settings."""
    jobs_dir = tmp_path / "jobs"
    app, store = jobs_app(jobs_dir)
    method = supervised(n_epochs=4, batch_size=2)
    with TestClient(app) as client:
        file_id = upload(client, write_jsonl(tmp_path / "train.jsonl", chat_records(24)))
        killed = create(client, training_file=file_id, seed=3, method=method)["id"]
        straight = create(client, training_file=file_id, seed=3, method=method)["id"]
    db = default_url(jobs_dir)
    first = start_worker(jobs_dir, db, "--save-every", "4")
    checkpoints = run_folder(jobs_dir, killed) / "checkpoints"
    deadline = time.time() + 180
    while first.poll() is None and time.time() < deadline:
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL, "the worker ended before it could be killed"
    assert store.get_job(killed)["status"] == "running"  # nobody told the database
    done_before = len(train_losses(run_folder(jobs_dir, killed)))
    assert done_before < 48

    second = start_worker(jobs_dir, db, "--save-every", "4", "--until-idle")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    job = store.get_job(killed)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    messages = [e["message"] for e in all_events(store, killed)]
    assert any("stopped answering" in m for m in messages)
    assert any(m.startswith("Resumed from checkpoint step") for m in messages)
    log = (jobs_dir / "runs" / killed / "train.log").read_text()
    assert "resumed from" in log
    a, b = train_losses(run_folder(jobs_dir, straight)), train_losses(run_folder(jobs_dir, killed))
    assert [s for s, _ in b] == list(range(1, 49))  # no step lost or doubled
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-6, abs=1e-7)
    steps = [e["data"]["step"] for e in all_events(store, killed) if e["type"] == "metrics"]
    assert sorted(steps) == list(range(1, 49))  # events: each step once across both workers


def test_pausing_a_running_job_keeps_its_checkpoints_and_resume_continues_from_them(
        tmp_path, one_thread):
    jobs_dir = tmp_path / "jobs"
    app, store = jobs_app(jobs_dir)
    worker = Worker(store, jobs_dir, WorkerSettings(**{**FAST, "save_every": 4}))
    thread = threading.Thread(target=worker.run, daemon=True)
    with TestClient(app) as client:
        file_id = upload(client, write_jsonl(tmp_path / "train.jsonl", chat_records(24)))
        job_id = create(client, training_file=file_id, method=supervised(n_epochs=4,
                                                                         batch_size=2))["id"]
        thread.start()
        try:
            checkpoints = run_folder(jobs_dir, job_id) / "checkpoints"
            deadline = time.time() + 180
            while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
                assert time.time() < deadline and store.get_job(job_id)["status"] not in FINAL
                time.sleep(0.01)
            path = f"/v1/fine_tuning/jobs/{job_id}"
            assert client.post(f"{path}/pause", headers=auth()).json()["status"] == "paused"
            while store.get_job(job_id)["worker"] is not None:  # the worker let go of it
                time.sleep(0.05)
            assert client.get(path, headers=auth()).json()["status"] == "paused"
            assert client.post(f"{path}/resume", headers=auth()).json()["status"] == "queued"
            while (status := store.get_job(job_id)["status"]) not in FINAL:
                assert time.time() < deadline
                time.sleep(0.2)
        finally:
            worker.stop_event.set()
            thread.join(60)
    assert status == "succeeded" and store.get_job(job_id)["attempts"] == 2
    messages = [e["message"] for e in all_events(store, job_id)]
    assert "Training stopped: the job is paused; checkpoints kept" in messages
    assert any(m.startswith("Resumed from checkpoint step") for m in messages)
    assert [s for s, _ in train_losses(run_folder(jobs_dir, job_id))] == list(range(1, 49))


# ----------------------------------------------------------------------------- bad input


def error_of(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_input_is_refused_in_openai_shape_and_broken_data_fails_validation(tmp_path,
                                                                               one_thread):
    jobs_dir = tmp_path / "jobs"
    app, store = jobs_app(jobs_dir, max_upload_bytes=4096)
    broken = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in chat_records(6)]
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'  # cut short
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    broken.write_text("\n".join(lines) + "\n")
    with TestClient(app) as client:
        good = upload(client, write_jsonl(tmp_path / "good.jsonl", chat_records(8)))
        bad = upload(client, broken)
        pairs = upload(client, write_jsonl(tmp_path / "pairs.jsonl", preference_records(8)))
        job = create(client, training_file=bad, method=supervised())

        post = lambda **body: client.post("/v1/fine_tuning/jobs",  # noqa: E731
                                          json={"model": "tiny:llama", **body}, headers=auth())
        error_of(post(model="gpt-5", training_file=good), 400, "model")
        error_of(post(training_file="file-nope"), 400, "training_file")
        error_of(post(training_file=good, validation_file="file-nope"), 400, "validation_file")
        for hyper in ({"n_epochs": 0}, {"n_epochs": 51}, {"batch_size": 2.5},
                      {"learning_rate_multiplier": -1}, {"n_epochs": "many"}):
            name = next(iter(hyper))
            error_of(post(training_file=good, method=supervised(**hyper)), 400,
                     f"method.supervised.hyperparameters.{name}")
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
        assert "preference" in error_of(post(training_file=good, method=dpo), 400,
                                        "training_file")["message"]
        error_of(post(training_file=pairs, method={"type": "dpo", "dpo": {
            "hyperparameters": {"beta": 5}}}), 400, "method.dpo.hyperparameters.beta")
        error_of(post(training_file=pairs), 400, "training_file")  # pairs cannot train SFT
        error_of(post(training_file=good, adapter={"method": "lora", "r": 0}), 400, "adapter")
        error_of(post(training_file=good, epochs=3), 400, "epochs")

        # files: too large, wrong purpose or type; another key's ids are 404
        big = tmp_path / "big.jsonl"
        write_jsonl(big, chat_records(200))
        r = client.post("/v1/files", files={"file": ("big.jsonl", big.read_bytes())},
                        data={"purpose": "fine-tune"}, headers=auth())
        error_of(r, 413)
        r = client.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")},
                        data={"purpose": "assistants"}, headers=auth())
        error_of(r, 400, "purpose")
        r = client.post("/v1/files", files={"file": ("notes.txt", b"hi\n")},
                        data={"purpose": "fine-tune"}, headers=auth())
        error_of(r, 400, "file")
        for method, path in (("GET", f"/v1/files/{good}"), ("GET", f"/v1/files/{good}/content"),
                             ("DELETE", f"/v1/files/{good}"),
                             ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
                             ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
                             ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")):
            error_of(client.request(method, path, headers=auth(BOB)), 404)
        assert client.get("/v1/files", headers=auth(BOB)).json()["data"] == []

        # pause and resume a queued job; a finished one cannot be cancelled
        queued = create(client, training_file=good, method=supervised())
        store.set_status(queued["id"], "queued", only_from=("validating_files",))
        pause = f"/v1/fine_tuning/jobs/{queued['id']}/pause"
        assert client.post(pause, headers=auth()).json()["status"] == "paused"
        resume = f"/v1/fine_tuning/jobs/{queued['id']}/resume"
        assert client.post(resume, headers=auth()).json()["status"] == "queued"
        cancel = f"/v1/fine_tuning/jobs/{queued['id']}/cancel"
        assert client.post(cancel, headers=auth()).json()["status"] == "cancelled"
        error_of(client.post(cancel, headers=auth()), 400, "fine_tuning_job_id")

    # the worker fails the broken job in validating_files, worded as `data check` words it
    Worker(store, jobs_dir, WorkerSettings(**FAST, until_idle=True)).run()
    failed = store.get_job(job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_file"
    assert failed["error"]["param"] == "training_file"
    check = subprocess.run([sys.executable, "-m", "tuneforge", "data", "check", "train.jsonl"],
                           cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120)
    assert check.returncode == 2
    problems = [ln.strip() for ln in check.stdout.splitlines() if ln.startswith("  train.jsonl:")]
    assert len(problems) == 2 and problems[0].startswith("train.jsonl:3:")
    assert problems[1].startswith("train.jsonl:5:")
    event_messages = [e["message"] for e in all_events(store, job["id"])]
    for problem in problems:
        assert problem in failed["error"]["message"]
        assert problem in event_messages
    assert not (jobs_dir / "runs" / job["id"] / "run").exists()  # nothing was trained

    # a restarted server (a new app on the same folder) has every file, job and event
    app2, _ = jobs_app(jobs_dir, max_upload_bytes=4096)
    with TestClient(app2) as client:
        assert {f["id"] for f in client.get("/v1/files", headers=auth()).json()["data"]} == {
            good, bad, pairs}
        assert client.get(f"/v1/files/{bad}/content", headers=auth()).content == \
            broken.read_bytes()
        again = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth()).json()
        assert again["status"] == "failed" and again["error"] == failed["error"]
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100",
                            headers=auth()).json()["data"]
        assert [e["message"] for e in reversed(events)] == event_messages
        # deleting a file removes its blob once no file row names it
        blob = jobs_dir / "files" / store.get_file(good, "alice")["sha256"]
        assert client.delete(f"/v1/files/{good}", headers=auth()).json()["deleted"] is True
        assert not blob.exists()
        error_of(client.get(f"/v1/files/{good}", headers=auth()), 404)


# ----------------------------------------------------------------------------- the sweep


def test_a_sweep_on_postgresql_with_two_workers_runs_each_trial_once(tmp_path, postgresql,
                                                                     one_thread):
    """The README's "several machines on one study": two worker processes on a PostgreSQL
    storage share the grid; every point runs once."""
    config = base_config(tmp_path, max_steps=2)
    summary, out = sweep(tmp_path, config, "objective: val_loss\nsampler: grid\npruner: none\n"
                         "params:\n  train.lr: [1.0e-3, 1.0e-2]\n  adapter.r: [2, 4]\n", "pg",
                         storage=postgresql, workers=2)
    assert summary["storage"] == postgresql and summary["trials"]["complete"] == 4
    trials = optuna.load_study(study_name="pg", storage=postgresql).get_trials()
    assert sorted((t.params["train.lr"], t.params["adapter.r"]) for t in trials) == [
        (1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
