"""`tuneforge serve`: a real uvicorn server on a loopback port, spoken to with the official
`openai` client (and httpx for malformed requests), on the tiny model with two LoRA adapters."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from helpers import chat_records, write_jsonl

from tuneforge.cli import main as tuneforge_main
from tuneforge.errors import ConfigError, ModelLoadError
from tuneforge.generation import generate_batch
from tuneforge.models.loading import load_model
from tuneforge.serve.app import ServeSettings, create_app
from tuneforge.serve.auth import KeyStore, RateLimiter, load_keys
from tuneforge.serve.batcher import TextStream
from tuneforge.serve.cli import bind_socket
from tuneforge.serve.engine import load_served_models
from tuneforge.serve.monitor import ks_statistic

ALICE, BARE = "sk-alice-0123456789", "sk-bare-key-0123456789"
HELLO = [{"role": "user", "content": "hello there"}]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "server did not start"

    def client(self, key: str = ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def make_adapter(folder: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights on tiny:llama, saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model("tiny:llama")
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_adapter(root / "alpha", 1), "beta": make_adapter(root / "beta", 2)}


@pytest.fixture(scope="module")
def live(adapters, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# who may call\nalice:{ALICE}\n\n{BARE}\n")
    models = load_served_models("tiny:llama", list(adapters.items()))
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    settings = ServeSettings(max_tokens=600, batch_wait_ms=50, rate_limit=0,
                             max_request_bytes=20_000, request_log=log)
    server = LiveServer(create_app(models, settings, load_keys(keys, env={})))
    server.log_path = log
    yield server
    server.close()


def reference(messages, max_tokens: int, adapter: Path | None = None) -> str:
    """The greedy reply computed directly (fp32, a separately loaded model)."""
    model, tok = load_model("tiny:llama")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    result = generate_batch(model, tok, [messages], max_new_tokens=max_tokens, precision="fp32")
    return tok.decode(result[0].token_ids, skip_special_tokens=True)


def chat(client, model="tiny:llama", messages=HELLO, **kw):
    return client.chat.completions.create(model=model, messages=messages, **kw)


# ----------------------------------------------------------------------------- the API


def test_models_list_and_retrieve(live):
    client = live.client()
    assert [m.id for m in client.models.list()] == ["tiny:llama", "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def test_chat_without_and_with_streaming(live):
    client = live.client(BARE)
    want = reference(HELLO, 12)
    reply = chat(client, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12

    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_adapter_is_picked_by_the_model_field(live, adapters):
    client = live.client()
    got = {m: chat(client, model=m, max_tokens=10, temperature=0).choices[0].message.content
           for m in ("tiny:llama", "alpha", "beta")}
    assert got["tiny:llama"] == reference(HELLO, 10)
    assert got["alpha"] == reference(HELLO, 10, adapters["alpha"])
    assert got["beta"] == reference(HELLO, 10, adapters["beta"])
    assert len(set(got.values())) == 3


def test_completions_seeds_choices_and_stop(live):
    client = live.client()
    kw = {"model": "alpha", "prompt": ["abc", "a longer prompt"], "max_tokens": 6,
          "temperature": 0.9, "seed": 7, "n": 2}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24
    assert first.usage.prompt_tokens == len("abc") + len("a longer prompt")  # byte tokens
    # a stop string cuts the text before it and ends the choice early
    plain = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    stop = next(ch for ch in plain[2:] if ch.isascii() and ch.isalnum())
    cut = chat(client, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == plain[: plain.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 40
    streamed = chat(client, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain[: plain.index(stop)]


def test_concurrent_requests_are_batched_and_greedy_output_does_not_depend_on_it(live):
    client = live.client()
    prompts = [[{"role": "user", "content": "x" * (1 + 7 * i)}] for i in range(6)]
    models = ["tiny:llama", "alpha"] * 3
    alone = [chat(client, m, p, max_tokens=8, temperature=0).choices[0].message.content
             for m, p in zip(models, prompts)]
    before = dict(live.app.state.server.batcher.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        # A long request keeps the worker busy; the others queue up and go as batches.
        blocker = pool.submit(chat, client, "tiny:llama", HELLO, max_tokens=500, temperature=0)
        futures = [pool.submit(chat, client, m, p, max_tokens=8, temperature=0)
                   for m, p in zip(models, prompts)]
        together = [f.result().choices[0].message.content for f in futures]
        assert blocker.result().choices[0].finish_reason == "length"
    assert together == alone
    sizes = live.app.state.server.batcher.batch_sizes
    assert any(sizes[n] > before.get(n, 0) for n in sizes if n > 1), sizes
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'tuneforge_batch_size_bucket{le="1.0"}' in metrics


def test_missing_or_wrong_key_is_401(live):
    with pytest.raises(openai.AuthenticationError) as err:
        live.client("sk-wrong-0123456789").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    response = httpx.post(f"{live.url}/v1/chat/completions", json={})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_rate_limit_is_per_key_with_retry_after():
    models = load_served_models("tiny:llama")
    keys = KeyStore([("a", "sk-aaaaaaaaaa", "test"), ("b", "sk-bbbbbbbbbb", "test")])
    server = LiveServer(create_app(models, ServeSettings(rate_limit=6, rate_burst=2), keys))
    try:
        a = server.client("sk-aaaaaaaaaa")
        a.models.list()
        a.models.list()
        with pytest.raises(openai.RateLimitError) as err:
            a.models.list()
        assert err.value.status_code == 429
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "rate_limit_exceeded"
        assert server.client("sk-bbbbbbbbbb").models.list().data  # b has its own bucket
    finally:
        server.close()


def test_models_load_in_a_thread_of_their_own_and_errors_reach_the_caller(tmp_path):
    """load_served_models runs in a thread that ends (no OpenMP team left on the caller's
    thread, bench/README.md); its result and its errors, with their types, reach the caller."""
    from tuneforge.serve.engine import in_own_thread

    caller = threading.get_ident()
    assert in_own_thread(lambda x: (x, threading.get_ident()), 5)[0] == 5
    assert in_own_thread(threading.get_ident) != caller
    with pytest.raises(ConfigError, match="model id"):
        load_served_models(str(tmp_path / "missing model"))
    with pytest.raises(ConfigError, match="--precision"):
        load_served_models("tiny:llama", precision="fp8")


MESSAGE = [{"role": "user", "content": "hi"}]
BAD_CHATS = [
    ({}, 400, "model"),
    ({"model": "tiny:llama"}, 400, "messages"),
    ({"model": "tiny:llama", "messages": []}, 400, "messages"),
    ({"model": "nope", "messages": MESSAGE}, 404, "model"),
    ({"model": "tiny:llama", "messages": MESSAGE, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny:llama", "messages": MESSAGE, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny:llama", "messages": MESSAGE, "max_tokens": 601}, 400, "max_tokens"),
    ({"model": "tiny:llama", "messages": MESSAGE, "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny:llama", "messages": MESSAGE, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny:llama", "messages": MESSAGE, "n": 17}, 400, "n"),
    ({"model": "tiny:llama", "messages": MESSAGE, "seed": 1.5}, 400, "seed"),
    ({"model": "tiny:llama", "messages": MESSAGE, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny:llama", "messages": MESSAGE, "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "tiny:llama", "messages": MESSAGE, "stop": [""]}, 400, "stop"),
    ({"model": "tiny:llama", "messages": MESSAGE, "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"model": "tiny:llama", "messages": MESSAGE, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny:llama", "messages": MESSAGE, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny:llama", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role"),
    ({"model": "tiny:llama", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "tiny:llama", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0].type"),
    ({"model": "tiny:llama", "messages": [{"role": "user", "content": "y" * 1100}]}, 400,
     "messages"),  # longer than the tiny model's 1024-token context
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD_CHATS)
def test_malformed_chat_requests_get_a_4xx_in_openai_shape(live, body, status, param):
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


@pytest.mark.parametrize("content,status", [
    (b"{not json", 400), (b'{"model": NaN}', 400), (b"", 400), (b"\xff\xfe", 400),
    (json.dumps({"model": "tiny:llama", "prompt": ""}).encode(), 400),
    (json.dumps({"model": "tiny:llama", "prompt": [1, 2]}).encode(), 400),
    (json.dumps({"model": "tiny:llama", "prompt": "a", "echo": True}).encode(), 400),
    (json.dumps({"model": "tiny:llama", "prompt": ["a"] * 9, "n": 2}).encode(), 400),
    (json.dumps({"model": "tiny:llama", "prompt": "z" * 30_000}).encode(), 413),
])
def test_malformed_completion_bodies_get_a_4xx(live, content, status):
    response = httpx.post(f"{live.url}/v1/completions", content=content,
                          headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_openai_client_sees_bad_requests_as_errors(live):
    with pytest.raises(openai.BadRequestError) as err:
        chat(live.client(), max_tokens=601)
    assert err.value.param == "max_tokens"
    for path, method in (("/v1/nowhere", "get"), ("/v1/completions", "get")):
        response = getattr(httpx, method)(f"{live.url}{path}")
        assert response.status_code in (404, 405) and "error" in response.json()


# ----------------------------------------------------------------------------- operations


def test_health_metrics_and_request_log(live):
    chat(live.client(), max_tokens=3, temperature=0)
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny:llama", "alpha", "beta"]
    metrics = httpx.get(f"{live.url}/metrics").text
    for line in ('tuneforge_requests_total{endpoint="/v1/chat/completions",status="200"}',
                 'tuneforge_request_latency_seconds_bucket{endpoint="/v1/chat/completions"',
                 'tuneforge_generated_tokens_total{model="tiny:llama"}',
                 "tuneforge_queue_depth 0.0", "tuneforge_time_to_first_token_seconds_count"):
        assert line in metrics, line
    text = live.log_path.read_text()
    assert ALICE not in text and BARE not in text
    records = [json.loads(line) for line in text.splitlines()]
    last = [r for r in records if r["endpoint"] == "/v1/chat/completions"][-1]
    assert last["key"] == "alice" and last["status"] == 200 and last["model"] == "tiny:llama"
    assert last["completion_tokens"] == 3 and last["prompt_tokens"] > 0
    assert last["latency_s"] > 0 and last["finish_reason"] == "length"
    assert "prompt" not in last  # prompt text is off by default
    bare_id = f"key-{hashlib.sha256(BARE.encode()).hexdigest()[:8]}"
    assert {r["key"] for r in records} >= {"alice", bare_id}
    assert any(r["status"] == 401 and r["key"] is None for r in records)


def test_monitor_summarises_the_log_and_flags_drift(tmp_path, capsys):
    log = tmp_path / "requests.jsonl"
    models = load_served_models("tiny:llama")
    server = LiveServer(create_app(models, ServeSettings(rate_limit=0, request_log=log), None))
    try:
        client = server.client("unused")
        for max_tokens in [2] * 16 + [12] * 16:  # outputs get longer: drift
            chat(client, max_tokens=max_tokens, temperature=0)
        with pytest.raises(openai.NotFoundError):
            chat(client, model="nope")
    finally:
        server.close()
    plot = tmp_path / "monitor.png"
    assert tuneforge_main(["monitor", str(log), "--json", "--plot", str(plot)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 33 and summary["ok"] == 32 and summary["errors_4xx"] == 1
    assert summary["completion_tokens"] == 16 * 2 + 16 * 12
    assert summary["drift"]["drifted"] and summary["drift"]["mean_change_pct"] == 500
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]
    assert sum(b["requests"] for b in summary["buckets"]) == 33
    assert plot.stat().st_size > 10_000
    assert tuneforge_main(["monitor", str(log), "--no-plot"]) == 0
    assert "DRIFTED" in capsys.readouterr().out


def test_monitor_refuses_an_empty_log(tmp_path, capsys):
    log = tmp_path / "empty.jsonl"
    log.write_text("not json\n")
    assert tuneforge_main(["monitor", str(log)]) == 2
    assert f"{log}: no requests logged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parts


def test_keys_file_and_environment(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{ALICE}\n# comment\n{BARE}\n")
    store = load_keys(keys, env={"TUNEFORGE_API_KEYS": "bob:sk-bob-0123456789"})
    assert len(store) == 3
    assert store.identify(ALICE) == "alice" and store.identify("sk-bob-0123456789") == "bob"
    assert store.identify(BARE).startswith("key-") and store.identify("nope") is None
    assert ALICE not in repr(vars(store))  # only hashes are kept
    keys.write_text("short\nalice:sk-dup-0123456789\nalice:sk-dup2-0123456789\n")
    with pytest.raises(ConfigError) as err:
        load_keys(keys, env={})
    assert f"{keys}:1" in str(err.value) and f"{keys}:3" in str(err.value)


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.acquire("k") == 0 and limiter.acquire("k") == 0
    assert limiter.acquire("k") == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.acquire("k") == 0 and limiter.acquire("k") > 0
    assert RateLimiter(per_minute=0, burst=1).acquire("k") == 0


def test_text_stream_holds_back_a_possible_stop_string():
    _, tok = load_model("tiny:llama")
    stream = TextStream(tok, stop=("END",))
    released = ""
    for token in tok("abcEN", add_special_tokens=False)["input_ids"]:
        assert not stream.push(token)
        released += stream.release()
    assert released == "abc"  # "EN" may become "END"
    assert stream.push(tok.convert_tokens_to_ids("D"))
    assert released + stream.release() == "abc" and stream.text == "abc"
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0 and ks_statistic([1, 1], [5, 5]) == 1


def test_adapter_for_another_base_is_refused(tmp_path, adapters):
    run = tmp_path / "run" / "adapter"
    run.mkdir(parents=True)
    for f in adapters["alpha"].iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "tuneforge.json").write_text(json.dumps({"base_model": "tiny:qwen2",
                                                     "method": "lora"}))
    with pytest.raises(ModelLoadError, match="trained on tiny:qwen2"):
        load_served_models("tiny:llama", [("x", str(tmp_path / "run"))])
    with pytest.raises(ConfigError, match="used twice"):
        load_served_models("tiny:llama", [("tiny:llama", str(adapters["alpha"]))])


def test_bf16_server_keeps_one_inference_copy_per_model_id(adapters):
    """In bf16 each id runs its own copy (adapter merged in): the same tokens as
    generate_batch's bf16 copy of a PeftModel with just that adapter."""
    from peft import PeftModel

    from tuneforge.data.render import render_prompt
    from tuneforge.generation import RowSettings, generate_rows

    models = load_served_models("tiny:llama", list(adapters.items()), precision="bf16")
    assert sorted(models._copies) == ["alpha", "beta", "tiny:llama"]
    prompt = render_prompt(HELLO, models.tokenizer)
    for name, folder in adapters.items():
        with models.runner(name) as (run_model, autocast):
            got = generate_rows(run_model, [prompt], [RowSettings(10)], autocast=autocast,
                                stop_token_ids=models.stop_token_ids, pad_id=models.pad_id)
        base, tok = load_model("tiny:llama")
        want = generate_batch(PeftModel.from_pretrained(base, folder), tok, [HELLO],
                              max_new_tokens=10, precision="bf16")
        assert got[0][0] == want[0].token_ids, name


@pytest.mark.parametrize("args,message", [
    (["tiny:llama"], "no API keys"),
    (["tiny:llama", "--no-auth", "--host", "0.0.0.0"], "loopback host only"),
    (["tiny:llama", "--no-auth", "--adapters", "nopath"], "expected NAME=PATH"),
    (["tiny:llama", "--no-auth", "--max-batch-size", "0"], "--max-batch-size must be"),
])
def test_serve_cli_refuses_bad_setups(args, message, capsys, monkeypatch):
    monkeypatch.delenv("TUNEFORGE_API_KEYS", raising=False)
    assert tuneforge_main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_cli_refuses_a_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert tuneforge_main(["serve", "tiny:llama", "--no-auth", "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the command


def train_tiny_run(tmp: Path) -> Path:
    """A real (3-step) LoRA run of tiny:llama, trained in this process: RUN/adapter etc."""
    from tuneforge.config import load_config
    from tuneforge.recipes.sft import run_sft

    write_jsonl(tmp / "train.jsonl", chat_records(16))
    cfg = tmp / "run.yaml"
    run = tmp / "support-bot"
    cfg.write_text(
        "model: {name: 'tiny:llama'}\nadapter: {method: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {tmp / 'train.jsonl'}}}\n"
        f"output_dir: {run}\n"
        "train: {batch_size: 4, max_steps: 3, lr: 0.003, bf16: 'false', eval_every: 0, "
        "save_every: 0, progress: false}\n")
    run_sft(load_config(str(cfg), []))
    return run


def start_serve(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`tuneforge serve ... --port 0`; (process, base URL, stderr lines read so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=ENV)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " on http://" in line:
            return proc, line.split(" on ", 1)[1].split()[0], lines
    proc.wait(30)
    raise AssertionError("".join(lines))


@pytest.mark.slow
def test_serve_command_on_a_run_streams_and_shuts_down_gracefully(tmp_path):
    run = train_tiny_run(tmp_path)
    proc, url, lines = start_serve(str(run), "--no-auth")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["support-bot", "tiny:llama"]
        messages = [{"role": "user", "content": "item 3: what colour is it?"}]
        reply = chat(client, "support-bot", messages, max_tokens=8, temperature=0)
        streamed = chat(client, "support-bot", messages, max_tokens=8, temperature=0,
                        stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        assert text == reply.choices[0].message.content
        # SIGTERM while a long stream is in flight: the stream still ends complete.
        long = chat(client, "tiny:llama", HELLO, max_tokens=400, temperature=0, stream=True,
                    stream_options={"include_usage": True})
        chunks = [next(long)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(long)
        assert chunks[-1].usage.completion_tokens == 400
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines) + proc.stderr.read()
    assert "tuneforge: stopped" in stderr and "Traceback" not in stderr
    log = [json.loads(x) for x in (run / "requests.jsonl").read_text().splitlines()]
    assert [r["status"] for r in log] == [200] * 4 and log[-1]["completion_tokens"] == 400
