"""Hold-out hygiene: a test example the model was trained on measures memory, not skill.

Two checks, both between the test file and the training file:

- **exact**: the same example (case and whitespace aside), found by the check that
  ``tuneforge data check`` and ``train`` run (:mod:`tuneforge.data.validate`);
- **near-exact**: the same question reworded a little. The user text of each test example (the
  system prompt is shared by every example and would make them all look alike) is compared with
  every training example's as a set of lowercase words; a Jaccard similarity of ``threshold``
  (0.8) or more counts. The comparison uses prefix filtering (two sets that similar must share
  one of their rarest words), so it stays fast on large files.

:func:`check_holdout` refuses to go on when either finds something, with counts and examples,
unless told to allow it; then the counts still go into the report.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tuneforge.data.example import Example
from tuneforge.data.formats import location
from tuneforge.data.templates import prompt_and_reference
from tuneforge.data.validate import exact_leakage, example_key
from tuneforge.errors import DataError
from tuneforge.eval.metrics import normalize_answer

NEAR_THRESHOLD = 0.8
LISTED = 10


@dataclass
class Leak:
    """A test example that also appears in the training data."""

    test: Example
    train: Example
    kind: str  # "exact" | "near"
    similarity: float

    def __str__(self) -> str:
        what = "same example" if self.kind == "exact" else f"{self.similarity:.0%} of words shared"
        return (f"{location(self.test.source, self.test.line)} ~ "
                f"{location(self.train.source, self.train.line)} ({what})")


class LeakageError(DataError):
    """The test data overlaps the training data and the user did not allow it."""


def user_words(example: Example) -> frozenset[str]:
    """The set of normalised words the user wrote (system and answers left out)."""
    try:
        prompt, _ = prompt_and_reference(example)
    except DataError:
        return frozenset()
    if isinstance(prompt, str):
        text = prompt
    else:
        text = " ".join(m["content"] for m in prompt if m["role"] == "user")
    return frozenset(normalize_answer(text).split())


def find_leaks(train: Sequence[Example], test: Sequence[Example],
               threshold: float = NEAR_THRESHOLD) -> list[Leak]:
    """Every test example that is an exact or near-exact copy of a training example."""
    by_place = {(ex.source, ex.line): ex for ex in test}
    leaks = {}
    problems = exact_leakage([("train", "", list(train)), ("test", "", list(test))])
    if problems:  # the partner of each, for the message
        first_of = {}
        for ex in train:
            first_of.setdefault(example_key(ex), ex)
    for problem in problems:
        ex = by_place[(problem.source, problem.line)]
        leaks[id(ex)] = Leak(ex, first_of[example_key(ex)], "exact", 1.0)
    for ex, partner, similarity in _near_duplicates(train, test, threshold):
        if id(ex) not in leaks:
            leaks[id(ex)] = Leak(ex, partner, "near", similarity)
    return sorted(leaks.values(), key=lambda leak: (leak.test.source, leak.test.line))


def _near_duplicates(train: Sequence[Example], test: Sequence[Example], threshold: float):
    """(test example, most similar train example, Jaccard) for pairs at or above ``threshold``.

    Words are ordered rarest first; a set ``s`` only needs its first ``|s| - ceil(t |s|) + 1``
    words indexed or probed, because two sets with Jaccard >= t must share one of those.
    """
    train_sets = [user_words(ex) for ex in train]
    test_sets = [user_words(ex) for ex in test]
    freq = Counter(w for s in train_sets + test_sets for w in s)

    def prefix(words: frozenset[str]) -> list[str]:
        ordered = sorted(words, key=lambda w: (freq[w], w))
        return ordered[: len(ordered) - math.ceil(threshold * len(ordered)) + 1]

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(train_sets):
        for w in prefix(words):
            index[w].append(i)
    for ex, words in zip(test, test_sets):
        if not words:
            continue
        best, best_sim = None, 0.0
        for i in {i for w in prefix(words) for i in index.get(w, ())}:
            other = train_sets[i]
            sim = len(words & other) / len(words | other)
            if sim > best_sim:
                best, best_sim = i, sim
        if best is not None and best_sim >= threshold:
            yield ex, train[best], best_sim


def leakage_summary(leaks: Sequence[Leak], n_test: int, train_path: str | None) -> dict:
    """The JSON the report keeps: counts, threshold and the first few pairs."""
    return {
        "checked_against": train_path,
        "test_examples": n_test,
        "exact": sum(leak.kind == "exact" for leak in leaks),
        "near": sum(leak.kind == "near" for leak in leaks),
        "near_threshold": NEAR_THRESHOLD,
        "examples": [str(leak) for leak in leaks[:LISTED]],
    }


def check_holdout(train: Sequence[Example], test: Sequence[Example], *, allow: bool,
                  train_path: str | None) -> tuple[dict, list[Leak]]:
    """Find leaks; raise LeakageError with counts unless ``allow``. Returns (summary, leaks)."""
    leaks = find_leaks(train, test)
    summary = leakage_summary(leaks, len(test), train_path)
    if leaks and not allow:
        raise LeakageError(describe(summary) + "\nremove them from the test file, or pass "
                           "--allow-leakage to evaluate anyway (the report will say so)")
    return summary, leaks


def describe(summary: dict) -> str:
    """One paragraph: how many test examples leak, of which kinds, and the first pairs."""
    total = summary["exact"] + summary["near"]
    lines = [f"{total} of {summary['test_examples']} test examples also appear in the training "
             f"data {summary['checked_against']}: {summary['exact']} exact, {summary['near']} "
             f"near-exact (user text sharing >= {summary['near_threshold']:.0%} of its words)"]
    lines += [f"  {line}" for line in summary["examples"]]
    if total > len(summary["examples"]):
        lines.append(f"  ... and {total - len(summary['examples'])} more")
    return "\n".join(lines)
