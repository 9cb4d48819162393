"""The studio, used as a person would: a real headless Chromium (Debian's) driven by Playwright
against a real server on a loopback port, with real training runs and a real jobs worker.

Each browser test saves a screenshot under its tmp_path. HTTP-level tests pin the 4xx answers
(never a 5xx) and the sign-in when the server has keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from browser import chromium_or_skip, launch, live_studio
from helpers import chat_records, write_jsonl

from tuneforge.jobs.store import JobStore, default_url
from tuneforge.serve.app import ServeSettings
from tuneforge.serve.auth import KeyStore
from tuneforge.serve.engine import load_served_models
from tuneforge.studio.app import create_studio_app

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("TUNEFORGE_API_KEYS", None)
KEY = "sk-studio-test-key-1"
WAIT_MS = 120_000  # the longest a browser wait may take (training, jobs) before failing


def write_run_config(folder: Path, **train) -> Path:
    """A tiny-llama LoRA run config over 32 chat records, validation every few steps."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", chat_records(32))
    write_jsonl(folder / "val.jsonl", chat_records(40)[32:])
    settings = {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "bf16": "false", "eval_every": 3,
                "save_every": 3, "warmup_steps": 1, **train}
    cfg = folder / "run.yaml"
    cfg.write_text("model: {name: 'tiny:llama'}\n"
                   "adapter: {method: lora, r: 4, alpha: 8}\n"
                   f"data: {{train: {folder / 'train.jsonl'}, "
                   f"validation: {folder / 'val.jsonl'}}}\n"
                   f"train: {json.dumps(settings)}\n")
    return cfg


def start_training(cfg: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--set",
                             f"output_dir={run_dir}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A runs folder with two finished 6-step runs (trained at once), and a jobs folder."""
    root = tmp_path_factory.mktemp("studio")
    runs, jobs = root / "runs", root / "jobs"
    jobs.mkdir()
    procs = [start_training(write_run_config(root / "configs" / name, lr=lr), runs / name)
             for name, lr in (("small-a", 3e-3), ("small-b", 1e-2))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return {"root": root, "runs": runs, "jobs": jobs}


@pytest.fixture(scope="module")
def models():
    return load_served_models("tiny:llama")


@pytest.fixture(scope="module")
def studio(folders, models):
    """The studio (no keys, loopback) on a live server; yields its base URL."""
    store = JobStore(default_url(folders["jobs"]))
    app = create_studio_app(models, store, folders["jobs"], folders["runs"],
                            ServeSettings(rate_limit=0, max_tokens=64),
                            feedback_db=folders["root"] / "feedback.db")
    with live_studio(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def tab(browser, tmp_path):
    """A fresh page; every browser-side error is collected and must stay empty."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    yield page
    context.close()
    assert not page.errors, page.errors


# ----------------------------------------------------------------------------- runs


def test_a_run_page_shows_its_curves_growing_while_it_trains(studio, folders, tab, tmp_path):
    cfg = write_run_config(tmp_path / "cfg", max_steps=400, eval_every=40, save_every=200,
                           batch_size=2)
    run_dir = folders["runs"] / "live"
    proc = start_training(cfg, run_dir)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run wrote no metrics"
            time.sleep(0.1)
        tab.goto(f"{studio}/studio/runs/runs/live")
        tab.wait_for_function("window.studioRun && window.studioRun.points > 0")
        first = tab.evaluate("window.studioRun.points")
        assert tab.get_attribute("#run-status", "data-status") == "running"
        # the curve grows without a reload: more points arrive through the open stream
        tab.wait_for_function(f"window.studioRun.points > {first}", timeout=WAIT_MS)
        assert tab.evaluate("document.getElementById('plot-loss').data[0].x.length") > first
        tab.screenshot(path=str(tmp_path / "run-live.png"), full_page=True)
        tab.wait_for_selector("#run-curves[data-done='true']", timeout=WAIT_MS)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert tab.evaluate("window.studioRun.points") == 400
    assert tab.get_attribute("#run-status", "data-status") == "done"
    # the facts, checkpoints and summary followed the run without a reload
    assert tab.inner_text("#run-steps") == "400"
    assert tab.inner_text("#run-best").startswith("val_loss ")
    assert "step-000400" in tab.inner_text("#checkpoints-table")
    assert "best_val_loss" in tab.inner_text("#summary-table")
    val_traces = tab.evaluate("document.getElementById('plot-val').data.map(t => t.name)")
    assert "val_loss" in val_traces
    assert tab.evaluate("document.getElementById('plot-val').data[0].x.length") == 10
    tab.screenshot(path=str(tmp_path / "run-done.png"), full_page=True)


def test_runs_list_and_compare_two_runs(studio, tab, tmp_path):
    tab.goto(f"{studio}/studio/runs")
    rows = tab.locator("#runs-table tbody tr")
    names = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())]
    assert {"runs/small-a", "runs/small-b"} <= set(names)
    assert "done" in rows.nth(names.index("runs/small-a")).inner_text()
    tab.check("input[value='runs/small-a']")
    tab.check("input[value='runs/small-b']")
    tab.click("#compare-form button[type=submit]")
    tab.wait_for_selector("#compare-curves[data-traces]")
    headers = tab.locator("#compare-table thead th").all_inner_texts()
    assert headers[1:] == ["runs/small-a", "runs/small-b"]
    lr_row = tab.locator("#compare-table tr", has_text="train.lr").inner_text()
    assert "0.003" in lr_row and "0.01" in lr_row
    traces = tab.evaluate("document.getElementById('compare-loss').data.map(t => t.x.length)")
    assert traces == [6, 6]
    tab.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


# ----------------------------------------------------------------------------- data


def test_a_broken_upload_shows_its_errors_by_line(studio, tab, tmp_path):
    broken = tmp_path / "broken.jsonl"
    good = json.dumps(chat_records(1)[0])
    broken.write_text(f"{good}\n{{not json\n"
                      '{"messages": [{"role": "user", "content": "hi"}, '
                      '{"role": "assistant"}]}\n' + good.replace("item 0", "item 9") + "\n")
    before = broken.read_bytes()
    tab.goto(f"{studio}/studio/data")
    tab.set_input_files("#upload-file", str(broken))
    tab.click("#upload-button")
    tab.wait_for_selector("#check-verdict")
    assert tab.inner_text("#check-verdict").startswith("FAILED")
    errors = {}
    for row in tab.locator("#problems tbody tr").all():
        severity, source, line, field, message = row.locator("td").all_inner_texts()
        if severity == "error":
            errors[int(line)] = (source, field, message)
    assert set(errors) == {2, 3}
    assert all(source == "broken.jsonl" for source, _, _ in errors.values())
    assert "JSON" in errors[2][2] or "json" in errors[2][2]
    assert "content" in errors[3][1] + errors[3][2]
    assert broken.read_bytes() == before  # the user's file is only read
    tab.screenshot(path=str(tmp_path / "data-broken.png"), full_page=True)

    # a file type the readers do not know is refused at upload, on the page, by name
    odd = tmp_path / "notes.txt"
    odd.write_text("hello\n")
    tab.goto(f"{studio}/studio/data")
    tab.set_input_files("#upload-file", str(odd))
    tab.click("#upload-button")
    tab.wait_for_selector("#upload-error:not([hidden])")
    assert "notes.txt" in tab.inner_text("#upload-error")
    assert tab.url.endswith("/studio/data")


def test_a_clean_upload_passes_and_has_a_quality_report(studio, tab, tmp_path):
    data = write_jsonl(tmp_path / "clean.jsonl", chat_records(24))
    tab.goto(f"{studio}/studio/data")
    tab.set_input_files("#upload-file", str(data))
    tab.click("#upload-button")
    tab.wait_for_selector("#check-verdict")
    assert tab.inner_text("#check-verdict").startswith("OK: 0 error(s)")
    report = httpx.get(f"{studio}{tab.get_attribute('#quality-link', 'href')}", timeout=120)
    assert report.status_code == 200 and "clean.jsonl" in report.text
    assert report.headers["content-security-policy"] == "sandbox"


# ----------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def worker(folders):
    """A jobs worker process on the studio's jobs folder, stopped after the module."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "jobs", "worker", "--jobs-dir",
         str(folders["jobs"]), "--heartbeat", "0.5", "--stale-after", "3", "--poll", "0.2",
         "--set", "train.bf16=false"], env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upload_in_page(tab, studio: str, path: Path) -> str:
    tab.goto(f"{studio}/studio/data")
    tab.set_input_files("#upload-file", str(path))
    tab.click("#upload-button")
    tab.wait_for_selector("#check-verdict")
    return tab.url.rsplit("/", 1)[1]


def test_a_job_from_the_form_names_a_bad_field_then_succeeds(studio, worker, tab, tmp_path):
    file_id = upload_in_page(tab, studio, write_jsonl(tmp_path / "jobdata.jsonl",
                                                      chat_records(16)))
    tab.goto(f"{studio}/studio/jobs/new?training_file={file_id}")
    assert tab.input_value("#f-training_file") == file_id
    tab.fill("#f-n_epochs", "three")
    tab.fill("#f-batch_size", "4")
    tab.click("#job-submit")
    tab.wait_for_selector("#err-n_epochs:not([hidden])")
    assert "n_epochs" in tab.inner_text("#err-n_epochs")
    assert tab.get_attribute(".field[data-field='n_epochs']", "class") == "field invalid"
    tab.screenshot(path=str(tmp_path / "job-bad-field.png"), full_page=True)
    assert tab.url.endswith(f"/studio/jobs/new?training_file={file_id}")  # nothing submitted

    tab.fill("#f-n_epochs", "1")
    tab.fill("#f-suffix", "studio")
    tab.click("#job-submit")
    tab.wait_for_url("**/studio/jobs/ftjob-*")
    job_id = tab.url.rsplit("/", 1)[1]
    tab.wait_for_selector("#job-status[data-status='succeeded']", timeout=WAIT_MS)
    assert tab.inner_text("#job-ft-model") == f"ft:tiny:llama:studio:{job_id}"
    events = tab.locator("#job-events li").all_inner_texts()
    assert any("Created fine-tuning job" in e for e in events)
    assert tab.is_hidden("#job-cancel")
    tab.screenshot(path=str(tmp_path / "job-succeeded.png"), full_page=True)
    # the job's run folder is a run like any other: its page has the finished curve
    tab.goto(f"{studio}/studio/runs/jobs/{job_id}/run")
    tab.wait_for_selector("#run-curves[data-done='true']")
    assert tab.evaluate("window.studioRun.points") == 4  # 16 records, batch 4, 1 epoch


def test_a_job_can_be_cancelled_from_its_page(studio, folders, tab, tmp_path):
    # 50 epochs: still queued or running when the button is clicked, whether or not the
    # module's worker has claimed it yet
    store = JobStore(default_url(folders["jobs"]))
    data = write_jsonl(tmp_path / "c.jsonl", chat_records(16))
    file_id = upload_in_page(tab, studio, data)
    tab.goto(f"{studio}/studio/jobs/new?training_file={file_id}")
    tab.fill("#f-n_epochs", "50")
    tab.click("#job-submit")
    tab.wait_for_url("**/studio/jobs/ftjob-*")
    job_id = tab.url.rsplit("/", 1)[1]
    tab.wait_for_selector("#job-cancel:not([hidden])")
    tab.click("#job-cancel")
    tab.wait_for_selector("#job-status[data-status='cancelled']")
    assert store.get_job(job_id)["status"] == "cancelled"
    tab.screenshot(path=str(tmp_path / "job-cancelled.png"), full_page=True)


# ----------------------------------------------------------------------------- playground


def test_the_playground_streams_the_base_model_and_a_run_side_by_side(studio, tab, tmp_path):
    tab.goto(f"{studio}/studio/playground?model=run:runs/small-a")
    assert tab.input_value("#pane-1-model") == "run:runs/small-a"
    options = tab.locator("#pane-2-model option").all_inner_texts()
    assert "run:runs/small-b" in options
    tab.select_option("#pane-2-model", "run:runs/small-b")
    tab.fill("#prompt", "item 3: what colour is it?")
    tab.fill("#max-tokens", "24")
    tab.click("#play-run")
    for i in (0, 1, 2):
        tab.wait_for_selector(f"#pane-{i}-text[data-state='done']", timeout=WAIT_MS)
    texts = [tab.inner_text(f"#pane-{i}-text") for i in (0, 1, 2)]
    assert all(texts), texts
    assert tab.get_attribute("#pane-3-text", "data-state") == "idle"
    # the same prompt, greedy, through the API without streaming: the panes streamed that text
    for i, model in enumerate(["tiny:llama", "run:runs/small-a", "run:runs/small-b"]):
        r = httpx.post(f"{studio}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "item 3: what colour is it?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == texts[i].strip()
    tab.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

    tab.fill("#max-tokens", "0")
    tab.click("#play-run")
    tab.wait_for_selector("#play-error:not([hidden])")
    assert "max tokens" in tab.inner_text("#play-error")


# ----------------------------------------------------------------------------- HTTP


def test_bad_requests_get_4xx_never_5xx(studio, folders):
    cases = [
        ("GET", "/studio/runs/runs/nope", 404),
        ("GET", "/studio/runs/runs/../../etc", 404),
        ("GET", "/studio/runs/elsewhere/small-a", 404),
        ("GET", "/studio/api/runs/runs/nope/stream", 404),
        ("GET", "/studio/compare", 400),
        ("GET", "/studio/compare?run=runs/small-a", 400),
        ("GET", "/studio/compare?run=runs/small-a&run=runs/nope", 404),
        ("GET", "/studio/sweeps/runs/small-a", 404),
        ("GET", "/studio/curves/runs/small-a", 404),
        ("GET", "/studio/files/runs/small-a/adapter/adapter_model.safetensors", 404),
        ("GET", "/studio/files/runs/small-a/../../../../etc/passwd", 404),
        ("GET", "/studio/files/runs/small-a/nothing.png", 404),
        ("GET", "/studio/data/file-nope", 404),
        ("GET", "/studio/data/file-nope/report", 404),
        ("GET", "/studio/jobs/ftjob-nope", 404),
        ("GET", "/studio/static/nothing.js", 404),
        ("GET", "/studio/static/..%2Fapp.py", 404),
        ("GET", "/studio/no-such-page", 404),
        ("POST", "/studio/runs", 405),
    ]
    with httpx.Client(base_url=studio, timeout=60) as client:
        for method, path, status in cases:
            r = client.request(method, path)
            assert r.status_code == status, (method, path, r.status_code, r.text[:300])
        for path in ("/studio/runs", "/studio/runs/runs/small-a", "/studio/data",
                     "/studio/jobs", "/studio/jobs/new", "/studio/playground",
                     "/studio/compare?run=runs/small-a&run=runs/small-b",
                     "/studio/files/runs/small-a/config.yaml",
                     "/studio/static/plotly.min.js", "/studio/static/studio.js"):
            assert client.get(path).status_code == 200, path
        # the API refuses a bad job by field; nothing is created
        r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny:llama",
                                                      "training_file": "file-nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
        r = client.get("/studio/runs/runs/small-a")
        assert "<script>" not in r.text.split("</h1>")[1].split("<script")[0]


def test_run_names_and_file_contents_are_escaped(studio, folders):
    evil = folders["runs"] / "<b>x<i>"
    evil.mkdir()
    (evil / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (evil / "config.yaml").write_text("recipe: '<script>alert(1)</script>'\n")
    try:
        r = httpx.get(f"{studio}/studio/runs", timeout=60)
        assert r.status_code == 200
        assert "<b>x<i>" not in r.text and "&lt;b&gt;x&lt;i&gt;" in r.text
        assert "<script>alert(1)" not in r.text
    finally:
        for f in evil.iterdir():
            f.unlink()
        evil.rmdir()


def test_with_keys_the_pages_need_a_sign_in(folders, models):
    keys = KeyStore([("alice", KEY, "test")])
    store = JobStore(default_url(folders["jobs"]))
    app = create_studio_app(models, store, folders["jobs"], folders["runs"],
                            ServeSettings(rate_limit=0), keys)
    with live_studio(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.get("/studio/runs")
        assert r.status_code == 303 and r.headers["location"].startswith("/studio/login?next=")
        assert client.get("/studio/api/runs/runs/small-a/stream").status_code == 401
        assert client.get("/studio/feedback").status_code == 303
        assert client.get("/studio/static/studio.css").status_code == 200  # public
        r = client.post("/studio/login", data={"key": "wrong-key-123", "next": "/studio/runs"})
        assert r.status_code == 401 and "not one of this server" in r.text
        r = client.post("/studio/login", data={"key": KEY, "next": "https://evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/studio/runs"
        assert client.get("/studio/runs").status_code == 200  # the cookie signs in
        assert client.get("/v1/models").status_code == 401  # the API still wants the bearer
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code \
            == 200


def test_the_cli_refuses_a_public_address_without_keys(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "studio", "--host", "0.0.0.0",
                           "--port", "0", "--jobs-dir", str(tmp_path / "jobs")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "--api-keys" in proc.stderr and "Traceback" not in proc.stderr
