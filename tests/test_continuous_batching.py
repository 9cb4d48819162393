"""Continuous batching (tuneforge/generation/engine.py): rows join the running batch at the next
decode step and leave it when done, and every row gives exactly what it gives alone through the
plain decode loop (``generate_rows``, fp32): greedy tokens whatever shares the batch, sampled
tokens from the row's own seed. The server's batcher and the RL rollouts run on this engine."""

from __future__ import annotations

import asyncio
import random

import pytest

from tuneforge.data.render import render_prompt
from tuneforge.generation import (
    DecodeEngine,
    RowSettings,
    generate_batch,
    generate_continuous,
    generate_rows,
)
from tuneforge.models.loading import load_model
from tuneforge.serve.batcher import Batcher, Job
from tuneforge.serve.engine import load_served_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only fight over cores


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny:llama")
    return model.eval(), tok


def byte_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 259) for _ in range(n)]  # tiny:llama's byte tokens


def alone(model, tok, prompt, settings, stop=None):
    """The plain loop on one row: (tokens, finish reason)."""
    return generate_rows(model, [prompt], [settings], stop_token_ids=stop or [tok.eos_token_id],
                         pad_id=tok.pad_token_id)[0]


def test_rows_joining_mid_batch_give_exactly_what_they_give_alone(tiny):
    """Rows of every length arrive at random steps into an engine of 5 slots (so some wait for
    a place), greedy and sampled mixed; the cache has to shift right for longer prompts, drop
    dead columns and grow on the way. Every row's tokens and finish reason equal its own run."""
    model, tok = tiny
    rng = random.Random(3)
    prompts = [byte_prompt(rng, rng.choice([1, 4, 30, 90, 160])) for _ in range(24)]
    settings = [RowSettings(max_new_tokens=rng.choice([1, 2, 20, 90, 240]),
                            temperature=rng.choice([0.0, 0.0, 0.8]),
                            top_p=rng.choice([1.0, 0.9]), seed=5, stream=i)
                for i in range(len(prompts))]
    want = [alone(model, tok, p, s) for p, s in zip(prompts, settings)]

    engine = DecodeEngine(model, stop_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                          max_rows=5, prefill_tokens=256)
    rows, widest, grew = [], 0, 0
    for p, s in zip(prompts, settings):
        rows.append(engine.submit(p, s))
        for _ in range(rng.choice([0, 1, 6, 25])):
            before = engine._mask.shape if engine._mask is not None else None
            engine.step()
            widest = max(widest, engine.step_rows)
            grew += before is not None and engine._mask.shape != before
    while not engine.idle:
        engine.step()
    got = [(r.tokens, r.finish_reason) for r in rows]
    assert got == want
    assert widest == 5 and grew >= 1


def test_a_row_joins_at_the_next_step_and_leaves_when_done(tiny):
    model, tok = tiny
    rng = random.Random(0)
    engine = DecodeEngine(model, stop_token_ids=[], pad_id=0, max_rows=4)
    long = engine.submit(byte_prompt(rng, 12), RowSettings(max_new_tokens=40))
    for _ in range(5):
        engine.step()
    assert len(long.tokens) == 6 and engine.running == 1  # prefill's token + 5 decode steps
    short = engine.submit(byte_prompt(rng, 30), RowSettings(max_new_tokens=3))
    assert engine.step() == [] and engine.step_rows == 2
    assert len(short.tokens) == 2 and len(long.tokens) == 7  # its prefill token + one step
    assert engine.step() == [short] and short.finish_reason == "length"
    assert engine.running == 1 and len(long.tokens) == 8
    engine.run()
    assert long.finish_reason == "length" and len(long.tokens) == 40
    assert long.tokens == alone(model, tok, long.prompt, long.settings, stop=[])[0]


def test_sampled_rows_depend_only_on_their_seed(tiny):
    model, tok = tiny
    rng = random.Random(1)
    prompt = byte_prompt(rng, 10)
    mine = RowSettings(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=7, stream=2)

    def crowd(neighbours: int) -> list[int]:
        engine = DecodeEngine(model, stop_token_ids=[], pad_id=0, max_rows=8)
        for k in range(neighbours):
            engine.submit(byte_prompt(rng, 5 + 9 * k),
                          RowSettings(max_new_tokens=10 + k, temperature=0.7, seed=k))
        engine.step()
        row = engine.submit(prompt, mine)
        engine.run()
        return row.tokens

    want = alone(model, tok, prompt, mine, stop=[])[0]
    assert crowd(0) == crowd(5) == want
    other = alone(model, tok, prompt, RowSettings(30, 1.0, 0.95, seed=8, stream=2), stop=[])[0]
    assert other != want


def test_stop_ids_per_row_callbacks_and_one_token_rows(tiny):
    model, tok = tiny
    rng = random.Random(2)
    prompts = [byte_prompt(rng, n) for n in (8, 15, 3)]
    free = alone(model, tok, prompts[0], RowSettings(12), stop=[])[0]
    engine = DecodeEngine(model, stop_token_ids=[], pad_id=0)
    seen: list[int] = []
    stopped = engine.submit(prompts[0], RowSettings(12), stop_token_ids=[free[4]])
    called = engine.submit(prompts[1], RowSettings(12),
                           on_token=lambda t: seen.append(t) or len(seen) == 3)
    single = engine.submit(prompts[2], RowSettings(1))
    first = engine.step()
    assert first == [single] and single.finish_reason == "length" and len(single.tokens) == 1
    engine.run()
    assert stopped.tokens == free[: free.index(free[4]) + 1] and stopped.finish_reason == "stop"
    assert seen == called.tokens and len(seen) == 3 and called.finish_reason == "stop"
    with pytest.raises(ValueError):
        engine.submit([], RowSettings(4))
    with pytest.raises(ValueError):
        engine.submit([5], RowSettings(0))


def test_rollouts_through_the_engine_equal_generate_batch(tiny):
    """generate_continuous (what PPO/GRPO rollouts call) keeps generate_batch's contract:
    same greedy and seeded tokens, in input order, with fewer slots than conversations."""
    model, tok = tiny
    conversations = [[{"role": "user", "content": "x" * (1 + 11 * i) + " why?"}]
                     for i in range(7)]
    for temperature in (0.0, 0.9):
        kw = {"max_new_tokens": 16, "temperature": temperature, "seed": 4, "precision": "fp32"}
        want = generate_batch(model, tok, conversations, batch_size=3, **kw)
        got = generate_continuous(model, tok, conversations, max_rows=3, **kw)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [(r.text, r.finish_reason, r.prompt_tokens) for r in got] == [
            (r.text, r.finish_reason, r.prompt_tokens) for r in want]
    assert generate_continuous(model, tok, [], precision="fp32") == []
    assert render_prompt(conversations[0], tok) == got[0].prompt_ids


def test_batcher_lets_requests_join_and_leave_a_running_batch():
    """A long request is running; short ones (two model ids' worth, adapters never mixed) join
    it, finish and are answered while it still runs, with the tokens they give alone."""
    served = load_served_models("tiny:llama")
    tok = served.tokenizer
    batcher = Batcher(served, max_batch_size=4, batch_wait_s=0.0)
    batcher.start()
    rng = random.Random(4)
    shorts = [byte_prompt(rng, 5 + 13 * i) for i in range(6)]
    want = [tok.decode(alone(served.model, tok, p, RowSettings(6 + i))[0],
                       skip_special_tokens=True) for i, p in enumerate(shorts)]

    async def scenario():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def job(prompt, n, index, stream=False):
            return Job(prompt, RowSettings(max_new_tokens=n), "tiny:llama", index=index,
                       stream=stream, events=events, loop=loop)

        blocker = job(byte_prompt(rng, 10), 900, 99, stream=True)
        batcher.submit([blocker])
        assert (await events.get())[:2] == ("delta", 99)  # it is running
        batcher.submit([job(p, 6 + i, i) for i, p in enumerate(shorts)])
        done: dict[int, str] = {}
        while len(done) < len(shorts):
            kind, index, payload = await events.get()
            assert index != 99 or kind == "delta", "the long request ended first"
            if kind == "done":
                done[index] = payload.text
        blocker.cancelled = True  # the client leaves: the row ends at its next token
        while True:
            kind, index, payload = await events.get()
            if kind == "done":
                return done, payload

    try:
        done, last = asyncio.run(scenario())
    finally:
        batcher.stop(60)
    assert [done[i] for i in range(len(shorts))] == want
    assert last.finish_reason == "stop" and last.completion_tokens < 900
    assert max(batcher.batch_sizes) == 4  # 3 short rows beside the long one at a time
    assert batcher.running == 0 and batcher.queue_depth == 0


def test_a_failed_step_answers_its_rows_with_an_error_and_the_batcher_goes_on():
    """A token id outside the vocabulary makes the prefill fail: every row of that engine gets
    an error event (none is left waiting), and the next request is served as usual."""
    served = load_served_models("tiny:llama")
    batcher = Batcher(served, max_batch_size=4, batch_wait_s=0.05)
    batcher.start()

    async def scenario():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(prompt, RowSettings(max_new_tokens=4), "tiny:llama", index=i, events=events,
                    loop=loop) for i, prompt in enumerate([[5, 6, 7], [5, 10**6]])]
        batcher.submit(jobs)
        failed = sorted([(await events.get())[:2] for _ in jobs])
        batcher.submit([Job([5, 6, 7], RowSettings(max_new_tokens=4), "tiny:llama", index=7,
                            events=events, loop=loop)])
        return failed, await events.get()

    try:
        failed, after = asyncio.run(scenario())
    finally:
        batcher.stop(60)
    assert failed == [("error", 0), ("error", 1)]
    assert after[:2] == ("done", 7) and after[2].completion_tokens == 4
