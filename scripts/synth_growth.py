"""Does synthetic data stand in for real data? The business question of `tuneforge data synth`.

On the demo task (routing Northwind Home support tickets to one of six departments), train on
10% of the training tickets; then on that 10% grown by `data synth --mode paraphrase` to the size
of 50% and of 100%; and on the real 50% and 100%. Every run has the same settings and is judged
on the same 120 held-out test tickets by label likelihood (`tuneforge eval`).

The tickets are read as classification records (text = the ticket, label = the department from
the answer's first line) and trained with the demo's system prompt and a "Department: <label>"
answer. The teacher that writes the paraphrases is the built-in model; the judge that keeps a
paraphrase only when it is scored back into its label is the run trained on the 10% (a tuned
classifier judges better than the base model does). Synthetic records never repeat a seed,
validation or test ticket, exactly or nearly (synth's dedup).

    python scripts/synth_growth.py --out runs/synth-growth      # about half an hour on 2 CPU cores

Writes OUT/table.md (and prints it), OUT/results.json, the data under OUT/data and the runs
under OUT/runs. Re-running skips the runs and the synthesis already finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "examples" / "data" / "support"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def as_classification(path: Path) -> tuple[str, list[dict]]:
    """(the shared system prompt, {text, label} records) of a support chat file."""
    systems, records = set(), []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        systems.add(next(m["content"] for m in messages if m["role"] == "system"))
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        label = answer.split("\n", 1)[0].removeprefix("Department:").strip()
        records.append({"text": user, "label": label})
    assert len(systems) == 1, f"{path}: expected one system prompt"
    return systems.pop(), records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tuneforge(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tuneforge", *args]
    print("+ tuneforge " + " ".join(args), flush=True)
    proc = subprocess.run(command, text=True, stdout=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"tuneforge {args[0]} failed (exit {proc.returncode})")
    return proc


def train(out: Path, name: str, data: Path, config: dict) -> Path:
    run = out / "runs" / name
    if (run / "summary.json").is_file():
        return run
    cfg = json.loads(json.dumps(config))
    cfg["output_dir"] = str(run)
    cfg["data"]["train"] = str(data)
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tuneforge("train", str(path), "--overwrite")
    return run


def evaluate(run: Path, test: Path, labels: Path) -> dict:
    report = run / "eval" / "eval.json"
    if not report.is_file():
        tuneforge("eval", str(run), "--data", str(test), "--labels", str(labels), "--samples", "0")
    result = json.loads(report.read_text())
    return next(iter(result["tasks"].values()))["systems"]  # {system: its metrics}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/synth-growth")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="epochs of every compared run (1, as the demo)")
    p.add_argument("--judge-epochs", type=float, default=3.0,
                   help="epochs of the 10%% run that judges the paraphrases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    args = p.parse_args()
    out = Path(args.out)
    started = time.time()

    system, train_records = as_classification(SUPPORT / "train.jsonl")
    _, validation = as_classification(SUPPORT / "validation.jsonl")
    _, test = as_classification(SUPPORT / "test.jsonl")
    random.Random(args.seed).shuffle(train_records)
    n = len(train_records)
    sizes = {"10%": n // 10, "50%": n // 2, "100%": n}
    data = out / "data"
    files = {"real 10%": write_jsonl(data / "real10.jsonl", train_records[: sizes["10%"]]),
             "real 50%": write_jsonl(data / "real50.jsonl", train_records[: sizes["50%"]]),
             "real 100%": write_jsonl(data / "real100.jsonl", train_records)}
    val_file = write_jsonl(data / "validation.jsonl", validation)
    test_file = write_jsonl(data / "test.jsonl", test)
    labels = SUPPORT / "labels.json"

    config = {
        "model": {"name": "builtin:smollm2-135m-instruct"},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": "", "validation": str(val_file), "test": str(test_file),
                 "labels": str(labels), "max_length": 512,
                 "template": {"system": system, "assistant": "Department: {label}"}},
        "train": {"epochs": args.epochs, "batch_size": 8, "lr": 1.0e-3, "warmup_ratio": 0.05,
                  "eval_every": 0, "save_every": 0, "seed": args.seed,
                  "metric_for_best": "val_accuracy"},
    }
    judge = json.loads(json.dumps(config))
    judge["train"]["epochs"] = args.judge_epochs
    seed_run = train(out, "real10", files["real 10%"], judge)  # the judge of the paraphrases

    synthetic = data / "synthetic.jsonl"
    need = sizes["100%"] - sizes["10%"]
    tuneforge("data", "synth", str(files["real 10%"]), "--out", str(synthetic), "--num", str(need),
              "--mode", "paraphrase", "--teacher", args.teacher, "--judge", str(seed_run),
              "--validation", str(val_file), "--test", str(test_file), "--seed", str(args.seed),
              "--batch-size", "16", "--max-new-tokens", "96", "--temperature", "0.8",
              "--patience", "400", "--report", str(out / "synthetic-report"))
    made = [json.loads(line) for line in synthetic.read_text().splitlines()]
    seeds = train_records[: sizes["10%"]]
    files["10% + synth to 50%"] = write_jsonl(data / "grown50.jsonl",
                                              seeds + made[: sizes["50%"] - sizes["10%"]])
    files["10% + synth to 100%"] = write_jsonl(data / "grown100.jsonl", seeds + made)

    results = {}
    names = {"real 10%": "t-real10", "real 50%": "t-real50", "real 100%": "t-real100",
             "10% + synth to 50%": "t-grown50", "10% + synth to 100%": "t-grown100"}
    for label, name in names.items():
        run = train(out, name, files[label], config)
        metrics = evaluate(run, test_file, labels)
        examples = len(files[label].read_text().splitlines())
        results[label] = {"examples": examples,
                          "real": sizes["10%"] if label.startswith("10%") else examples,
                          "accuracy": metrics["tuned"]["accuracy"],
                          "macro_f1": metrics["tuned"]["macro_f1"],
                          "base_accuracy": metrics["base_zero_shot"]["accuracy"]}
    base = next(iter(results.values()))["base_accuracy"]
    rows = ["| training data | examples (real) | test accuracy | macro F1 |", "|---|---|---|---|",
            f"| none (base model, zero-shot) | 0 | {base:.3f} | |"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['examples']} ({r['real']}) | {r['accuracy']:.3f} | "
                    f"{r['macro_f1']:.3f} |")
    took = (time.time() - started) / 60
    note = (f"\n{len(test)} test tickets; LoRA r=16 on the built-in SmolLM2-135M-Instruct, "
            f"{args.epochs:g} epochs, batch 8, lr 1e-3; synthetic paraphrases by {args.teacher}, "
            f"judged by the 10% run trained {args.judge_epochs:g} epochs; {cpu_name()}, "
            f"{took:.0f} min in all (this invocation).")
    table = "\n".join(rows) + "\n" + note
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
