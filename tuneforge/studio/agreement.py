"""Agreement between labelers: Cohen's kappa for choices, Krippendorff's alpha for ratings.

Both say how far labelers agree beyond what chance alone would give: 1 is perfect agreement,
0 is what labelers answering at random (with their own answer frequencies) would reach, and
below 0 is systematic disagreement. Each is ``None`` where it is undefined: no item judged by
two labelers, or every answer the same value (chance agreement is then already perfect).

- Cohen's kappa compares two labelers on the items both judged; the category of a choice is
  the position of the chosen candidate (A, B, ...), which every labeler sees in the same order.
- Krippendorff's alpha takes any number of labelers and missing answers. Ratings use the
  *interval* metric (squared difference): a 1-5 scale with equal steps, where 2 against 5
  disagrees more than 4 against 5. ``ordinal`` and ``nominal`` are here too, for other scales.

Written from the definitions (Cohen 1960; Krippendorff, "Computing Krippendorff's
Alpha-Reliability", 2011), with the coincidence matrix of the latter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

ALPHA_METRICS = ("interval", "ordinal", "nominal")


def cohen_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa of two labelers from ``(first's answer, second's answer)`` per item.

    ``kappa = (p_o - p_e) / (1 - p_e)``: ``p_o`` the share of items with the same answer,
    ``p_e`` the chance of the same answer were each labeler to draw from their own answer
    frequencies, ``sum_c p1(c) * p2(c)``.
    """
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in first) / (n * n)
    if expected == 1:  # both gave one and the same answer throughout: kappa is 0/0
        return None
    return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class PairKappa:
    """Cohen's kappa of two labelers on the ``items`` both answered."""

    first: str
    second: str
    items: int
    agreed: int
    kappa: float | None


def pairwise_kappa(answers: Mapping[str, Mapping[Hashable, Hashable]]) -> list[PairKappa]:
    """Kappa for every two labelers, from each labeler's ``{item: category}``, in name order."""
    out = []
    for first, second in combinations(sorted(answers), 2):
        shared = sorted(set(answers[first]) & set(answers[second]), key=repr)
        pairs = [(answers[first][item], answers[second][item]) for item in shared]
        agreed = sum(a == b for a, b in pairs)
        out.append(PairKappa(first, second, len(pairs), agreed, cohen_kappa(pairs)))
    return out


def krippendorff_alpha(
    units: Iterable[Sequence[float]], metric: str = "interval"
) -> float | None:
    """Krippendorff's alpha from the values each unit was given (one per labeler who answered).

    ``alpha = 1 - D_o / D_e``, from the coincidence matrix ``o[c][k]``: every unit with
    ``m >= 2`` values adds ``1 / (m - 1)`` for each ordered pair of its values given by two
    different labelers (units with one value cannot be compared and are left out). With
    ``n_c`` the row sums and ``n`` the total, ``D_o = sum o[c][k] d(c, k) / n`` and
    ``D_e = sum n_c n_k d(c, k) / (n (n - 1))``, where ``d`` is the metric's squared distance.
    """
    if metric not in ALPHA_METRICS:
        raise ValueError(f"metric {metric!r} unknown; use one of {', '.join(ALPHA_METRICS)}")
    coincidences: Counter[tuple[float, float]] = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidences[(c, k)] += 1 / (m - 1)
    totals: Counter[float] = Counter()
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    if n == 0:
        return None
    distance = _distance(metric, totals)
    observed = sum(w * distance(c, k) for (c, k), w in coincidences.items()) / n
    expected = sum(
        totals[c] * totals[k] * distance(c, k) for c in totals for k in totals
    ) / (n * (n - 1))
    if expected == 0:  # one value throughout: nothing to tell agreement from chance
        return None
    return 1 - observed / expected


def _distance(metric: str, totals: Mapping[float, float]):
    """The squared distance ``d(c, k)`` of a metric; the ordinal one depends on how often
    each value was given (the values between c and k count by their frequency)."""
    if metric == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    ordered = sorted(totals)

    def ordinal(c: float, k: float) -> float:
        low, high = min(c, k), max(c, k)
        between = sum(totals[g] for g in ordered if low <= g <= high)
        return (between - (totals[c] + totals[k]) / 2) ** 2

    return ordinal


def rating_units(answers: Mapping[str, Mapping[Hashable, float]]) -> list[list[float]]:
    """Per item (in a stable order), the values labelers gave it: alpha's input from each
    labeler's ``{item: rating}``."""
    items: dict[Hashable, list[float]] = {}
    for labeler in sorted(answers):
        for item, value in answers[labeler].items():
            items.setdefault(item, []).append(value)
    return [items[item] for item in sorted(items, key=repr)]
