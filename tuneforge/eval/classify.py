"""Scoring a labelled task by the model's own likelihood of each label.

For every test prompt, each candidate answer ``prefix + label + suffix`` is scored as the sum of
its token log-probabilities after the prompt; the prediction is the best-scoring label. Both
base and tuned models are judged on the same footing (no parsing of free text, no luck in
sampling), and the prompt is run once per example: candidates reuse its KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneforge.data.render import render_prompt


@dataclass
class ClassificationScores:
    labels: list[str]
    gold: list[str]
    predicted: list[str]

    @property
    def accuracy(self) -> float:
        return sum(g == p for g, p in zip(self.gold, self.predicted)) / max(1, len(self.gold))

    def per_label(self) -> dict[str, dict[str, float]]:
        """precision, recall, F1 and support of each label."""
        out = {}
        for label in self.labels:
            tp = sum(g == p == label for g, p in zip(self.gold, self.predicted))
            n_pred = sum(p == label for p in self.predicted)
            n_gold = sum(g == label for g in self.gold)
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_gold if n_gold else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
        return out

    @property
    def macro_f1(self) -> float:
        scores = [v["f1"] for v in self.per_label().values() if v["support"]]
        return sum(scores) / max(1, len(scores))

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_label": self.per_label(),
                "n": len(self.gold)}


@torch.no_grad()
def label_log_probs(model, tokenizer, messages: list[dict], candidates: Sequence[str],
                    bf16: bool | None = None) -> list[float]:
    """Sum of log p(candidate tokens | conversation) for each candidate answer text.

    The prompt runs once; its KV cache is repeated for the candidates, which then run as one
    right-padded batch (bf16 autocast where the hardware has it, unless ``bf16=False``).
    Right padding needs no attention mask: under causal attention a real
    token never sees the padding that follows it, and padded positions are not scored.
    """
    prompt_ids = render_prompt(messages, tokenizer)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    with _autocast(model, bf16):
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
    cache, last_logits = out.past_key_values, out.logits[0, -1]
    cands = [_continuation_ids(tokenizer, prompt_text, prompt_ids, text) for text in candidates]
    width = max(len(c) for c in cands)
    batch = torch.tensor([c + [c[-1]] * (width - len(c)) for c in cands])
    cache.batch_repeat_interleave(len(cands))
    positions = torch.arange(len(prompt_ids), len(prompt_ids) + width).expand(len(cands), -1)
    with _autocast(model, bf16):
        step = model(input_ids=batch, past_key_values=cache, position_ids=positions, use_cache=True)
    logits = torch.cat([last_logits.expand(len(cands), 1, -1), step.logits[:, :-1]], dim=1)
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch[:, :, None])[..., 0]
    return [float(logp[i, : len(c)].sum()) for i, c in enumerate(cands)]


def _autocast(model, bf16: bool | None):
    """bf16 matmuls where the hardware has them: scoring needs ranks, not the last digit."""
    from tuneforge.train.loop import use_bf16

    device = next(model.parameters()).device
    enabled = use_bf16("auto", device) if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _continuation_ids(tokenizer, prompt_text: str, prompt_ids: list[int], text: str) -> list[int]:
    # Tokenise prompt and answer together, as training did, so boundary merges match.
    joint = tokenizer(prompt_text + text, add_special_tokens=False)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def classify(model, tokenizer, prompts: list[list[dict]], gold: list[str], labels: list[str],
             *, prefix: str = "", suffix: str = "", progress=None,
             bf16: bool | None = None) -> ClassificationScores:
    """Predict a label for each prompt by likelihood; ``progress`` is called after each one."""
    predicted = []
    for i, messages in enumerate(prompts):
        scores = label_log_probs(model, tokenizer, messages,
                                 [prefix + lab + suffix for lab in labels], bf16)
        predicted.append(labels[max(range(len(labels)), key=scores.__getitem__)])
        if progress:
            progress(i + 1)
    return ClassificationScores(labels=list(labels), gold=list(gold), predicted=predicted)
