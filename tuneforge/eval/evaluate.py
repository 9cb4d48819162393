"""Evaluating models on tasks: the function behind `tuneforge eval`, `demo` and training metrics.

:func:`evaluate_task` scores one model (as it is in memory) on one task: label-scored
classification metrics, or generated answers against references, plus the loss and perplexity
of the reference answers, and a few generated replies for a person to read. :func:`run_eval`
does a whole evaluation: reads the tasks (from a run's config or from the arguments), refuses
test data that leaks from the training data, then evaluates the base model zero-shot and
k-shot and the tuned model (one model in memory, the adapter switched off for the base) and
writes ``eval.json``, ``samples.jsonl`` and the Markdown/HTML report with plots.
:func:`validation_metrics_fn` gives the training loop its per-evaluation task metrics.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tuneforge.config import RunConfig, TaskConfig, TemplateConfig, default_task_name, task_configs
from tuneforge.data.example import Example
from tuneforge.data.render import render_sft
from tuneforge.data.templates import (
    apply_template,
    check_template_roundtrip,
    prompt_and_reference,
)
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.eval.classify import classify, target_nll
from tuneforge.eval.fewshot import pick_shots, shots_as_context, with_shots
from tuneforge.eval.metrics import classification_metrics, generation_metrics, perplexity
from tuneforge.eval.tasks import TaskSpec, gold_label, load_task_examples, resolve_task

SYSTEMS = ("base_zero_shot", "base_few_shot", "tuned")
"""Report order: what prompting alone gives, then what fine-tuning gives."""
SCHEMA_VERSION = 1


@dataclass
class EvalTask:
    """A task ready to evaluate: its scoring spec and its (templated) test and training examples."""

    config: TaskConfig
    test: list[Example]
    train: list[Example] = field(default_factory=list)
    spec: TaskSpec | None = None
    leakage: dict | None = None

    @property
    def name(self) -> str:
        return self.config.name


# --------------------------------------------------------------------------------------------
# One model, one task


def evaluate_task(model, tokenizer, task: EvalTask, *, shots: Sequence[Example] = (),
                  samples: int = 5, max_new_tokens: int | None = None,
                  desc: str = "") -> tuple[dict, list[dict]]:
    """(metrics, one output record per test example) of ``model`` as it is now.

    Metrics are flat floats (``accuracy``, ``macro_f1``, ..., or ``exact_match``, ``rouge_l``,
    ...; always ``loss`` and ``perplexity`` of the reference answers) plus ``per_class`` and
    ``confusion_matrix`` for classification. Generation runs for every example of a generation
    task and for the first ``samples`` of the others.
    """
    spec = task.spec
    prompts = [with_shots(prompt_and_reference(ex)[0], shots) for ex in task.test]
    references = [prompt_and_reference(ex)[1] for ex in task.test]
    outputs: list[dict] = [{} for _ in task.test]
    metrics: dict = {}
    if spec.type == "classification":
        gold = [gold_label(ex, spec) for ex in task.test]
        with _bar(len(prompts), f"{desc} label scoring") as bar:
            scores = classify(model, tokenizer, prompts, gold, spec.labels, prefix=spec.prefix,
                              suffix=spec.suffix, progress=lambda n: bar.update(n - bar.n))
        metrics.update(classification_metrics(gold, scores.predicted, spec.labels))
        for out, label in zip(outputs, scores.predicted):
            out["predicted"] = label
    n_generate = len(prompts) if spec.type == "generation" else min(samples, len(prompts))
    if n_generate:
        texts = generate_answers(model, tokenizer, prompts[:n_generate], references, max_new_tokens)
        for out, text in zip(outputs, texts):
            out["generated"] = text
        if spec.type == "generation":
            metrics.update(generation_metrics(texts, references, check_json=spec.check_json))
    context = [shots_as_context(ex, shots) for ex in task.test]
    loss = completion_loss(model, tokenizer, context)
    metrics.update(n=len(task.test), loss=loss, perplexity=perplexity(loss))
    return metrics, outputs


def generate_answers(model, tokenizer, prompts: Sequence, references: Sequence[str],
                     max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers; by default up to 1.25x the longest reference (+8 tokens, at most 512)."""
    from tuneforge.generation import generate_batch

    if max_new_tokens is None:
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        max_new_tokens = min(512, int(1.25 * longest) + 8)
    if prompts and isinstance(prompts[0], str):
        return [_generate_raw(model, tokenizer, p, max_new_tokens) for p in prompts]
    results = generate_batch(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                             batch_size=16, precision="auto")
    return [r.text for r in results]


@torch.no_grad()
def _generate_raw(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of raw prompt text (no chat template), up to EOS."""
    from tuneforge.data.templates import prompt_ids

    ids = torch.tensor([prompt_ids(prompt, tokenizer)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def completion_loss(model, tokenizer, examples: Sequence[Example], bf16: bool | None = None,
                    ) -> float:
    """Mean negative log-likelihood (nats per token) of the trained answer tokens of ``examples``
    (rendered as training renders them), bf16 where the hardware has it unless ``bf16=False``.

    :func:`tuneforge.eval.classify.target_nll` packs them: few-shot examples that every
    example starts with run once.
    """
    was_training = model.training
    model.eval()
    try:
        total, count = target_nll(model, [render_sft(ex, tokenizer) for ex in examples], bf16)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc.strip(), unit="ex", file=sys.stderr, leave=False,
                mininterval=0.5 if sys.stderr.isatty() else 30)


# --------------------------------------------------------------------------------------------
# Metrics during training


LABEL_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_f1")


def validation_metrics_fn(tasks: Sequence[EvalTask], tokenizer,
                          ) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The loop's ``metrics_fn``: label-scored metrics of the classification tasks.

    Logs ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1`` and ``micro_f1``
    (averaged over the classification tasks). With several tasks, each task's figures are also
    logged as ``<task>_<name>``, with ``<task>_loss``. None when there is nothing to add to the
    validation loss. ``metrics_fn.names`` lists the names it returns.
    """
    tasks = [t for t in tasks if t.test]
    scored = [t for t in tasks if t.spec.type == "classification"]
    several = len(tasks) > 1
    if not scored and not several:
        return None

    def metrics_fn(model) -> dict[str, float]:
        per_task = {t.name: label_metrics(model, tokenizer, t) for t in scored}
        out = {k: sum(m[k] for m in per_task.values()) / len(per_task)
               for k in LABEL_METRICS if per_task}
        if several:
            out.update({f"{name}_{k}": v for name, m in per_task.items() for k, v in m.items()})
            out.update({f"{t.name}_loss": completion_loss(model, tokenizer, t.test) for t in tasks})
        return out

    metrics_fn.names = (list(LABEL_METRICS) if scored else []) + (
        [f"{t.name}_{k}" for t in scored for k in LABEL_METRICS] + [f"{t.name}_loss" for t in tasks]
        if several else [])
    return metrics_fn


def label_metrics(model, tokenizer, task: EvalTask) -> dict[str, float]:
    """LABEL_METRICS of ``model`` on a classification task's examples, zero-shot."""
    prompts = [prompt_and_reference(ex)[0] for ex in task.test]
    gold = [gold_label(ex, task.spec) for ex in task.test]
    result = classify(model, tokenizer, prompts, gold, task.spec.labels, prefix=task.spec.prefix,
                      suffix=task.spec.suffix)
    metrics = result.metrics()
    return {k: metrics[k] for k in LABEL_METRICS}


# --------------------------------------------------------------------------------------------
# A whole evaluation


def read_run_config(spec: str) -> RunConfig | None:
    """The config.yaml of a run folder (None for a model spec or a folder without one)."""
    from tuneforge.config import load_config

    path = Path(spec) / "config.yaml"
    return load_config(path) if Path(spec).is_dir() and path.is_file() else None


def prepare_tasks(configs: Sequence[TaskConfig], *, limit: int | None = None,
                  allow_leakage: bool = False) -> list[EvalTask]:
    """Read each task's test and training files and check the hold-out (before any model loads).

    The leakage check compares the records as written; the task template is applied after.
    """
    from tuneforge.eval.holdout import check_holdout, describe

    tasks = []
    for cfg in configs:
        if not cfg.test:
            continue
        test = load_task_examples(cfg.test, cfg.format)[:limit]
        train = load_task_examples(cfg.train, cfg.format) if cfg.train else []
        leakage = None
        if train:
            leakage, leaks = check_holdout(train, test, allow=allow_leakage, train_path=cfg.train)
            if leaks:
                print(f"WARNING (--allow-leakage): {describe(leakage)}", file=sys.stderr)
        tasks.append(EvalTask(cfg, [apply_template(ex, cfg.template) for ex in test],
                              [apply_template(ex, cfg.template) for ex in train], leakage=leakage))
    if not tasks:
        raise TuneforgeError("nothing to evaluate: give --data TEST_FILE (or a run whose config "
                             "names a test file)")
    return tasks


def resolve_specs(tasks: Sequence[EvalTask], tokenizer) -> None:
    """Fill in each task's TaskSpec and check that its template renders the same prompt in
    training and at inference."""
    for task in tasks:
        task.spec = resolve_task(task.config, task.test, task.train, tokenizer)
        for ex in (task.train or task.test)[:3]:
            check_template_roundtrip(ex, tokenizer)


def run_eval(model: str, *, data: str | None = None, train: str | None = None,
             task: str = "auto", labels: list[str] | str | None = None,
             template: TemplateConfig | None = None, few_shot: int = 0, seed: int = 0,
             output_dir: str | Path | None = None, allow_leakage: bool = False,
             limit: int | None = None, samples: int = 5, max_new_tokens: int | None = None,
             name: str | None = None) -> dict:
    """Evaluate ``model`` (a run folder or a model spec) and write the report; returns eval.json.

    With a run folder, the tasks, templates, training and test files come from its config.yaml;
    ``data`` (and the other task arguments) replace them with one task. The systems compared are
    the base model zero-shot and ``few_shot``-shot (examples drawn from the training file with
    ``seed``) and, for a run, the tuned model.
    """
    t0 = time.perf_counter()
    run_config = read_run_config(model)
    configs = eval_task_configs(run_config, data=data, train=train, task=task, labels=labels,
                                template=template, name=name)
    if few_shot and not any(c.train for c in configs):
        raise TuneforgeError("--few-shot needs training examples to draw from: pass --train FILE")
    tasks = prepare_tasks(configs, limit=limit, allow_leakage=allow_leakage)
    out_dir = Path(output_dir) if output_dir else default_output_dir(model, run_config)
    results: dict[str, dict] = {t.name: {} for t in tasks}
    outputs: dict[str, dict] = {t.name: {} for t in tasks}
    shots: dict[str, list[Example]] = {}
    description = model
    for system, net, tokenizer, desc in system_models(model, few_shot):
        description = desc if system == "tuned" or description == model else description
        for t in tasks:
            if t.spec is None:
                resolve_specs([t], tokenizer)
                shots[t.name] = draw_shots(t, few_shot, seed)
            use = shots[t.name] if system == "base_few_shot" else ()
            metrics, per_example = evaluate_task(net, tokenizer, t, shots=use, samples=samples,
                                                 max_new_tokens=max_new_tokens,
                                                 desc=f"{t.name} {system}")
            results[t.name][system] = metrics
            outputs[t.name][system] = per_example
            say(f"{t.name} {system}: " + headline(t.spec, metrics))
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "description": description,
        "run_dir": model if run_config is not None else None,
        "few_shot": {"k": few_shot, "seed": seed, "balanced_by_label": True},
        "systems": [s for s in SYSTEMS if any(s in r for r in results.values())],
        "tasks": {t.name: task_result(t, results[t.name], shots.get(t.name, [])) for t in tasks},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from tuneforge.eval.report import write_report

    write_report(result, tasks, outputs, out_dir, samples=samples)
    return result


def eval_task_configs(run_config: RunConfig | None, *, data: str | None, train: str | None,
                      task: str, labels, template: TemplateConfig | None,
                      name: str | None = None) -> list[TaskConfig]:
    """The tasks to evaluate: the run's own, or one task from ``data`` (which inherits the
    run's template, labels and training file when the run has a single task)."""
    run_tasks = task_configs(run_config) if run_config is not None else []
    if data is None:
        if not run_tasks:
            raise TuneforgeError("give --data TEST_FILE (a model spec has no test data of its own)")
        if train is not None and len(run_tasks) == 1:
            run_tasks = [replace(run_tasks[0], train=train)]
        return [replace(t, type=task if task != "auto" else t.type,
                        labels=labels if labels is not None else t.labels) for t in run_tasks]
    inherit = run_tasks[0] if len(run_tasks) == 1 else TaskConfig()
    return [TaskConfig(
        name=name or (inherit.name if run_tasks else default_task_name(data)),
        train=train if train is not None else inherit.train,
        test=data,
        format=inherit.format,
        type=task if task != "auto" else inherit.type,
        labels=labels if labels is not None else inherit.labels,
        template=template if template is not None else inherit.template,
    )]


def default_output_dir(model: str, run_config: RunConfig | None) -> Path:
    """``<run>/eval`` for a run folder, else ``runs/eval-<model>``."""
    if run_config is not None:
        return Path(model) / "eval"
    return Path("runs") / ("eval-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model))


def system_models(spec: str, few_shot: int) -> Iterator[tuple[str, object, object, str]]:
    """``(system, model, tokenizer, description)`` in report order.

    A PEFT run stays in memory once: the base systems run inside ``disable_adapter()``. A full
    or freeze run holds whole weights, so the base model is loaded after the tuned one is freed.
    """
    from tuneforge.models.adapters import has_adapter
    from tuneforge.models.loading import load_model
    from tuneforge.models.runs import find_run_output, load_for_inference

    model, tokenizer, description = load_for_inference(spec)
    output = find_run_output(Path(spec)) if Path(spec).is_dir() else None
    if output is None:
        yield from _base_systems(model, tokenizer, description, few_shot)
        return
    if has_adapter(model):
        with model.disable_adapter():
            yield from _base_systems(model, tokenizer, description, few_shot)
        yield "tuned", model, tokenizer, description
        return
    yield "tuned", model, tokenizer, description
    del model
    base_name = json.loads((output / "tuneforge.json").read_text())["base_model"]
    base, base_tokenizer = load_model(base_name)
    yield from _base_systems(base.eval(), base_tokenizer, description, few_shot)


def _base_systems(model, tokenizer, description: str, few_shot: int):
    yield "base_zero_shot", model, tokenizer, description
    if few_shot:
        yield "base_few_shot", model, tokenizer, description


def draw_shots(task: EvalTask, k: int, seed: int) -> list[Example]:
    """The task's k in-context examples (balanced across labels for classification)."""
    if k <= 0 or not task.train:
        return []
    label_of = None
    if task.spec.type == "classification":
        def label_of(ex: Example) -> str | None:
            try:
                return gold_label(ex, task.spec)
            except DataError:
                return None
    return pick_shots(task.train, k, seed=seed, label_of=label_of)


def task_result(task: EvalTask, systems: dict[str, dict], shots: Sequence[Example]) -> dict:
    """The JSON of one task: what it is, where its data came from, and each system's metrics."""
    spec = task.spec
    return {
        "type": spec.type,
        "labels": spec.labels,
        "n": len(task.test),
        "test_file": task.config.test,
        "train_file": task.config.train or None,
        "leakage": task.leakage,
        "shots": [ex.where for ex in shots],
        "systems": {s: systems[s] for s in SYSTEMS if s in systems},
    }


HEADLINE = {
    "classification": (("accuracy", "accuracy"), ("macro_f1", "macro F1")),
    "generation": (("token_f1", "token F1"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU")),
    "lm": (("loss", "loss"), ("perplexity", "perplexity")),
}


def headline(spec: TaskSpec, metrics: dict) -> str:
    """The task's main figures in one line."""
    return ", ".join(f"{label} {metrics[key]:.3f}" for key, label in HEADLINE[spec.type])


def say(message: str) -> None:
    print(f"tuneforge eval: {message}", file=sys.stderr, flush=True)
