"""Label scoring: the cached-prompt scores equal scoring each full sequence from scratch."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.render import render_prompt
from tuneforge.eval.classify import ClassificationScores, classify, label_log_probs
from tuneforge.models.loading import load_model


def test_label_log_probs_equal_full_sequence_scoring():
    model, tok = load_model("tiny:llama")
    model.eval()
    messages = [{"role": "system", "content": "Route it."}, {"role": "user", "content": "card charged twice"}]
    candidates = ["Department: Billing\n", "Department: Sales\n", "Department: Returns\n"]
    scores = label_log_probs(model, tok, messages, candidates, bf16=False)
    fast = label_log_probs(model, tok, messages, candidates, bf16=True)
    assert fast == [pytest.approx(x, abs=0.1) for x in scores]
    prompt = render_prompt(messages, tok)
    for cand, score in zip(candidates, scores):
        ids = prompt + tok(cand, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
        assert abs(score - expected) < 1e-3, (cand, score, expected)


def test_classify_and_metrics():
    model, tok = load_model("tiny:llama")
    prompts = [[{"role": "user", "content": f"ticket {i}"}] for i in range(4)]
    result = classify(model, tok, prompts, ["a", "b", "a", "b"], ["a", "b"])
    assert len(result.predicted) == 4 and set(result.predicted) <= {"a", "b"}
    s = ClassificationScores(labels=["a", "b"], gold=["a", "a", "b", "b"], predicted=["a", "b", "b", "b"])
    assert s.accuracy == 0.75
    per = s.per_label()
    assert per["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert abs(s.macro_f1 - (2 / 3 + 0.8) / 2) < 1e-9


def test_shared_prefix_cache_gives_the_scores_of_whole_prompts():
    from tuneforge.data.templates import prompt_ids
    from tuneforge.eval.classify import SharedPrefix

    model, tok = load_model("tiny:llama")
    model.eval()
    system = {"role": "system", "content": "Route the ticket to Billing, Sales or Returns. " * 3}
    shot = [{"role": "user", "content": "refund please"},
            {"role": "assistant", "content": "Department: Returns\n"}]
    prompts = [[system, *shot, {"role": "user", "content": f"ticket {i}: card charged"}]
               for i in range(3)]
    candidates = ["Department: Billing\n", "Department: Sales\n", "Department: Returns\n"]
    ids = [prompt_ids(p, tok) for p in prompts]
    shared = SharedPrefix.of(model, ids, bf16=False)
    assert shared is not None and all(shared.starts(p) for p in ids)
    assert len(shared.ids) > 30 and any(ids[0][len(shared.ids)] != p[len(shared.ids)] for p in ids)
    for prompt in prompts:
        whole = label_log_probs(model, tok, prompt, candidates, bf16=False)
        cached = label_log_probs(model, tok, prompt, candidates, bf16=False, shared=shared)
        assert cached == [pytest.approx(x, abs=1e-4) for x in whole]
    assert SharedPrefix.of(model, ids[:1]) is None
    assert SharedPrefix.of(model, [[1, 2, 3], [1, 2, 4]]) is None  # too short to be worth it
