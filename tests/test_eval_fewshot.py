"""k-shot prompt building: seeded, balanced draws; shots as prior turns; shots never trained."""

from __future__ import annotations

from collections import Counter

from eval_helpers import LABELS, chat_ticket_records, ticket_records
from helpers import write_jsonl

from tuneforge.data.formats import load_examples
from tuneforge.data.render import IGNORE_INDEX, render_sft
from tuneforge.eval.fewshot import SHOT_SEPARATOR, pick_shots, shots_as_context, with_shots
from tuneforge.models.tiny import byte_tokenizer


def _examples(tmp_path, records, name="train.jsonl"):
    return load_examples(write_jsonl(tmp_path / name, records))


def test_pick_shots_is_seeded_and_balanced_across_labels(tmp_path):
    pool = _examples(tmp_path, ticket_records(30))
    label_of = lambda ex: ex.label  # noqa: E731
    shots = pick_shots(pool, 6, seed=3, label_of=label_of)
    assert Counter(ex.label for ex in shots) == Counter({lab: 2 for lab in LABELS})
    assert [ex.line for ex in pick_shots(pool, 6, seed=3, label_of=label_of)] == [ex.line for ex in shots]
    assert [ex.line for ex in pick_shots(pool, 6, seed=4, label_of=label_of)] != [ex.line for ex in shots]
    # fewer shots than labels: each label at most once
    assert max(Counter(ex.label for ex in pick_shots(pool, 2, seed=0, label_of=label_of)).values()) == 1
    assert len(set(id(ex) for ex in pick_shots(pool, 30, label_of=label_of))) == 30
    assert pick_shots(pool, 0) == [] and len(pick_shots(pool, 4, seed=1)) == 4


def test_shots_become_prior_turns_after_the_system_message(tmp_path):
    shots = _examples(tmp_path, chat_ticket_records(2))
    question = [{"role": "system", "content": "Route the ticket."},
                {"role": "user", "content": "where is my parcel?"}]
    prompt = with_shots(question, shots)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert prompt[0] == question[0] and prompt[-1] == question[-1]
    assert prompt[1]["content"] == shots[0].messages[1].content
    assert prompt[2]["content"] == shots[0].messages[2].content  # the whole solved answer
    assert with_shots(question, []) == question


def test_raw_prompts_get_solved_prompts_in_front(tmp_path):
    records = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(2)]
    shots = _examples(tmp_path, records)
    assert with_shots("Q9:", shots) == SHOT_SEPARATOR.join(["Q0: A0", "Q1: A1", "Q9:"])


def test_shots_as_context_train_only_the_final_answer(tmp_path):
    tok = byte_tokenizer()
    shots = _examples(tmp_path, chat_ticket_records(3))
    example = _examples(tmp_path, chat_ticket_records(1, start=50), "test.jsonl")[0]
    alone, with_context = render_sft(example, tok), render_sft(shots_as_context(example, shots), tok)
    trained = [t for t in with_context.labels if t != IGNORE_INDEX]
    assert trained == [t for t in alone.labels if t != IGNORE_INDEX]
    assert len(with_context) > len(alone) + 3 * 20
