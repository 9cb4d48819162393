"""`tuneforge serve` against what a careless or hostile client sends: deeply nested and oversized
bodies, key guessing, lone surrogates; what the request log keeps of errors; and `tuneforge
monitor` keeping non-generation requests out of latency and drift. Real uvicorn servers on
loopback with the tiny model, as in test_serve."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from fastapi import APIRouter, Request
from test_serve import LiveServer

from tuneforge.cli import main as tuneforge_main
from tuneforge.errors import ConfigError
from tuneforge.serve.app import ServeSettings, create_app
from tuneforge.serve.auth import KeyStore, RateLimiter, retry_after_seconds
from tuneforge.serve.engine import load_served_models
from tuneforge.serve.guard import MAX_JSON_DEPTH, json_depth
from tuneforge.serve.monitor import output_length_drift, summarise

KEY = "sk-hardening-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEEP = b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"  # about 2 KB


@pytest.fixture(scope="module")
def models():
    return load_served_models("tiny:llama")


def later_router() -> APIRouter:
    """Routes of the kind a later router adds: FastAPI parses one body, another reads it raw,
    and one fails with an unexpected exception (on a path the request log covers)."""
    router = APIRouter()

    @router.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return {"keys": sorted(body)}

    @router.post("/v1/upload")
    async def upload(request: Request) -> dict:
        return {"bytes": sum([len(chunk) async for chunk in request.stream()])}

    @router.post("/v1/models")
    async def broken() -> dict:
        raise RuntimeError("the jobs store is unreachable")

    @router.get("/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict:
        return {"id": thing_id}

    @router.get("/v1/files/{name:path}/content")
    async def nested(name: str) -> dict:
        return {"name": name}

    return router


@pytest.fixture(scope="module")
def live(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    settings = ServeSettings(rate_limit=0, max_request_bytes=20_000, max_upload_bytes=50_000,
                             request_log=log, auth_fail_limit=0)
    app = create_app(models, settings, KeyStore([("ops", KEY, "test")]))
    app.include_router(later_router())  # after create_app, as the jobs API does
    server = LiveServer(app)
    server.log_path = log
    yield server
    server.close()


def logged(server, endpoint: str, at_least: int = 0) -> list[dict]:
    """The log's records of ``endpoint``, once it holds ``at_least`` of them (a request is
    logged when its last byte has gone, so the client may read the answer a moment before)."""
    deadline = time.monotonic() + 10
    while True:
        lines = server.log_path.read_text().splitlines() if server.log_path.exists() else []
        records = [r for r in map(json.loads, lines) if r["endpoint"] == endpoint]
        if len(records) >= at_least or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ----------------------------------------------------------------------------- bodies


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"]["}') == 3
    assert json_depth(b"") == 0 and json_depth(b'"unterminated [[[') == 0
    assert json_depth(DEEP) == 1001


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/echo"])
def test_deeply_nested_json_is_a_400_on_every_endpoint(live, path):
    with httpx.Client(base_url=live.url, headers=AUTH) as client:
        error = assert_openai_error(client.post(path, content=DEEP), 400)
        assert str(MAX_JSON_DEPTH) in error["message"] and error["code"] == "invalid_json"
        # the connection survives: the next request on it is answered
        assert client.get("/health").json()["status"] == "ok"
    ok = {"model": "tiny:llama", "metadata": {"x": [[[[1]]]]}}  # modest nesting is fine
    assert httpx.post(f"{live.url}/v1/echo", json=ok).json() == {"keys": ["metadata", "model"]}


def test_bodies_over_the_limit_are_a_413_with_or_without_a_length(live):
    big = b'{"model": "tiny:llama", "prompt": "' + b"z" * 25_000 + b'"}'
    for path in ("/v1/completions", "/v1/echo"):
        error = assert_openai_error(httpx.post(f"{live.url}{path}", content=big, headers=AUTH),
                                    413)
        assert "20000 bytes" in error["message"] and error["code"] == "request_too_large"
        chunked = httpx.post(f"{live.url}{path}", headers=AUTH,
                             content=iter([big[:10_000], big[10_000:]]))  # no Content-Length
        assert_openai_error(chunked, 413)
    # multipart uploads have their own, larger limit, and are streamed through
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    upload = httpx.post(f"{live.url}/v1/upload", content=b"u" * 30_000, headers=form)
    assert upload.json() == {"bytes": 30_000}
    assert_openai_error(httpx.post(f"{live.url}/v1/upload", content=b"u" * 60_000, headers=form),
                        413)
    chunks = iter([b"u" * 20_000] * 3)
    assert_openai_error(httpx.post(f"{live.url}/v1/upload", content=chunks, headers=form), 413)


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", b'{"model": "tiny:llama", "messages": [{"role": "user", '
                             b'"content": "hi \\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "tiny:llama", "messages": [{"role": "user", "content": '
                             b'[{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", b'{"model": "tiny:llama", "prompt": ["ok", "\\ud83d"]}', "prompt[1]"),
])
def test_lone_surrogates_are_a_400_naming_the_field(live, path, body, param):
    error = assert_openai_error(httpx.post(f"{live.url}{path}", content=body, headers=AUTH), 400)
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: holds a lone UTF-16 surrogate")
    assert "not valid Unicode" in error["message"]


def test_a_surrogate_pair_is_ordinary_text(live):
    body = (b'{"model": "tiny:llama", "max_tokens": 2, "messages": [{"role": "user", '
            b'"content": "smile \\ud83d\\ude00"}]}')
    reply = httpx.post(f"{live.url}/v1/chat/completions", content=body, headers=AUTH)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


# ----------------------------------------------------------------------------- the request log


def test_the_request_log_keeps_error_codes_and_messages(live):
    response = httpx.post(f"{live.url}/v1/models", headers=AUTH)
    error = assert_openai_error(response, 500)
    assert error["code"] == "internal_error"
    [crash] = logged(live, "/v1/models", at_least=1)
    assert crash["status"] == 500 and crash["error"] == "internal_error"
    assert crash["error_message"] == "RuntimeError: the jobs store is unreachable"

    before = len(logged(live, "/v1/chat/completions"))
    deep = httpx.post(f"{live.url}/v1/chat/completions", content=DEEP, headers=AUTH)
    chats = logged(live, "/v1/chat/completions", at_least=before + 1)
    # an earlier test's generation may still be finishing (and logging) beside this request
    [bad] = [r for r in chats[before:] if r["status"] != 200]
    assert bad["status"] == 400 and bad["error"] == "invalid_json"
    assert bad["error_message"] == deep.json()["error"]["message"]
    assert all("error" not in r for r in chats if r["status"] == 200)


def test_routes_of_later_routers_are_logged_under_their_path_template(live):
    for thing in ("a1", "b2"):
        assert httpx.get(f"{live.url}/v1/things/{thing}", headers=AUTH).json() == {"id": thing}
    assert len(logged(live, "/v1/things/{thing_id}", at_least=2)) == 2  # ids never become endpoint names
    assert httpx.get(f"{live.url}/v1/files/runs/a/b/content", headers=AUTH).json() == {
        "name": "runs/a/b"}
    assert len(logged(live, "/v1/files/{name}/content", at_least=1)) == 1
    metrics = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert 'endpoint="/v1/things/{thing_id}"' in metrics and "/v1/things/a1" not in metrics


# ----------------------------------------------------------------------------- key guessing


def test_failed_keys_are_throttled_per_address(models, tmp_path):
    log = tmp_path / "requests.jsonl"
    settings = ServeSettings(rate_limit=0, auth_fail_limit=6, auth_fail_burst=5, request_log=log)
    server = LiveServer(create_app(models, settings, KeyStore([("ops", KEY, "test")])))
    other = httpx.Client(base_url=server.url, headers=AUTH,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    try:
        with httpx.Client(base_url=server.url) as guesser:
            answers = [guesser.get("/v1/models", headers={"Authorization": f"Bearer sk-{i:012}"})
                       for i in range(40)]
            assert [r.status_code for r in answers] == [401] * 5 + [429] * 35
            error = assert_openai_error(answers[-1], 429)
            assert error["code"] == "too_many_failed_authentications"
            wait = int(answers[-1].headers["retry-after"])
            assert 1 <= wait <= 10 and f"retry in {wait} s" in error["message"]
            # from the throttled address even the right key is not looked at
            assert guesser.get("/v1/models", headers=AUTH).status_code == 429
            assert guesser.get("/health").status_code == 200  # no key needed, not throttled
        # another address is not slowed: its right key works, its wrong keys get plain 401s
        assert other.get("/v1/models").status_code == 200
        assert other.get("/v1/models", headers={"Authorization": "Bearer sk-nope-0000"}
                         ).status_code == 401
        assert other.get("/v1/models").status_code == 200
    finally:
        other.close()
        server.close()
    codes = [r.get("error") for r in map(json.loads, log.read_text().splitlines())]
    assert codes.count("too_many_failed_authentications") == 36
    assert codes.count("invalid_api_key") == 6


def test_failure_buckets_are_forgotten_once_refilled():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0], max_buckets=3)
    for address in ("a", "b", "c"):
        limiter.acquire(address)
    assert limiter.wait("a") == 0 and limiter.wait("never-seen") == 0
    limiter.acquire("a")
    assert limiter.wait("a") == pytest.approx(1.0)  # wait() takes nothing
    now[0] = 1.5  # b and c have refilled, a has not
    limiter.acquire("d")
    assert sorted(limiter._buckets) == ["a", "d"]
    assert limiter.wait("a") == 0


@pytest.mark.parametrize("field,value", [("auth_fail_limit", -1), ("auth_fail_burst", 0),
                                         ("max_upload_bytes", 10)])
def test_throttle_and_upload_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be"):
        ServeSettings(**{field: value}).check()


# ----------------------------------------------------------------------------- 429s


def test_a_429_says_the_same_wait_as_its_retry_after(models):
    """600 a minute is one every 0.1 s: the second request waits about 0.1 s, which the
    message once gave as "0.1 s" (or "0.0 s") next to ``Retry-After: 1``."""
    settings = ServeSettings(rate_limit=600, rate_burst=1)
    server = LiveServer(create_app(models, settings, KeyStore([("ops", KEY, "test")])))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            answers = [client.get("/v1/models") for _ in range(3)]
    finally:
        server.close()
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]
    for response in refused:
        seconds = re.search(r"retry in (\S+) s", response.json()["error"]["message"]).group(1)
        assert seconds == response.headers["retry-after"] == "1"
    assert [retry_after_seconds(s) for s in (0.0, 0.04, 1.0, 1.01, 9.5)] == [1, 1, 1, 2, 10]


# ----------------------------------------------------------------------------- monitor


def drift_log(path) -> list[dict]:
    """Chat outputs grow 85% (10 -> 18.5 tokens), completions stay at 16, and a client starts
    polling /v1/models (instant, no output) in the second half."""
    records = []

    def add(ts, endpoint, tokens, latency):
        records.append({"ts": 1_800_000_000 + ts, "key": "ops", "endpoint": endpoint,
                        "model": "tiny:llama", "status": 200, "prompt_tokens": 9,
                        "completion_tokens": tokens, "latency_s": latency,
                        "ttft_s": 0.05 if tokens else None, "finish_reason": "stop"})

    for i in range(80):
        add(i, "/v1/chat/completions", 10 if i < 40 else 18 + i % 2, 0.5)
        add(i + 0.5, "/v1/completions", 16, 0.8)
    for i in range(160):
        add(40 + i / 4 + 0.25, "/v1/models", 0, 0.001)
    records.sort(key=lambda r: r["ts"])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_monitor_judges_latency_and_drift_on_generation_requests_per_endpoint(tmp_path, capsys):
    log = tmp_path / "requests.jsonl"
    records = drift_log(log)
    # What mixing every successful request gave: outputs "shrank", replies took a millisecond.
    mixed = output_length_drift(records)
    assert mixed["drifted"] and mixed["mean_change_pct"] < -40

    assert tuneforge_main(["monitor", str(log), "--json", "--no-plot"]) == 0
    summary = json.loads(capsys.readouterr().out)
    chat = summary["by_endpoint"]["/v1/chat/completions"]["drift"]
    completions = summary["by_endpoint"]["/v1/completions"]["drift"]
    assert chat["drifted"] and chat["mean_change_pct"] == pytest.approx(85)
    assert not completions["drifted"] and completions["mean_change_pct"] == 0
    assert summary["drift"]["endpoint"] == "/v1/chat/completions" and summary["drift"]["drifted"]
    assert "drift" not in summary["by_endpoint"]["/v1/models"]
    assert 0.5 <= summary["latency_s"]["p50"] <= 0.8  # generation requests only
    assert summary["by_endpoint"]["/v1/models"]["latency_s"]["p50"] == 0.001
    means = [b["completion_tokens_mean"] for b in summary["buckets"]]
    assert min(m for m in means if m is not None) >= 10  # no zero-token /v1/models in them

    assert tuneforge_main(["monitor", str(log), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "drift        /v1/chat/completions: output length DRIFTED: mean 10.0 -> 18.5" in text
    assert "drift        /v1/completions: output length no significant drift" in text
    assert summarise(records[:3])["drift"]["judged"] is False  # too few to judge
