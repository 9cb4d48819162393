"""Task inference (type, labels, answer layout) and label scoring of raw and chat prompts."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import LABELS, chat_ticket_records, ticket_records
from helpers import write_jsonl

from tuneforge.config import TaskConfig
from tuneforge.data.formats import load_examples
from tuneforge.errors import DataError
from tuneforge.eval.classify import classify, label_log_probs
from tuneforge.eval.tasks import gold_label, read_labels, resolve_task
from tuneforge.models.loading import load_model
from tuneforge.models.tiny import byte_tokenizer


def _load(tmp_path, records, name="x.jsonl"):
    return load_examples(write_jsonl(tmp_path / name, records))


def test_classification_records_are_scored_label_then_end_of_turn(tmp_path):
    test = _load(tmp_path, ticket_records(6))
    spec = resolve_task(TaskConfig(name="t"), test, [], byte_tokenizer())
    assert (spec.type, spec.labels, spec.prefix, spec.suffix) == ("classification", LABELS, "", "<|im_end|>")
    assert spec.candidates()[0] == "billing<|im_end|>"
    assert [gold_label(ex, spec) for ex in test[:3]] == LABELS


def test_chat_answers_with_a_label_line_need_the_labels_and_find_the_prefix(tmp_path):
    test = _load(tmp_path, chat_ticket_records(6))
    tok = byte_tokenizer()
    assert resolve_task(TaskConfig(name="t"), test, [], tok).type == "generation"
    spec = resolve_task(TaskConfig(name="t", labels=LABELS), test, [], tok)
    assert (spec.type, spec.prefix, spec.suffix) == ("classification", "Team: ", "\n")
    assert gold_label(test[1], spec) == "shipping"
    with pytest.raises(DataError, match=r"x\.jsonl:1: the answer 'Team: billing' does not end"):
        resolve_task(TaskConfig(name="t", labels=["shipping", "returns"]), test, [], tok)


def test_labels_come_from_a_list_a_json_file_or_lines(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "l.txt").write_text("x\n\ny\n")
    assert read_labels(str(tmp_path / "l.json")) == read_labels(str(tmp_path / "l.txt")) == ["x", "y"]
    assert read_labels(["1", 2]) == ["1", "2"] and read_labels(None) is None
    with pytest.raises(DataError, match="labels file .* not found"):
        read_labels(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="classification needs labels"):
        resolve_task(TaskConfig(name="t", type="classification"), _load(tmp_path, chat_ticket_records(2)),
                     [], byte_tokenizer())


def test_json_references_switch_on_json_validity(tmp_path):
    records = [{"prompt": f"extract {i}", "completion": json.dumps({"id": i})} for i in range(3)]
    spec = resolve_task(TaskConfig(name="t"), _load(tmp_path, records), [], byte_tokenizer())
    assert spec.type == "generation" and spec.check_json


def test_raw_prompt_scores_equal_full_sequence_scoring():
    model, tok = load_model("tiny:llama")
    model.eval()
    prompt, candidates = "Ticket: parcel late\nTeam:", [" shipping<|im_end|>", " billing<|im_end|>"]
    scores = label_log_probs(model, tok, prompt, candidates, bf16=False)
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    for cand, score in zip(candidates, scores):
        cand_ids = tok(cand, add_special_tokens=False)["input_ids"]
        assert cand_ids[-1] == tok.eos_token_id  # the end-of-answer token is scored too
        ids = prompt_ids + cand_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
        assert score == pytest.approx(expected, abs=1e-3)


def test_classify_predicts_the_most_likely_label_and_restores_train_mode():
    model, tok = load_model("tiny:llama")
    model.train()
    prompts = [[{"role": "user", "content": f"ticket {i}"}] for i in range(3)]
    result = classify(model, tok, prompts, ["a", "b", "a"], ["a", "b"], suffix="<|im_end|>", bf16=False)
    assert model.training
    for prompt, predicted in zip(prompts, result.predicted):
        scores = label_log_probs(model.eval(), tok, prompt, ["a<|im_end|>", "b<|im_end|>"], bf16=False)
        assert predicted == ["a", "b"][scores.index(max(scores))]
