"""Task metrics as pure functions: lists of strings in, plain floats and dicts out.

Classification: accuracy, precision/recall/F1 per class, their macro averages (every class
counts the same) and micro averages (every example counts the same), and the confusion matrix.
Generation: exact match and token F1 after light normalisation (SQuAD style, minus the
English-only article removal), ROUGE-L through ``rouge-score`` and corpus BLEU through
``sacrebleu``, JSON validity for structured outputs. Every score lies in [0, 1]; BLEU is
sacreBLEU's 0-100 score divided by 100 so that all figures share one scale.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


# --------------------------------------------------------------------------------------------
# Classification


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str],
                     labels: Sequence[str]) -> list[list[int]]:
    """``matrix[i][j]`` counts examples of gold label ``labels[i]`` predicted as ``labels[j]``.

    Pairs whose gold or predicted label is not in ``labels`` are not counted.
    """
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return matrix


def _prf(tp: int, n_predicted: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0 where the denominator is 0 (no prediction / no gold example)."""
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(gold: Sequence[str], predicted: Sequence[str],
                           labels: Sequence[str]) -> dict:
    """Accuracy, per-class and averaged precision/recall/F1, and the confusion matrix.

    Macro averages are taken over the classes that occur in ``gold`` (a class with no test
    example has no defined recall; counting it as 0 would punish the model for the test set).
    Micro averages pool every decision: with one label per example and every prediction in
    ``labels`` they all equal the accuracy. Keys are stable: ``accuracy``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``micro_precision``,
    ``micro_recall``, ``micro_f1``, ``n``, ``per_class``, ``confusion_matrix``.
    """
    gold, predicted = list(gold), list(predicted)
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    per_class: dict[str, dict[str, float]] = {}
    tp_all = 0
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        n_pred = sum(p == label for p in predicted)
        n_gold = sum(g == label for g in gold)
        precision, recall, f1 = _prf(tp, n_pred, n_gold)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
        tp_all += tp
    present = [v for v in per_class.values() if v["support"]]
    macro = {k: sum(v[k] for v in present) / len(present) if present else 0.0
             for k in ("precision", "recall", "f1")}
    in_labels = set(labels)
    micro = _prf(tp_all, sum(p in in_labels for p in predicted), sum(g in in_labels for g in gold))
    return {
        "n": len(gold),
        "accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else 0.0,
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "micro_precision": micro[0],
        "micro_recall": micro[1],
        "micro_f1": micro[2],
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(gold, predicted, labels),
    }


# --------------------------------------------------------------------------------------------
# Generation


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: "The  cat!" -> "the cat"."""
    return " ".join(_WORD.findall(text.lower()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalised words shared by prediction and reference.

    Two empty texts agree (1.0); one empty text against a non-empty one scores 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return _prf(common, len(pred), len(ref))[2]


class _WordTokenizer:
    """rouge-score's default tokenizer keeps only ASCII letters and digits; this keeps words
    of any script, matching :func:`normalize_answer`."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words) over the pairs."""
    from rouge_score import rouge_scorer

    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of the predictions against one reference each (sacreBLEU, 13a), in [0, 1]."""
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100


def is_json(text: str) -> bool:
    """Whether ``text`` (stripped, optionally inside a ``` fence) parses as JSON."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def generation_metrics(predictions: Sequence[str], references: Sequence[str], *,
                       check_json: bool = False) -> dict:
    """``exact_match``, ``token_f1``, ``rouge_l``, ``bleu`` (and ``json_valid``), plus ``n``."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    pairs = list(zip(predictions, references))
    out = {
        "n": n,
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n if n else 0.0,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n if n else 0.0,
        "rouge_l": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
    }
    if check_json:
        out["json_valid"] = sum(is_json(p) for p in predictions) / n if n else 0.0
    return out


def perplexity(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood in nats, capped to stay a finite float."""
    return math.exp(min(mean_nll, 50.0))
