"""The shipped feedback datasets: they load as their formats, regenerate byte for byte, keep
train and test apart, and order responses by the rubric the README states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.data.formats import load_examples, load_prompts
from tuneforge.data.validate import check_data

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "examples" / "data" / "feedback"
FORMATS = {
    "pairs": "preference",
    "rankings": "ranking",
    "ratings": "rating",
    "unpaired": "unpaired",
}


def test_regenerating_gives_the_same_files(tmp_path: Path) -> None:
    script = REPO / "scripts" / "make_feedback_data.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True
    )
    shipped = sorted(p.name for p in FOLDER.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (FOLDER / name).read_bytes(), name


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_file_loads_as_its_format_without_leakage(name: str) -> None:
    train, test = FOLDER / f"{name}_train.jsonl", FOLDER / f"{name}_test.jsonl"
    for path in (train, test):
        assert {ex.format for ex in load_examples(path)} == {FORMATS[name]}
    report = check_data(train, test=[test])
    assert report.ok and not report.warnings, report.render()


def test_rankings_and_pairs_follow_the_rubric() -> None:
    score = {"wrong_department": 1, "rude": 2, "no_next_step": 3, "rambling": 4, "good": 5}
    for ex in load_examples(FOLDER / "rankings_train.jsonl"):
        scores = [score[f] for f in ex.extra["flaws"]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    for ex in load_examples(FOLDER / "pairs_test.jsonl"):
        better, worse = ex.extra["flaws"]
        assert score[better] > score[worse]
    flaws_per_ticket: dict[str, set[str]] = {}
    for ex in load_examples(FOLDER / "ratings_train.jsonl"):
        assert abs(ex.scores[0] - score[ex.extra["flaw"]]) <= 1
        flaws_per_ticket.setdefault(ex.prompt_messages[-1].content, set()).add(ex.extra["flaw"])
    assert {len(flaws) for flaws in flaws_per_ticket.values()} == {2}  # two kinds per ticket


def test_prompt_files_load_with_their_reward_columns() -> None:
    for path in sorted(FOLDER.glob("arithmetic_*.jsonl")):
        for ex in load_prompts(path):
            assert isinstance(ex.extra["answer"], int)
            assert ex.prompt_messages[-1].content.endswith("'Answer: <number>'.")
    departments = json.loads((REPO / "examples/data/support/labels.json").read_text())
    for path in sorted(FOLDER.glob("replies_*.jsonl")):
        assert {ex.extra["department"] for ex in load_prompts(path)} <= set(departments)
