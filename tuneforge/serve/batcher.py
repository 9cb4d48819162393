"""Continuous batching: a request joins the running batch at the next decode step and leaves it
as soon as it is done.

The HTTP handlers run on the event loop and :meth:`Batcher.submit` jobs (one per choice of a
request); a single worker thread owns the model. It keeps one
:class:`~tuneforge.generation.engine.DecodeEngine` per model id (a batch never mixes adapters)
and moves queued jobs into their model's engine while it has room (``max_batch_size`` rows),
oldest first. Each turn it steps the engines that have rows, one model id at a time with its
adapter active: an engine prefills its newcomers, runs one decode step over all its rows (each
with its own max_tokens, temperature, top_p and seed) and hands back the rows that finished,
whose requests are answered at once. With several model ids busy the worker switches between
them every ``turn_steps`` steps. When everything is idle, the first job waits ``batch_wait_s``
for company, so that requests arriving together share their prefill.

Each job reports back to the event loop through ``loop.call_soon_threadsafe``: text deltas (when
it streams), then one ``done`` (or ``error``) event. Greedy rows give the same tokens whatever
else shares the batch (fp32), and a sampled row's tokens depend only on its seed.
``batch_sizes`` (and the ``tuneforge_batch_size`` histogram) count the rows of each step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from tuneforge.generation import RowSettings
from tuneforge.generation.engine import DecodeEngine
from tuneforge.serve.engine import ServedModels

log = logging.getLogger("tuneforge.serve")


class QueueFull(Exception):
    """More jobs are waiting than the server accepts; the request should be retried later."""


class TextStream:
    """The text of a row as its tokens come: stop strings cut it, and only text that can no
    longer change (no partial UTF-8 character, no possible start of a stop string) is released.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once one appeared)
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add a token; True when a stop string has appeared (the row should end)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return False
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
        return self.stopped

    def release(self) -> str:
        """New text that is safe to send now."""
        end = len(self.text)
        if not self.stopped:  # hold back a tail that may yet become a stop string
            end -= max((k for s in self.stop for k in range(1, len(s))
                        if self.text.endswith(s[:k])), default=0)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> str:
        """The rest of the text, once the row is done (a trailing partial character included)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass
class JobResult:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Job:
    """One choice of one request: a row of some batch.

    ``events`` receives ``("delta", index, text)`` (streaming only), then ``("done", index,
    JobResult)`` or ``("error", index, message)``, on the event loop ``loop``.
    """

    prompt_ids: list[int]
    settings: RowSettings
    model_id: str
    index: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False  # set by the handler when the client has gone
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _text: TextStream | None = None

    def post(self, *event) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


class Batcher:
    """The worker thread, its queue and engines. ``start()`` once, ``submit()`` from the event
    loop, ``stop()`` at shutdown (queued and running jobs finish first)."""

    def __init__(self, models: ServedModels, *, max_batch_size: int = 16,
                 batch_wait_s: float = 0.005, max_queue: int = 256, metrics=None,
                 turn_steps: int = 8) -> None:
        self.models = models
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_s, max_queue
        self.metrics = metrics
        self.turn_steps = turn_steps
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._engines: dict[str, DecodeEngine] = {}  # worker thread only
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a place in a running batch."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows being generated now, over all model ids."""
        return self._running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tuneforge-batcher", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (QueueFull)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already")
            self._queue.extend(jobs)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------- worker thread

    def _work(self) -> None:
        while True:
            if not self._wait_for_work():
                return
            for model_id in [m for m, e in self._engines.items() if not e.idle]:
                self._turn(model_id)
            self._running = sum(e.running + len(e.waiting) for e in self._engines.values())

    def _wait_for_work(self) -> bool:
        """Block until some engine has rows or jobs are queued; False once stopping with
        nothing left. Moves queued jobs into their engines."""
        with self._cond:
            while not self._queue and self._all_idle() and not self._stopping:
                self._cond.wait()
            if self._all_idle():
                # Concurrent requests arrive a few milliseconds apart: wait that long for company.
                deadline = time.perf_counter() + self.batch_wait_s
                while 0 < len(self._queue) < self.max_batch_size and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._take_queued()
            return not (self._stopping and not self._queue and self._all_idle())

    def _all_idle(self) -> bool:
        return all(e.idle for e in self._engines.values())

    def _take_queued(self) -> None:
        """Move queued jobs (oldest first) into their model's engine while it has room; drop
        the ones whose client has gone. Called with ``_cond`` held."""
        rest: collections.deque[Job] = collections.deque()
        for job in self._queue:
            if job.cancelled:
                continue
            engine = self._engine(job.model_id)
            if engine.room == 0:
                rest.append(job)
                continue
            if job.stream or job.stop:
                job._text = TextStream(self.models.tokenizer, job.stop)
            engine.submit(job.prompt_ids, job.settings, tag=job,
                          on_token=lambda token, job=job: self._on_token(job, token))
        self._queue = rest

    def _engine(self, model_id: str) -> DecodeEngine:
        engine = self._engines.get(model_id)
        if engine is None:
            # the model is bound at each turn (the adapter's runner); None until then
            engine = self._engines[model_id] = DecodeEngine(
                None, stop_token_ids=self.models.stop_token_ids, pad_id=self.models.pad_id,
                max_rows=self.max_batch_size)
        return engine

    def _turn(self, model_id: str) -> None:
        """Up to ``turn_steps`` steps of one model id's engine (more while no other id has
        work), taking in newly queued jobs between steps."""
        engine = self._engines[model_id]
        try:
            with self.models.runner(model_id) as (run_model, autocast):
                engine.model, engine.autocast = run_model, autocast
                steps = 0
                while not engine.idle:
                    finished = engine.step()
                    steps += 1
                    self._count(engine.step_rows)
                    for row in finished:
                        self._finish(row.tag, row.tokens, row.finish_reason)
                    with self._cond:
                        self._take_queued()
                    others = any(not e.idle for m, e in self._engines.items() if m != model_id)
                    if steps >= self.turn_steps and (others or self._stopping):
                        break
        except Exception as err:  # noqa: BLE001 - a failed batch must not stop the server
            rows = engine.abort()
            log.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                row.tag.post("error", row.tag.index, f"generation failed: {type(err).__name__}")

    def _count(self, rows: int) -> None:
        self._running = sum(e.running for e in self._engines.values())
        if rows:
            self.batch_sizes[rows] += 1
            if self.metrics is not None:
                self.metrics.batch_size.observe(rows)

    def _on_token(self, job: Job, token_id: int) -> bool:
        """Per generated token of ``job`` (worker thread): stream text, spot stop strings."""
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if job.cancelled:
            return True
        if job._text is None:
            return False
        stopped = job._text.push(token_id)
        if job.stream:
            delta = job._text.release()
            if delta:
                job.post("delta", job.index, delta)
        return stopped

    def _finish(self, job: Job, ids: list[int], reason: str) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if job._text is not None:
            rest = job._text.finish()
            if job.stream and rest:
                job.post("delta", job.index, rest)
            text = job._text.text
        else:
            text = self.models.tokenizer.decode(ids, skip_special_tokens=True)
        job.post("done", job.index, JobResult(text, reason, len(ids)))
