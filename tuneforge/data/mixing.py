"""Multi-task mixing: how many training examples each task contributes to an epoch.

Each task gets a probability: in proportion to its weight (``mixing=weights``), or to its size
raised to ``1 / temperature`` (``mixing=temperature``, as in T5/mT5: temperature 1 is
proportional to size, higher temperatures lift small tasks towards an even share). An epoch of
the mixture has as many examples as all tasks together; each slot draws its task from those
probabilities with a seeded generator, and each task hands out its examples in a seeded
shuffled order, starting a new shuffle when it runs out (a small task with a large share is
repeated, a large task with a small share is subsampled). The training loop then batches and
shuffles the mixture as it does any training set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def task_probabilities(sizes: Sequence[int], weights: Sequence[float], *, mixing: str = "weights",
                       temperature: float = 1.0) -> list[float]:
    """The share of each task in the mixture (sums to 1)."""
    if mixing == "weights":
        raw = [float(w) for w in weights]
    elif mixing == "temperature":
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(f"unknown mixing {mixing!r}; use weights or temperature")
    total = sum(raw)
    if total <= 0 or any(r < 0 for r in raw):
        raise ValueError(f"mixing needs non-negative shares with a positive sum, got {raw}")
    return [r / total for r in raw]


def mix(sizes: Sequence[int], probabilities: Sequence[float], *, total: int | None = None,
        seed: int = 0) -> list[tuple[int, int]]:
    """``(task index, example index)`` for each of ``total`` slots (default: ``sum(sizes)``).

    Deterministic for a given seed, so a resumed run sees the same mixture.
    """
    if len(sizes) != len(probabilities):
        raise ValueError(f"{len(sizes)} tasks but {len(probabilities)} probabilities")
    total = sum(sizes) if total is None else total
    rng = random.Random(seed)
    usable = [i for i, n in enumerate(sizes) if n > 0]
    tasks = rng.choices(usable, weights=[probabilities[i] for i in usable], k=total)
    orders: list[list[int]] = [[] for _ in sizes]
    out = []
    for task in tasks:
        if not orders[task]:  # a fresh shuffle of the task, consumed from the end
            orders[task] = list(range(sizes[task]))
            rng.shuffle(orders[task])
        out.append((task, orders[task].pop()))
    return out
