"""Near-duplicate texts: MinHash LSH to find candidates fast, exact Jaccard to confirm them.

A text is normalised (lowercased, whitespace collapsed) and cut into word 3-gram shingles:
word n-grams ignore how lines are wrapped and weigh a changed word by the three shingles it
touches, so "my order 1234 never arrived" and "my order 1235 never arrived" share most of them
while two tickets about different problems share few. A text of three words or fewer is one
shingle of all its words. MinHash with 128 permutations sketches each shingle set, and LSH
(datasketch) turns "all pairs above the threshold" into bucket lookups, with bands chosen so a
pair right at the threshold is missed with probability under 0.1% (:func:`lsh_bands`; more
similar pairs even less). Every candidate pair is then confirmed on the exact Jaccard of its
shingle sets, so LSH's false positives never reach a report and a pair at the threshold is
decided exactly. Fixed seed: the same input gives the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_THRESHOLD = 0.85
NUM_PERM = 128
SHINGLE = 3
LSH_MISS = 1e-3  # chance that LSH misses a pair right at the threshold (see lsh_bands)


def shingles(text: str, size: int = SHINGLE) -> frozenset[str]:
    """Word ``size``-grams of the lowercased, whitespace-collapsed text."""
    words = text.lower().split()
    if len(words) <= size:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset[str] | str, b: frozenset[str] | str) -> float:
    """Jaccard similarity of two shingle sets (or of two texts' shingles)."""
    a = shingles(a) if isinstance(a, str) else a
    b = shingles(b) if isinstance(b, str) else b
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _minhashes(sets: Sequence[frozenset[str]], seed: int) -> list:
    from datasketch import MinHash

    # bulk shares one set of permutations across all sketches instead of drawing it per text
    return MinHash.bulk(
        ([s.encode("utf-8") for s in sorted(sh)] for sh in sets), num_perm=NUM_PERM, seed=seed
    )


def _lsh(threshold: float):
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=lsh_bands(threshold))


def lsh_bands(threshold: float, miss: float = LSH_MISS) -> tuple[int, int]:
    """``(bands, rows)`` for LSH: the most rows per band (fewest false candidates to confirm)
    with which a pair exactly at ``threshold`` still shares a band with probability at least
    ``1 - miss``. A pair of Jaccard ``s`` agrees on a row with probability ``s``, so on a band
    with ``s**rows`` and on some band with ``1 - (1 - s**rows)**bands``; more similar pairs are
    missed even less. At 0.85: 18 bands of 7 rows."""
    for rows in range(NUM_PERM, 0, -1):
        bands = NUM_PERM // rows
        if 1 - (1 - threshold**rows) ** bands >= 1 - miss:
            return bands, rows
    return NUM_PERM, 1


def similar_pairs(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD,
                  seed: int = 0) -> list[tuple[int, int, float]]:
    """``(i, j, jaccard)`` with ``i < j`` for every pair of ``texts`` at least ``threshold``
    similar, sorted: the edges that :func:`near_duplicate_clusters` joins into clusters."""
    sets = [shingles(t) for t in texts]
    return _pairs(sets, sets, threshold, seed, same=True)


def near_duplicate_clusters(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD,
                            seed: int = 0) -> list[list[int]]:
    """Clusters (2+ indices, ascending; clusters ordered by first index) of texts whose exact
    shingle Jaccard with another member is at least ``threshold``."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in similar_pairs(texts, threshold, seed):
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def near_matches(texts: Sequence[str], others: Sequence[str],
                 threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> list[tuple[int, int, float]]:
    """``(i, j, jaccard)`` for every ``texts[i]`` and ``others[j]`` at least ``threshold``
    similar (for leakage between a training set and its evaluation sets), sorted."""
    return _pairs([shingles(t) for t in texts], [shingles(t) for t in others], threshold, seed,
                  same=False)


def _pairs(sets: list[frozenset[str]], others: list[frozenset[str]], threshold: float,
           seed: int, *, same: bool) -> list[tuple[int, int, float]]:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if threshold >= 1.0:  # exact only: equal shingle sets
        index: dict[frozenset[str], list[int]] = {}
        for j, s in enumerate(others):
            index.setdefault(s, []).append(j)
        return sorted((i, j, 1.0) for i, s in enumerate(sets) for j in index.get(s, [])
                      if not same or j > i)
    lsh = _lsh(threshold)
    other_hashes = _minhashes(others, seed)
    with lsh.insertion_session() as session:
        for j, minhash in enumerate(other_hashes):
            session.insert(j, minhash)
    hashes = other_hashes if same else _minhashes(sets, seed)
    found = []
    for i, (s, minhash) in enumerate(zip(sets, hashes, strict=True)):
        for j in lsh.query(minhash):
            if same and j <= i:
                continue
            score = jaccard(s, others[j])
            if score >= threshold:
                found.append((i, j, score))
    return sorted(found)
