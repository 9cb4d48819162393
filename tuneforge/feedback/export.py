"""Turning collected judgements into the training-data formats of :mod:`tuneforge.data.formats`.

Every target takes whatever kinds of answer can honestly be converted to it; answers are
grouped per prompt and annotator, so one person's ratings of K candidates form one ranking:

========  =====================================================================================
target    from
========  =====================================================================================
pairs     a choice: the chosen candidate against each other one; a ranking: every pair (i, j)
          with i ranked above j; ratings: every two candidates with different ratings
ranking   a ranking as given; ratings of 2+ candidates (with ``scores``), unless all equal;
          a choice between exactly two candidates
rating    each rating
unpaired  a rating of ``good_min`` or more is desirable, ``bad_max`` or less undesirable (the
          middle is left out); a choice: chosen desirable, the others undesirable; a ranking:
          the best desirable, the worst undesirable
========  =====================================================================================

Skips are never exported. A record whose response is empty, or a pair of identical responses,
is dropped and counted. Each record carries ``meta`` (session, prompt position, annotator).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from tuneforge.feedback.store import Candidate, FeedbackError, FeedbackStore, Judgement, Session

EXPORT_TARGETS = ("pairs", "ranking", "rating", "unpaired")
# The data format each target's file is read as (tuneforge.data.formats.FORMATS).
DATA_FORMAT = {
    "pairs": "preference",
    "ranking": "ranking",
    "rating": "rating",
    "unpaired": "unpaired",
}


@dataclass
class ExportResult:
    path: Path
    records: int = 0
    sources: Counter = field(default_factory=Counter)  # answer kind -> records made from it
    dropped: Counter = field(default_factory=Counter)  # reason -> records left out


@dataclass
class _Group:
    """One annotator's answers about one prompt."""

    judgements: list[Judgement]

    @property
    def first(self) -> Judgement:
        return self.judgements[0]

    def ratings(self) -> dict[int, int]:
        return {j.candidate_id: j.value for j in self.judgements if j.kind == "rating"}

    def one(self, kind: str) -> Judgement | None:
        return next((j for j in self.judgements if j.kind == kind), None)


def export_feedback(
    store: FeedbackStore,
    to: str,
    out: str | Path,
    *,
    session: str | None = None,
    annotator: str | None = None,
    good_min: int = 4,
    bad_max: int = 2,
) -> ExportResult:
    """Write the ``to`` records of a database (or one session, one annotator) as JSONL."""
    if to not in EXPORT_TARGETS:
        raise FeedbackError(f"export target {to!r} unknown; use one of {', '.join(EXPORT_TARGETS)}")
    if bad_max >= good_min:
        raise FeedbackError(f"--bad-max ({bad_max}) must be below --good-min ({good_min})")
    chosen: Session | None = store.session(session) if session else None
    result = ExportResult(Path(out))
    records = []
    for group in _groups(store, chosen, annotator):
        for kind, record in _BUILDERS[to](group, result, good_min, bad_max):
            record["meta"] = _meta(group.first)
            records.append(record)
            result.sources[kind] += 1
    if not records:
        raise FeedbackError(_nothing_message(store, to, result))
    _write_jsonl(result.path, records)
    result.records = len(records)
    return result


def _groups(
    store: FeedbackStore, session: Session | None, annotator: str | None
) -> Iterator[_Group]:
    grouped: dict[tuple[int, str], list[Judgement]] = defaultdict(list)
    for j in store.judgements(session):
        if j.kind != "skip" and (annotator is None or j.annotator == annotator):
            grouped[(j.prompt.id, j.annotator)].append(j)
    for judgements in grouped.values():
        yield _Group(judgements)


def _nothing_message(store: FeedbackStore, to: str, result: ExportResult) -> str:
    wanted = {
        "pairs": "choices, rankings, or ratings that differ within a prompt",
        "ranking": "rankings, ratings of 2+ candidates of a prompt, or choices between two",
        "rating": "ratings",
        "unpaired": "choices, rankings, or ratings outside the middle of the scale",
    }[to]
    dropped = "".join(f"; dropped: {n} {why}" for why, n in result.dropped.items())
    return f"{store.path}: nothing to export as {to}: it needs {wanted}{dropped}"


# ------------------------------------------------------------------------------ records


def _prompt_field(messages: list[dict]) -> str | list[dict]:
    """Plain text for a lone user message (the common case); the messages otherwise."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def _meta(j: Judgement) -> dict:
    return {"session": j.session.name, "prompt": j.prompt.position, "annotator": j.annotator}


def _texts(group: _Group, ids: list[int], result: ExportResult) -> list[str] | None:
    """The candidates' texts, or None (counted as dropped) if one is empty."""
    by_id: dict[int, Candidate] = {c.id: c for c in group.first.candidates}
    texts = [by_id[i].text for i in ids]
    if any(not t.strip() for t in texts):
        result.dropped["with an empty response"] += 1
        return None
    return texts


def _pair(group: _Group, better: int, worse: int, result: ExportResult) -> dict | None:
    texts = _texts(group, [better, worse], result)
    if texts is None:
        return None
    if texts[0] == texts[1]:
        result.dropped["pairs of identical responses"] += 1
        return None
    prompt = _prompt_field(group.first.prompt.messages)
    return {"prompt": prompt, "chosen": texts[0], "rejected": texts[1]}


def _choice_order(j: Judgement) -> list[int]:
    """The chosen candidate first, then the others in the order they were shown."""
    return [j.value] + [c.id for c in j.candidates if c.id != j.value]


def _pairs(group: _Group, result: ExportResult, *_: int) -> Iterator[tuple[str, dict]]:
    candidates: list[tuple[str, int, int]] = []
    if choice := group.one("choice"):
        order = _choice_order(choice)
        candidates += [("choice", order[0], other) for other in order[1:]]
    if ranking := group.one("ranking"):
        candidates += [("ranking", a, b) for a, b in combinations(ranking.value, 2)]
    ratings = group.ratings()
    for a, b in combinations(sorted(ratings, key=lambda c: -ratings[c]), 2):
        if ratings[a] != ratings[b]:
            candidates.append(("rating", a, b))
    for kind, better, worse in candidates:
        if (record := _pair(group, better, worse, result)) is not None:
            yield kind, record


def _distinct(texts: list[str], result: ExportResult,
              scores: list[float] | None = None) -> tuple[list[str], list[float] | None] | None:
    """A ranking without repeated responses (after collapsing whitespace, as `data check`
    compares them): each text at its best place; None (counted) when fewer than two are left."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        key = " ".join(text.split())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < 2:
        result.dropped["rankings of identical responses"] += 1
        return None
    return [texts[i] for i in keep], None if scores is None else [scores[i] for i in keep]


def _ranking(group: _Group, result: ExportResult, *_: int) -> Iterator[tuple[str, dict]]:
    prompt = _prompt_field(group.first.prompt.messages)
    if ranking := group.one("ranking"):
        if (texts := _texts(group, ranking.value, result)) is not None:
            if (kept := _distinct(texts, result)) is not None:
                yield "ranking", {"prompt": prompt, "responses": kept[0]}
    choice = group.one("choice")
    if choice and len(choice.candidates) == 2:
        if (texts := _texts(group, _choice_order(choice), result)) is not None:
            if (kept := _distinct(texts, result)) is not None:
                yield "choice", {"prompt": prompt, "responses": kept[0]}
    ratings = group.ratings()
    if len(ratings) >= 2:
        if len(set(ratings.values())) == 1:
            result.dropped["sets of equal ratings"] += 1
        elif (texts := _texts(group, list(ratings), result)) is not None:
            order = sorted(range(len(texts)), key=lambda i: -list(ratings.values())[i])
            scores = [list(ratings.values())[i] for i in order]
            if (kept := _distinct([texts[i] for i in order], result, scores)) is not None:
                yield "rating", {"prompt": prompt, "responses": kept[0], "scores": kept[1]}


def _rating(group: _Group, result: ExportResult, *_: int) -> Iterator[tuple[str, dict]]:
    prompt = _prompt_field(group.first.prompt.messages)
    for candidate_id, rating in group.ratings().items():
        if (texts := _texts(group, [candidate_id], result)) is not None:
            yield "rating", {"prompt": prompt, "response": texts[0], "rating": rating}


def _unpaired(
    group: _Group, result: ExportResult, good_min: int, bad_max: int
) -> Iterator[tuple[str, dict]]:
    labelled: list[tuple[str, int, bool]] = []
    if choice := group.one("choice"):
        labelled += [("choice", c, c == choice.value) for c in _choice_order(choice)]
    if ranking := group.one("ranking"):
        labelled += [("ranking", ranking.value[0], True), ("ranking", ranking.value[-1], False)]
    for candidate_id, rating in group.ratings().items():
        if rating >= good_min or rating <= bad_max:
            labelled.append(("rating", candidate_id, rating >= good_min))
    prompt = _prompt_field(group.first.prompt.messages)
    for kind, candidate_id, label in labelled:
        if (texts := _texts(group, [candidate_id], result)) is not None:
            yield kind, {"prompt": prompt, "completion": texts[0], "label": label}


_BUILDERS = {"pairs": _pairs, "ranking": _ranking, "rating": _rating, "unpaired": _unpaired}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Write to a temporary file and rename it, so a reader never sees half an export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)
