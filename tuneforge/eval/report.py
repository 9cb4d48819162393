"""The evaluation report: eval.json, samples.jsonl, report.md and report.html with PNG plots.

The report is built once as a list of blocks (headings, paragraphs, tables, images) and written
twice, as Markdown and as a self-contained-folder HTML page, so the two never disagree. Plots
per task: the headline metrics of each system side by side, per-class F1 and the confusion
matrices (classification); for a run folder, the metric curves over training steps from its
metrics.jsonl.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from tuneforge.data.templates import prompt_and_reference
from tuneforge.train.checkpoint import atomic_write_text

SYSTEM_TITLES = {"base_zero_shot": "base zero-shot", "base_few_shot": "base {k}-shot",
                 "tuned": "tuned"}
SYSTEM_COLOURS = {"base_zero_shot": "#9ab", "base_few_shot": "#e0a040", "tuned": "#1f4e79"}
SUMMARY_METRICS = {
    "classification": ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_f1"),
    "generation": ("exact_match", "token_f1", "rouge_l", "bleu", "json_valid"),
    "lm": (),
}
TABLE_EXTRA = ("loss", "perplexity")

Block = tuple  # ("h1"|"h2"|"h3"|"p", text) | ("table", header, rows) | ("img", file, alt)


def write_report(result: dict, tasks: Sequence, outputs: dict, out_dir: Path, *,
                 samples: int = 5) -> dict[str, str]:
    """Write every file of the report into ``out_dir``; records their paths in ``result``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": "eval.json", "samples": "samples.jsonl", "markdown": "report.md",
             "html": "report.html", "plots": []}
    atomic_write_text(out_dir / "samples.jsonl", "".join(
        json.dumps(record) + "\n" for record in sample_records(tasks, outputs)))
    blocks = report_blocks(result, tasks, outputs, out_dir, files["plots"], samples)
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, "tuneforge evaluation"))
    result["files"] = files
    result["output_dir"] = str(out_dir)
    atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2))
    return files


def render_text(result: dict, metrics: Sequence[str] | None = None) -> str:
    """A plain-text table per task: one row per metric, one column per system."""
    k = result["few_shot"]["k"]
    lines = []
    for name, info in result["tasks"].items():
        systems = list(info["systems"])
        names = metrics or [m for m in SUMMARY_METRICS[info["type"]] + TABLE_EXTRA
                            if all(m in info["systems"][s] for s in systems)]
        titles = [system_title(s, k) for s in systems]
        width = max(len(m) for m in names) + 2
        col = max(12, *(len(t) + 2 for t in titles))
        lines += ["", f"{name} ({info['type']}, {info['n']} test examples)",
                  " " * width + "".join(f"{t:>{col}}" for t in titles)]
        lines += [f"{m:<{width}}" + "".join(f"{_fmt(info['systems'][s].get(m)):>{col}}"
                                            for s in systems) for m in names]
    return "\n".join(lines)


def system_title(system: str, k: int) -> str:
    return SYSTEM_TITLES[system].format(k=k)


def sample_records(tasks: Sequence, outputs: dict) -> list[dict]:
    """One record per test example: its input, reference, and every system's output."""
    records = []
    for task in tasks:
        per_system = outputs[task.name]
        for i, ex in enumerate(task.test):
            prompt, reference = prompt_and_reference(ex)
            records.append({
                "task": task.name, "where": ex.where, "input": _last_user(prompt),
                "reference": reference,
                "outputs": {s: per_system[s][i] for s in per_system},
            })
    return records


def _last_user(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


# --------------------------------------------------------------------------------------------
# Content


def report_blocks(result: dict, tasks: Sequence, outputs: dict, out_dir: Path,
                  plots: list[str], samples: int) -> list[Block]:
    k = result["few_shot"]["k"]
    blocks: list[Block] = [
        ("h1", f"Evaluation of {result['description']}"),
        ("p", f"Systems: {', '.join(system_title(s, k) for s in result['systems'])}. "
              f"Few-shot examples are drawn from each task's training file with seed "
              f"{result['few_shot']['seed']}, spread across labels. Classification is scored "
              "by the likelihood of each allowed label (the prediction is the most likely "
              f"one). Took {result['seconds']:.0f} s."),
    ]
    for task in tasks:
        blocks += task_blocks(task, result, outputs[task.name], out_dir, plots, samples)
    run_dir = result.get("run_dir")
    if run_dir and (curves := plot_training_curves(Path(run_dir) / "metrics.jsonl",
                                                   out_dir / "training_curves.png")):
        plots.append(curves.name)
        blocks += [("h2", "Training curves"),
                   ("p", "Validation metrics logged during training (metrics.jsonl)."),
                   ("img", curves.name, "metrics over training steps")]
    return blocks


def task_blocks(task, result: dict, outputs: dict, out_dir: Path, plots: list[str],
                samples: int) -> list[Block]:
    info = result["tasks"][task.name]
    k = result["few_shot"]["k"]
    systems = list(info["systems"])
    titles = [system_title(s, k) for s in systems]
    blocks: list[Block] = [("h2", f"Task {task.name} ({info['type']}, {info['n']} test examples)"),
                           ("p", f"Test file {info['test_file']}; training file "
                                 f"{info['train_file'] or '(none given)'}.")]
    blocks.append(("p", _leakage_text(info["leakage"])))
    names = [m for m in SUMMARY_METRICS[info["type"]] + TABLE_EXTRA
             if any(m in info["systems"][s] for s in systems)]
    rows = [[m] + [_fmt(info["systems"][s].get(m)) for s in systems] for m in names]
    blocks.append(("table", ["metric", *titles], rows))
    if (png := plot_summary(task.name, info, k, out_dir)) is not None:
        plots.append(png.name)
        blocks.append(("img", png.name, f"{task.name}: metrics by system"))
    if info["type"] == "classification":
        blocks += _class_blocks(task.name, info, titles, out_dir, plots, k)
    if info["shots"]:
        blocks.append(("p", f"The {len(info['shots'])} in-context examples: "
                            + ", ".join(info["shots"]) + "."))
    blocks += _sample_blocks(task, outputs, systems, titles, samples)
    return blocks


def _class_blocks(name: str, info: dict, titles: list[str], out_dir: Path, plots: list[str],
                  k: int) -> list[Block]:
    systems = list(info["systems"])
    first = info["systems"][systems[0]]
    rows = [[label, str(first["per_class"][label]["support"])]
            + [f"{info['systems'][s]['per_class'][label]['precision']:.2f} / "
               f"{info['systems'][s]['per_class'][label]['recall']:.2f} / "
               f"{info['systems'][s]['per_class'][label]['f1']:.2f}" for s in systems]
            for label in info["labels"]]
    blocks: list[Block] = [("h3", "Per class (precision / recall / F1)"),
                           ("table", ["class", "support", *titles], rows)]
    for png in (plot_per_class(name, info, k, out_dir), plot_confusions(name, info, k, out_dir)):
        plots.append(png.name)
        blocks.append(("img", png.name, png.stem.replace("_", " ")))
    return blocks


def _sample_blocks(task, outputs: dict, systems: list[str], titles: list[str],
                   samples: int) -> list[Block]:
    rows = []
    for i, ex in enumerate(task.test[:samples]):
        prompt, reference = prompt_and_reference(ex)
        cells = []
        for s in systems:
            out = outputs[s][i]
            text = out.get("generated", "")
            if "predicted" in out:
                text = f"[{out['predicted']}] {text}".strip()
            cells.append(text)
        rows.append([ex.where, _last_user(prompt), reference, *cells])
    if not rows:
        return []
    return [("h3", f"Samples (first {len(rows)}; all in samples.jsonl)"),
            ("p", "Generated greedily; [label] is the label-scored prediction."),
            ("table", ["example", "input", "reference", *titles], rows)]


def _leakage_text(leakage: dict | None) -> str:
    if leakage is None:
        return "Hold-out check: not run (no training file to compare with)."
    total = leakage["exact"] + leakage["near"]
    if not total:
        return (f"Hold-out check: none of the {leakage['test_examples']} test examples appears in "
                f"the training data (exact, or >= {leakage['near_threshold']:.0%} of words shared).")
    return (f"**WARNING: {total} of {leakage['test_examples']} test examples also appear in the "
            f"training data** ({leakage['exact']} exact, {leakage['near']} near-exact); the "
            "figures overstate performance on unseen data. First: "
            + "; ".join(leakage["examples"]))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# Writers


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            text = html.escape(block[1])
            if text.startswith("**"):  # the one bold lead-in the Markdown uses (warnings)
                text = "<strong>" + text[2:].replace("**", "</strong>", 1)
            body.append(f"<p>{text}</p>")
        elif kind == "img":
            body.append(f'<img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                           + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;vertical-align:top;white-space:pre-wrap;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], colours: dict) -> None:
    """One group of bars per entry of ``groups``, one bar per series (system) inside it."""
    n = max(1, len(series))
    width = 0.8 / n
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=colours.get(name))
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_summary(name: str, info: dict, k: int, out_dir: Path) -> Path | None:
    """The headline metrics of the task, systems side by side."""
    metrics = [m for m in SUMMARY_METRICS[info["type"]]
               if all(m in v for v in info["systems"].values())]
    if not metrics:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    series = {system_title(s, k): [v[m] for m in metrics] for s, v in info["systems"].items()}
    colours = {system_title(s, k): SYSTEM_COLOURS[s] for s in info["systems"]}
    _grouped_bars(ax, [m.replace("_", " ") for m in metrics], series, colours)
    ax.set_title(f"{name}: test metrics ({info['n']} examples)")
    return _save(fig, out_dir / f"{name}_summary.png")


def plot_per_class(name: str, info: dict, k: int, out_dir: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(info["labels"]) + 2), 4), dpi=110)
    series = {system_title(s, k): [v["per_class"][lab]["f1"] for lab in info["labels"]]
              for s, v in info["systems"].items()}
    colours = {system_title(s, k): SYSTEM_COLOURS[s] for s in info["systems"]}
    _grouped_bars(ax, info["labels"], series, colours)
    ax.set_ylabel("F1")
    ax.set_title(f"{name}: F1 per class")
    return _save(fig, out_dir / f"{name}_per_class.png")


def plot_confusions(name: str, info: dict, k: int, out_dir: Path) -> Path:
    """One confusion matrix per system (rows: gold label, columns: predicted)."""
    plt = _pyplot()
    labels, systems = info["labels"], list(info["systems"])
    size = 1.6 + 0.55 * len(labels)
    fig, axes = plt.subplots(1, len(systems), figsize=(size * len(systems), size + 0.6),
                             dpi=110, squeeze=False)
    for ax, s in zip(axes[0], systems):
        matrix = info["systems"][s]["confusion_matrix"]
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, max(map(max, matrix))))
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > 0.6 * max(map(max, matrix)) else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_title(f"{system_title(s, k)}\naccuracy {info['systems'][s]['accuracy']:.1%}",
                     fontsize=9)
    axes[0][0].set_ylabel("gold")
    return _save(fig, out_dir / f"{name}_confusion.png")


def plot_training_curves(metrics_path: Path, path: Path) -> Path | None:
    """Losses (left) and the other validation metrics (right) over optimizer steps."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    val_keys = sorted({k for r in records for k in r if k.startswith("val_")
                       and isinstance(r[k], (int, float))})
    losses = [k for k in val_keys if "loss" in k]
    others = [k for k in val_keys if k not in losses and "ppl" not in k]
    if not val_keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 7, 4), dpi=110,
                             squeeze=False)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        axes[0][0].plot(*zip(*train), color="#9ab", lw=1, label="train loss")
    for key in losses:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[0][0].plot(*zip(*points), "o-", lw=2, label=key)
    axes[0][0].set_ylabel("nats / token")
    for key in others:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[0][1].plot(*zip(*points), "o-", lw=1.5, label=key)
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("validation metrics during training")
    return _save(fig, path)
