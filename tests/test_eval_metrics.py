"""Task metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from tuneforge.eval.metrics import (
    bleu,
    classification_metrics,
    confusion_matrix,
    exact_match,
    generation_metrics,
    is_json,
    perplexity,
    rouge_l,
    token_f1,
)

GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]


def test_classification_metrics_by_hand():
    m = classification_metrics(GOLD, PRED, ["a", "b", "c"])
    # a: tp 2 of 2 predicted, 3 gold; b: tp 1 of 2 predicted, 2 gold; c: tp 1 of 2 predicted, 1 gold
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3),
                                   "f1": pytest.approx(0.8), "support": 3}
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["c"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                   "support": 1}
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # one label per example, every prediction a known label: micro P = R = F1 = accuracy
    for key in ("micro_precision", "micro_recall", "micro_f1"):
        assert m[key] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["n"] == 6


def test_macro_skips_classes_without_test_examples_and_micro_counts_unknown_predictions():
    # "d" is never gold: it has no recall, so macro averages leave it out; predicting it
    # still lowers micro precision
    m = classification_metrics(["a", "b"], ["a", "d"], ["a", "b", "d"])
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["micro_precision"] == pytest.approx(0.5)
    # a prediction outside the label set lowers micro recall but not micro precision
    m = classification_metrics(["a", "b"], ["a", "zzz"], ["a", "b"])
    assert (m["micro_precision"], m["micro_recall"]) == (1.0, 0.5)
    assert m["confusion_matrix"] == [[1, 0], [0, 0]]


def test_confusion_matrix_rows_are_gold_columns_predicted():
    assert confusion_matrix(["x", "y", "y"], ["y", "y", "x"], ["x", "y"]) == [[0, 1], [1, 1]]
    with pytest.raises(ValueError):
        classification_metrics(["a"], [], ["a"])


def test_exact_match_and_token_f1():
    assert exact_match("The  Cat!", "the cat") == 1.0
    assert exact_match("the cat", "a cat") == 0.0
    # 3 shared words; precision 3/3, recall 3/4 -> F1 6/7
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    # bags, not sets: "the" twice in the reference matches only once in the prediction
    assert token_f1("the", "the the") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert token_f1("Grüße, Zoë", "grüße zoë") == 1.0  # words of any script


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    assert rouge_l(["x y", "a b"], ["x y", "c d"]) == pytest.approx(0.5)


def test_bleu_against_a_hand_computed_score():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-4)
    assert bleu(["one two three four"], ["one two three four"]) == pytest.approx(1.0)


def test_json_validity_and_generation_metrics():
    assert is_json('{"a": 1}') and is_json('```json\n[1, 2]\n```') and not is_json("{a: 1}")
    m = generation_metrics(['{"x": 1}', "nope"], ['{"x": 1}', '{"y": 2}'], check_json=True)
    assert m["json_valid"] == 0.5 and m["exact_match"] == 0.5 and m["n"] == 2
    assert set(m) == {"n", "exact_match", "token_f1", "rouge_l", "bleu", "json_valid"}
    assert "json_valid" not in generation_metrics(["a"], ["a"])


def test_perplexity_is_exp_of_the_mean_nll():
    assert perplexity(math.log(10)) == pytest.approx(10)
    assert math.isfinite(perplexity(1e9))
