"""PPO and GRPO steps split into generation, scoring and update; rollout decoding against the
serve engine's at the same batch size.

    python -m bench.rl                                   # GRPO, built-in model, 6 steps (1 warm-up)
    python -m bench.rl --recipe ppo
    python -m bench.rl --recipes grpo,ppo --steps 3 --warmup 1 --max-new-tokens 16   # a smoke run

Each recipe runs for real (``run_recipe``: LoRA r 16 on ``--model``, ``--prompts`` prompts a
step from bench/generate.py's list, ``--group`` completions each, reward ``length``,
``rl.max_new_tokens`` = ``--max-new-tokens``, temperature 1, generation precision
``--precision``), with timers around the parts of a step:

- ``generation``: :func:`tuneforge.generation.engine.generate_continuous`, which the rollouts
  call (all rows of the step submitted to one decode engine, ``prompts x group`` rows at once);
  ``copy`` is the part of it spent making the bf16 inference copy
  (:func:`~tuneforge.generation.inference_model`: rebuilt after every optimizer step);
- ``scoring``: the reward function (``reward``), and the forwards that give the policy's (and
  PPO's values') and the reference's log-probs of the completions (``score_tokens``,
  ``Reference.token_logps``; PPO's minibatch passes included);
- ``update``: the rest of the step: backward passes, optimizer, GAE and bookkeeping.

A step's time is between two ``RunLifecycle.step_done`` calls (the first from the start of
training); the first ``--warmup`` steps are not counted. ``rollout tok/s`` is completion tokens
(stop tokens included) over generation seconds; ``decode tok/s`` leaves the copy out.

Then the serve engine: the run's output served as a server would
(:func:`~tuneforge.serve.engine.load_served_models` + :class:`~tuneforge.serve.batcher.Batcher`,
no HTTP) with ``--max-batch-size`` = rows per step, given the same rows at once (same prompts,
group, max tokens, temperature, a seed per row), ``--serve-repeats`` times after a warm-up;
``serve tok/s`` = completion tokens / seconds from submission to the last answer. ``x serve``
is rollout tok/s over it. Writes ``runs/bench/rl-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT, format_table, machine_info, versions, write_results

COLUMNS = [
    ("contender", "recipe", ""),
    ("rows", "rows/step", "d"),
    ("step_s", "s/step", ".2f"),
    ("generation_s", "generation s", ".2f"),
    ("copy_s", "(copy s)", ".2f"),
    ("scoring_s", "scoring s", ".2f"),
    ("reward_s", "(reward s)", ".3f"),
    ("update_s", "update s", ".2f"),
    ("completion_tokens", "tokens/step", ".0f"),
    ("tokens_per_s", "rollout tok/s", ".1f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"),
    ("serve_tokens_per_s", "serve tok/s", ".1f"),
    ("vs_serve", "x serve", ".2f"),
]
PHASES = ("generation", "copy", "reward", "scoring")


class Timers:
    """Seconds per phase, and the totals at each finished step."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0
        self.rows = 0
        self.steps: list[dict] = []  # cumulative totals and the clock at each step_done
        self.start = time.perf_counter()

    def wrap(self, phase: str, fn, count=None):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.total[phase] += time.perf_counter() - t
            if count is not None:
                count(out)
            return out

        return timed

    def mark(self) -> None:
        self.steps.append({"at": time.perf_counter(), **self.total, "tokens": self.tokens,
                           "rows": self.rows})


@contextmanager
def instrumented(timers: Timers):
    """Timers around the step's parts (see the module docstring), undone afterwards."""
    from tuneforge.generation import engine as engine_module
    from tuneforge.recipes import grpo, ppo
    from tuneforge.train import lifecycle, rollouts, scoring

    def count(results) -> None:
        timers.tokens += sum(r.num_new_tokens for r in results)
        timers.rows += len(results)

    step_done = lifecycle.RunLifecycle.step_done

    def marked(self, *args, **kwargs):
        out = step_done(self, *args, **kwargs)
        timers.mark()
        return out

    patches = [
        (rollouts, "generate_continuous", timers.wrap("generation", rollouts.generate_continuous,
                                                      count)),
        (engine_module, "inference_model", timers.wrap("copy", engine_module.inference_model)),
        (rollouts.Sampler, "score", timers.wrap("reward", rollouts.Sampler.score)),
        (grpo, "score_tokens", timers.wrap("scoring", grpo.score_tokens)),
        (ppo, "score_tokens", timers.wrap("scoring", ppo.score_tokens)),
        (scoring.Reference, "token_logps", timers.wrap("scoring", scoring.Reference.token_logps)),
        (lifecycle.RunLifecycle, "step_done", marked),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def prompt_file(folder: Path, n: int) -> Path:
    from bench.generate import PROMPTS

    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
                            + "\n" for i in range(n)))
    return path


def run_recipe_timed(args, recipe: str, folder: Path) -> tuple[dict, Path]:
    from tuneforge.config import load_config
    from tuneforge.recipes import run_recipe

    prompts = prompt_file(folder, args.prompts * args.steps)
    config = load_config(None, [
        f"recipe={recipe}", f"output_dir={folder / recipe}", f"model.name={args.model}",
        "adapter.method=lora", "adapter.r=16", "adapter.alpha=32",
        f"data.train={prompts}", "rl.reward=length", f"rl.max_new_tokens={args.max_new_tokens}",
        f"rl.num_generations={args.group}", "rl.temperature=1.0",
        f"rl.generation_precision={args.precision}", f"train.batch_size={args.prompts}",
        f"train.max_steps={args.steps}", "train.progress=false", "train.save_every=0",
        "train.eval_every=0", "train.warmup_steps=0", "train.lr=1e-5",
    ])
    timers = Timers()
    print(f"{recipe}: {args.steps} steps of {args.prompts} prompts x {args.group}",
          file=sys.stderr, flush=True)
    with instrumented(timers):
        run_recipe(config, overwrite=True)
    marks = [{"at": timers.start, **dict.fromkeys(PHASES, 0.0), "tokens": 0, "rows": 0},
             *timers.steps]
    per_step = []
    for before, after in zip(marks, marks[1:]):
        step = {k: after[k] - before[k] for k in (*PHASES, "tokens", "rows")}
        step["step_s"] = after["at"] - before["at"]
        per_step.append(step)
    timed = per_step[args.warmup:] or per_step[-1:]
    n = len(timed)

    def mean(key):
        return sum(s[key] for s in timed) / n

    generation, tokens = mean("generation"), mean("tokens")
    row = {
        "contender": recipe, "rows": round(mean("rows")), "timed_steps": n,
        "step_s": mean("step_s"), "generation_s": generation, "copy_s": mean("copy"),
        "reward_s": mean("reward"), "scoring_s": mean("scoring") + mean("reward"),
        "update_s": mean("step_s") - generation - mean("scoring") - mean("reward"),
        "completion_tokens": tokens, "tokens_per_s": tokens / generation if generation else None,
        "decode_tokens_per_s": (tokens / (generation - mean("copy"))
                                if generation > mean("copy") else None),
        "per_step": per_step,
    }
    return row, folder / recipe


def serve_throughput(args, run_dir: Path, rows: int) -> dict:
    """The served run through the Batcher: ``rows`` sampled rows submitted at once."""
    from bench.generate import PROMPTS
    from tuneforge.data.render import render_prompt
    from tuneforge.generation import RowSettings
    from tuneforge.serve.batcher import Batcher, Job
    from tuneforge.serve.engine import load_served_models

    served = load_served_models(str(run_dir), precision=args.precision)
    model_id = served.ids[0]
    batcher = Batcher(served, max_batch_size=rows, batch_wait_s=0.0, max_queue=4 * rows)
    batcher.start()
    prompts = [render_prompt([{"role": "user", "content": PROMPTS[(i // args.group) % len(PROMPTS)]}],
                             served.tokenizer) for i in range(rows)]

    async def once(seed: int) -> tuple[int, float]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(p, RowSettings(args.max_new_tokens, 1.0, 1.0, seed=seed + i), model_id,
                    index=i, events=events, loop=loop) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        batcher.submit(jobs)
        tokens = 0
        for _ in jobs:
            kind, _, payload = await events.get()
            if kind != "done":
                raise SystemExit(f"serve engine failed: {payload}")
            tokens += payload.completion_tokens
        return tokens, time.perf_counter() - start

    try:
        asyncio.run(once(0))  # warm-up
        runs = [asyncio.run(once(1000 * (k + 1))) for k in range(args.serve_repeats)]
    finally:
        batcher.stop(120)
    tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
    return {"serve_tokens_per_s": tokens / seconds, "serve_tokens": tokens / len(runs),
            "serve_seconds": seconds / len(runs), "serve_batch": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", "--recipe", default="grpo", help="grpo, ppo or both (comma)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--serve-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    recipes = [r for r in args.recipes.split(",") if r]
    if set(recipes) - {"grpo", "ppo"}:
        ap.error("--recipes: grpo and/or ppo")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))

    from tuneforge.serve.engine import in_own_thread

    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-rl-bench-") as tmp:
        for recipe in recipes:
            # trained in a thread that ends: the main thread keeps no OpenMP team, which would
            # slow the serve engine's batcher thread measured next (bench/README.md, serving)
            row, run_dir = in_own_thread(run_recipe_timed, args, recipe, Path(tmp))
            print(f"{recipe}: serve engine at {row['rows']} rows", file=sys.stderr, flush=True)
            row.update(serve_throughput(args, run_dir, row["rows"]))
            row["vs_serve"] = (row["tokens_per_s"] / row["serve_tokens_per_s"]
                               if row["tokens_per_s"] else None)
            rows.append(row)
    print(format_table(rows, COLUMNS))
    path = write_results("rl", {"bench": "rl", "rows": rows, "settings": vars(args),
                                "machine": machine_info(),
                                "versions": versions("torch", "transformers", "peft")})
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
