"""What kind of task a data set is, and how its answers are scored.

A task is one of:

- ``classification`` (routing, compliance flags, ...): records with a ``label``, or answers of
  the form ``<prefix><label>`` on their first line (``Department: Billing``) when the allowed
  labels are known. Scored by label likelihood (:mod:`tuneforge.eval.classify`).
- ``generation`` (replies, summaries, extraction): the model writes an answer that is compared
  with the reference (:func:`tuneforge.eval.metrics.generation_metrics`).
- ``lm``: only the loss and perplexity of the reference answers.

The type is inferred from the data unless given; labels come from the caller (a list or a
labels file), else from the distinct labels of the training and test records.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import TaskConfig
from tuneforge.data.example import Example
from tuneforge.data.templates import prompt_and_reference
from tuneforge.errors import DataError
from tuneforge.eval.metrics import is_json

_MARK = "\u2063tuneforge\u2063"  # a probe answer no chat template treats specially


@dataclass
class TaskSpec:
    """How one task is scored. ``prefix + label + suffix`` is each candidate answer."""

    name: str
    type: str
    labels: list[str] = field(default_factory=list)
    prefix: str = ""
    suffix: str = ""
    check_json: bool = False

    def candidates(self) -> list[str]:
        return [self.prefix + label + self.suffix for label in self.labels]


def read_labels(value: Sequence[str] | str | None) -> list[str] | None:
    """Labels from a list, or from a file (a JSON list, or one label per line)."""
    if value is None or isinstance(value, list):
        return [str(v) for v in value] if value is not None else None
    path = Path(value)
    if not path.is_file():
        raise DataError(f"labels file {path} not found (give a JSON list or one label per line)")
    text = path.read_text()
    try:
        loaded = json.loads(text)
    except ValueError:
        loaded = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(loaded, list) or not loaded:
        raise DataError(f"{path}: expected a non-empty JSON list of labels or one label per line")
    return [str(v) for v in loaded]


def load_task_examples(path: str | Path, fmt: str | None) -> list[Example]:
    """A data file's supervised examples (DataError for a missing file or other record kinds)."""
    from tuneforge.data.formats import load_examples

    if not Path(path).is_file():
        raise DataError(f"data file {path} not found")
    examples = load_examples(path, fmt)
    wrong = [ex for ex in examples if ex.kind != "sft"]
    if wrong:
        raise DataError(f"{wrong[0].where}: {wrong[0].format} records cannot be evaluated as a "
                        "task; use chat, prompt/completion, alpaca or classification records")
    return examples


def resolve_task(task: TaskConfig, test: Sequence[Example], train: Sequence[Example],
                 tokenizer) -> TaskSpec:
    """The TaskSpec of ``task`` from its (templated) examples; DataError when labels are absent."""
    labels = read_labels(task.labels)
    kind = task.type
    if kind == "auto":
        has_labels = labels is not None or any(ex.label is not None for ex in test)
        kind = "classification" if has_labels else "generation"
    if kind != "classification":
        references = [prompt_and_reference(ex)[1] for ex in test]
        looks_json = bool(references) and all(
            r.strip()[:1] in "{[" and is_json(r) for r in references)
        return TaskSpec(task.name, kind, check_json=looks_json)
    if labels is None:
        labels = _distinct([ex.label for ex in [*train, *test] if ex.label is not None])
        if not labels:
            raise DataError(f"task {task.name!r}: classification needs labels: records with a "
                            "'label' key, or the allowed labels given (--labels / data.labels)")
    prefix, closes_answer = _label_layout(test, labels, task.name)
    suffix = end_of_answer(tokenizer, raw=_is_raw(test)) if closes_answer else "\n"
    return TaskSpec(task.name, "classification", labels, prefix, suffix)


def _distinct(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _is_raw(examples: Sequence[Example]) -> bool:
    return bool(examples) and examples[0].messages is None


def _label_layout(examples: Sequence[Example], labels: list[str], name: str) -> tuple[str, bool]:
    """(text before the label, whether the label ends the answer) shared by every answer."""
    by_length = sorted(labels, key=len, reverse=True)
    prefixes, alone = set(), []
    for ex in examples:
        answer = prompt_and_reference(ex)[1]
        first = answer.split("\n", 1)[0]
        label = next((lab for lab in by_length if first.endswith(lab)), None)
        if label is None:
            raise DataError(f"{ex.where}: the answer {first!r} does not end its first line with "
                            f"one of the labels of task {name!r} ({', '.join(labels)})")
        prefixes.add(first[: len(first) - len(label)])
        alone.append(answer == first)
    if len(prefixes) > 1:
        shown = ", ".join(repr(p) for p in sorted(prefixes)[:5])
        raise DataError(f"task {name!r}: answers put different text before the label ({shown}); "
                        "label scoring needs one answer layout")
    if len(set(alone)) > 1:
        raise DataError(f"task {name!r}: some answers are the label line alone and some go on "
                        "after it; label scoring needs one answer layout")
    return (prefixes.pop() if prefixes else ""), (all(alone) if alone else True)


def gold_label(example: Example, spec: TaskSpec) -> str:
    """The gold label of a test example; DataError when it is not one of the task's labels."""
    first = prompt_and_reference(example)[1].split("\n", 1)[0]
    label = first[len(spec.prefix) :] if first.startswith(spec.prefix) else first
    if label not in spec.labels:
        raise DataError(f"{example.where}: label {label!r} is not among the labels of task "
                        f"{spec.name!r} ({', '.join(spec.labels)})")
    return label


def end_of_answer(tokenizer, *, raw: bool) -> str:
    """The text training puts right after an answer: the chat template's end-of-turn token
    (what render_sft trains, trailing whitespace excluded), or EOS after a raw completion."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token or ""
    probe = [{"role": "user", "content": "?"}]
    prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": _MARK}],
                                         tokenize=False, add_generation_prompt=False)
    tail = full[len(prompt) :] if full.startswith(prompt) else ""
    if not tail.startswith(_MARK):
        return tokenizer.eos_token or ""
    return tail[len(_MARK) :].rstrip()
