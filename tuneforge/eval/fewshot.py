"""k-shot prompts: solved training examples shown to the model before the question.

The shots are drawn once per evaluation from the training file with a fixed seed (the same k
examples precede every test question, so the baseline is one reproducible prompt, not a lucky
draw per question) and, for classification, spread across the labels. In chat form each shot is
a prior user turn and assistant answer, after the system message; in raw prompt/completion
form the solved prompts are written one after another, separated by a blank line. The scoring
that follows is the zero-shot scoring, unchanged.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

from tuneforge.data.example import Example, Message
from tuneforge.data.templates import Prompt, prompt_and_reference

SHOT_SEPARATOR = "\n\n"


def pick_shots(pool: Sequence[Example], k: int, *, seed: int = 0,
               label_of: Callable[[Example], str | None] | None = None) -> list[Example]:
    """``k`` examples of ``pool``, chosen by ``seed``.

    With ``label_of``, labels take turns (in a seeded order) so that k >= the number of labels
    shows every label once before any label twice; the chosen shots are then shuffled, so the
    last shot (the one nearest the question) is not always the same label.
    """
    if k <= 0 or not pool:
        return []
    rng = random.Random(seed)
    if label_of is None:
        return rng.sample(list(pool), min(k, len(pool)))
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in pool:
        groups[str(label_of(ex))].append(ex)
    order = sorted(groups)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(groups[name])
    chosen: list[Example] = []
    depth = 0
    while len(chosen) < min(k, len(pool)):
        for name in order:
            if depth < len(groups[name]) and len(chosen) < k:
                chosen.append(groups[name][depth])
        depth += 1
    rng.shuffle(chosen)
    return chosen


def with_shots(prompt: Prompt, shots: Sequence[Example]) -> Prompt:
    """``prompt`` preceded by the solved ``shots`` (as turns, or as text for raw prompts)."""
    if not shots:
        return prompt
    if isinstance(prompt, str):
        solved = []
        for shot in shots:
            shot_prompt, answer = prompt_and_reference(shot)
            solved.append(_as_text(shot_prompt) + answer)
        return SHOT_SEPARATOR.join([*solved, prompt])
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns: list[dict] = []
    for shot in shots:
        shot_prompt, answer = prompt_and_reference(shot)
        turns += [m for m in _as_messages(shot_prompt) if m["role"] != "system"]
        turns.append({"role": "assistant", "content": answer})
    return system + turns + prompt[len(system) :]


def shots_as_context(example: Example, shots: Sequence[Example]) -> Example:
    """``example`` with the shots in front and untrained (weight 0), for the loss on its answer."""
    if not shots:
        return example
    prompt, answer = prompt_and_reference(example)
    full = with_shots(prompt, shots)
    if isinstance(full, str):
        return Example(example.source, example.line, "prompt_completion", prompt=full,
                       completion=answer, label=example.label)
    messages = [Message(m["role"], m["content"], 0.0 if m["role"] == "assistant" else None)
                for m in full]
    messages.append(Message("assistant", answer))
    return Example(example.source, example.line, "chat", messages=messages, label=example.label)


def _as_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
