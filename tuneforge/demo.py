"""`tuneforge demo`: the whole story on the built-in model, in a few minutes on a laptop CPU.

SmolLM2-135M-Instruct is taught to route Northwind Home's customer-support tickets to the right
department (and draft a short reply) with a LoRA adapter trained on the shipped dataset. Then
`tuneforge eval`'s own evaluation (:func:`tuneforge.eval.evaluate.run_eval`) scores the base model
zero-shot, the base model with a few solved training tickets in its prompt, and the tuned model
the same way on the held-out test split: each department name is scored by the model's
likelihood after the ticket, and the most likely one is the prediction.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError

DEMO_MODEL = "builtin:smollm2-135m-instruct"
DEMO_FEW_SHOT = 3  # solved training tickets before each question for the base few-shot baseline
SAMPLES = 3  # generated replies per system, side by side in the report

# The same settings as configs/demo-support-lora.yaml (a test keeps the two equal), held here
# too so that `tuneforge demo` works from an installed package.
DEMO_CONFIG = {
    "model": {"name": DEMO_MODEL},
    "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
    "data": {"max_length": 512},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.05, "eval_every": 10,
              "save_every": 25, "weight_decay": 0.0},
}


def find_demo_data() -> Path:
    """examples/data/support in the current folder or in the source tree tuneforge runs from."""
    here = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), here):
        folder = root / "examples" / "data" / "support"
        if (folder / "train.jsonl").is_file():
            return folder
    raise TuneforgeError(
        "the demo dataset (examples/data/support) was not found; run the demo from the "
        "tuneforge repository, or create it with: python scripts/make_demo_data.py"
    )


def demo_config(data: Path, output_dir: str, epochs: float | None, max_steps: int | None):
    overrides = [f"output_dir={output_dir}", f"data.train={data / 'train.jsonl'}",
                 f"data.validation={data / 'validation.jsonl'}", f"data.test={data / 'test.jsonl'}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    return load_config(None, overrides, base=DEMO_CONFIG)


def run_demo(output_dir: str = "runs/demo", *, epochs: float | None = None,
             max_steps: int | None = None, test_limit: int | None = None,
             few_shot: int = DEMO_FEW_SHOT) -> dict:
    from tuneforge.recipes.sft import run_sft

    t0 = time.perf_counter()
    data = find_demo_data()
    config = demo_config(data, output_dir, epochs, max_steps)
    say(f"1/3 fine-tuning {DEMO_MODEL} with LoRA on {data}/train.jsonl -> {config.output_dir}")
    summary = run_sft(config, overwrite=True)
    t_train = time.perf_counter() - t0
    result = evaluate_demo(Path(config.output_dir), data, few_shot=few_shot, test_limit=test_limit)
    result.update(train_summary=summary, seconds_train=round(t_train, 1),
                  seconds_total=round(time.perf_counter() - t0, 1))
    (Path(config.output_dir) / "demo.json").write_text(json.dumps(result, indent=2))
    say("3/3 results")
    print(render_table(result))
    return result


def evaluate_demo(run_dir: Path, data: Path, *, few_shot: int = DEMO_FEW_SHOT,
                  test_limit: int | None = None, seed: int = 0) -> dict:
    """Base zero-shot, base ``few_shot``-shot and tuned model on the test tickets, by
    :func:`tuneforge.eval.evaluate.run_eval` (report in ``run_dir/eval``)."""
    from tuneforge.eval.evaluate import run_eval

    say(f"2/3 evaluating base zero-shot, base {few_shot}-shot and tuned model on the held-out "
        "test tickets")
    evaluation = run_eval(str(run_dir), task="classification", labels=str(data / "labels.json"),
                          few_shot=few_shot, seed=seed, output_dir=run_dir / "eval",
                          limit=test_limit, samples=SAMPLES, max_new_tokens=60)
    ((name, task),) = evaluation["tasks"].items()
    first = json.loads((run_dir / "eval" / "samples.jsonl").read_text().splitlines()[0])
    return {
        "run_dir": str(run_dir), "report": str(run_dir / "eval" / "report.html"),
        "task": name, "test_examples": task["n"], "labels": task["labels"], "few_shot": few_shot,
        "systems": task["systems"], "seconds_eval": evaluation["seconds"],
        "sample": {"ticket": first["input"], "gold": first["reference"].splitlines()[0],
                   "replies": {s: out.get("generated", "") for s, out in first["outputs"].items()}},
    }


TABLE_METRICS = (("accuracy", "accuracy"), ("macro_precision", "macro precision"),
                 ("macro_recall", "macro recall"), ("macro_f1", "macro F1"))


def render_table(result: dict) -> str:
    """Metrics (rows) of base zero-shot, base k-shot and tuned (columns), then the story."""
    from tuneforge.eval.report import system_title

    s, systems = result["train_summary"], result["systems"]
    titles = [system_title(name, result["few_shot"]) for name in systems]
    rows = [(label, [f"{m[key]:.3f}" for m in systems.values()]) for key, label in TABLE_METRICS]
    rows += [(f"  F1 {label}", [f"{m['per_class'][label]['f1']:.2f}" for m in systems.values()])
             for label in result["labels"]]
    rows.append(("(chance accuracy)", [f"{1 / len(result['labels']):.3f}"]))
    width = max(len(r[0]) for r in rows) + 2
    col = max(12, *(len(t) + 2 for t in titles))
    lines = ["", f"{result['test_examples']} held-out test tickets, {len(result['labels'])} "
                 "departments, label-constrained scoring",
             " " * width + "".join(f"{t:>{col}}" for t in titles)]
    lines += [f"{name:<{width}}" + "".join(f"{v:>{col}}" for v in values) for name, values in rows]
    sample = result["sample"]
    lines += [
        "",
        f"trained {s['steps']} steps on {s['train_examples']} tickets in {result['seconds_train']:.0f} s "
        f"({s['tokens_per_s']:.0f} tokens/s); best validation loss {s['best_val_loss']:.3f}",
        f"evaluated in {result['seconds_eval']:.0f} s; total demo time {result['seconds_total']:.0f} s",
        "",
        f"ticket: {sample['ticket']}",
        f"  expected: {sample['gold']}",
    ]
    lines += [f"  {system_title(name, result['few_shot']) + ':':<16} {reply!r}"
              for name, reply in sample["replies"].items()]
    lines += [
        "",
        f"run folder: {result['run_dir']}  (adapter/, metrics.jsonl, loss.png, demo.json)",
        f"report: {result['report']}  (and report.md, eval.json, samples.jsonl, plots)",
        f"try it: tuneforge chat {result['run_dir']}",
    ]
    return "\n".join(lines)


def say(text: str) -> None:
    print(f"tuneforge demo: {text}", file=sys.stderr, flush=True)
