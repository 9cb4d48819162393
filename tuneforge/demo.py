"""`tuneforge demo`: the whole story on the built-in model, in a few minutes on a laptop CPU.

SmolLM2-135M-Instruct is taught to route Northwind Home's customer-support tickets to the right
department (and draft a short reply) with a LoRA adapter trained on the shipped dataset. Base and
tuned model are then scored the same way on the held-out test split: each department name is
scored by the model's likelihood after the ticket, and the most likely one is the prediction.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError

DEMO_MODEL = "builtin:smollm2-135m-instruct"
ANSWER_PREFIX = "Department: "

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
             max_steps: int | None = None, test_limit: int | None = None) -> dict:
    from tuneforge.recipes.sft import run_sft

    t0 = time.perf_counter()
    data = find_demo_data()
    config = demo_config(data, output_dir, epochs, max_steps)
    say(f"1/3 fine-tuning {DEMO_MODEL} with LoRA on {data}/train.jsonl -> {config.output_dir}")
    summary = run_sft(config, overwrite=True)
    t_train = time.perf_counter() - t0
    result = evaluate_demo(Path(config.output_dir), data, test_limit=test_limit)
    result.update(train_summary=summary, seconds_train=round(t_train, 1),
                  seconds_total=round(time.perf_counter() - t0, 1))
    (Path(config.output_dir) / "demo.json").write_text(json.dumps(result, indent=2))
    say("3/3 results")
    print(render_table(result))
    return result


def evaluate_demo(run_dir: Path, data: Path, *, test_limit: int | None = None) -> dict:
    """Score base and tuned model on the test tickets; one model in memory, adapter toggled."""
    from tuneforge.data.formats import load_examples
    from tuneforge.models.runs import load_for_inference

    labels = json.loads((data / "labels.json").read_text())
    test = load_examples(data / "test.jsonl")[:test_limit]
    prompts = [[{"role": m.role, "content": m.content} for m in ex.messages if m.role != "assistant"]
               for ex in test]
    gold = [gold_label(ex) for ex in test]
    model, tokenizer, _ = load_for_inference(str(run_dir))
    say(f"2/3 scoring base and tuned model on {len(test)} held-out test tickets")
    t0 = time.perf_counter()
    with model.disable_adapter():
        base = score(model, tokenizer, prompts, gold, labels, "base")
        base_reply = _reply(model, tokenizer, prompts[0])
    tuned = score(model, tokenizer, prompts, gold, labels, "tuned")
    tuned_reply = _reply(model, tokenizer, prompts[0])
    plot_per_label(base, tuned, run_dir / "demo_accuracy.png")
    return {
        "run_dir": str(run_dir), "test_examples": len(test),
        "base": base.to_dict(), "tuned": tuned.to_dict(),
        "seconds_eval": round(time.perf_counter() - t0, 1),
        "sample": {"ticket": prompts[0][-1]["content"], "gold": gold[0],
                   "base_reply": base_reply, "tuned_reply": tuned_reply},
    }


def gold_label(example) -> str:
    answer = example.messages[-1].content
    first = answer.splitlines()[0]
    if not first.startswith(ANSWER_PREFIX):
        raise TuneforgeError(f"{example.where}: demo answers must start with {ANSWER_PREFIX!r}")
    return first[len(ANSWER_PREFIX) :].strip()


def score(model, tokenizer, prompts, gold, labels, name):
    from tqdm import tqdm

    from tuneforge.eval.classify import classify

    with tqdm(total=len(prompts), desc=f"score {name}", unit="ticket", file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        return classify(model, tokenizer, prompts, gold, labels, prefix=ANSWER_PREFIX, suffix="\n",
                        progress=lambda n: bar.update(n - bar.n))


def _reply(model, tokenizer, messages) -> str:
    from tuneforge.generation import generate_reply

    return generate_reply(model, tokenizer, messages, max_new_tokens=60)


def render_table(result: dict) -> str:
    s = result["train_summary"]
    base, tuned = result["base"], result["tuned"]
    rows = [("test accuracy", f"{base['accuracy']:.1%}", f"{tuned['accuracy']:.1%}"),
            ("test macro F1", f"{base['macro_f1']:.3f}", f"{tuned['macro_f1']:.3f}")]
    for label, b in base["per_label"].items():
        t = tuned["per_label"][label]
        rows.append((f"  recall {label}", f"{b['recall']:.0%}", f"{t['recall']:.0%}"))
    chance = 1 / len(base["per_label"])
    rows.append(("  (chance level)", f"{chance:.1%}", ""))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", f"{'':<{width}}{'base':>10}{'tuned':>10}"]
    lines += [f"{name:<{width}}{b:>10}{t:>10}" for name, b, t in rows]
    sample = result["sample"]
    lines += [
        "",
        f"trained {s['steps']} steps on {s['train_examples']} tickets in {result['seconds_train']:.0f} s "
        f"({s['tokens_per_s']:.0f} tokens/s); best validation loss {s['best_val_loss']:.3f}",
        f"total demo time {result['seconds_total']:.0f} s; {result['test_examples']} test tickets",
        "",
        f"ticket: {sample['ticket']}",
        f"  expected department: {sample['gold']}",
        f"  base model:  {sample['base_reply']!r}",
        f"  tuned model: {sample['tuned_reply']!r}",
        "",
        f"run folder: {result['run_dir']}  (adapter/, metrics.jsonl, loss.png, demo.json, "
        "demo_accuracy.png)",
        f"try it: tuneforge chat {result['run_dir']}",
    ]
    return "\n".join(lines)


def plot_per_label(base, tuned, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = base.labels + ["overall"]
    b = [base.per_label()[lab]["recall"] for lab in base.labels] + [base.accuracy]
    t = [tuned.per_label()[lab]["recall"] for lab in tuned.labels] + [tuned.accuracy]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.bar([i - 0.2 for i in x], b, 0.4, label="base", color="#9ab")
    ax.bar([i + 0.2 for i in x], t, 0.4, label="tuned (LoRA)", color="#1f4e79")
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall on test tickets")
    ax.set_title("Ticket routing: base vs tuned SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def say(text: str) -> None:
    print(f"tuneforge demo: {text}", file=sys.stderr, flush=True)
