"""The JSONL request log, one line per API request, for monitoring a deployment
(``tuneforge monitor LOG`` summarises it).

Each line: ``time`` (ISO 8601, UTC), ``ts`` (Unix seconds), ``key`` (key id, never the key),
``endpoint``, ``model``, ``status``, ``prompt_tokens``, ``completion_tokens``, ``latency_s``,
``ttft_s`` (time to the first generated token), ``stream``, ``choices``, ``finish_reason``
(``"stop"``/``"length"``, ``"cancelled"`` when the client left mid-stream, or a list with several
choices) and, for errors, ``error`` (the OpenAI error code or type) and ``error_message`` (the
message the client got; for an unexpected exception, its type and message). With
``--log-prompts`` also ``prompt`` and ``completion`` texts; off by default, since they may hold
personal data.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class RequestRecord:
    """What a request did, filled in as it goes (handler, batcher events, middleware)."""

    endpoint: str
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    key: str | None = None
    model: str | None = None
    status: int = 500
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: int = 0
    stream: bool = False
    ttft_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    error_message: str | None = None
    prompt: object = None
    completion: object = None

    def to_json(self, latency_s: float, *, with_text: bool) -> dict:
        finish = self.finish_reasons[0] if len(self.finish_reasons) == 1 else (
            self.finish_reasons or None)
        out = {
            "time": datetime.fromtimestamp(self.ts, timezone.utc).isoformat(timespec="milliseconds"),
            "ts": round(self.ts, 3), "key": self.key, "endpoint": self.endpoint,
            "model": self.model, "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "latency_s": round(latency_s, 4),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "stream": self.stream, "choices": self.choices, "finish_reason": finish,
        }
        if self.error is not None:
            out["error"], out["error_message"] = self.error, self.error_message
        if with_text:
            out["prompt"], out["completion"] = self.prompt, self.completion
        return out


class RequestLog:
    """Appends records to a JSONL file, one flushed line each (readable while the server runs)."""

    def __init__(self, path: str | Path, *, with_text: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.with_text = with_text
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: RequestRecord, latency_s: float) -> None:
        line = json.dumps(record.to_json(latency_s, with_text=self.with_text), ensure_ascii=False)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
