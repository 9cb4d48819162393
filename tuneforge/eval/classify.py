"""Scoring a labelled task by the model's own likelihood of each label.

For every test prompt, each candidate answer ``prefix + label + suffix`` is scored as the sum of
its token log-probabilities after the prompt; the prediction is the best-scoring label. Both
base and tuned models are judged on the same footing (no parsing of free text, no luck in
sampling, no way to "miss" the format), and the prompt is run once per example: candidates
reuse its KV cache. The tokens every prompt of an evaluation starts with (the system message,
the k solved examples of a few-shot prompt) run once for all of them (:class:`SharedPrefix`).
The suffix closes the answer (a newline, or the end-of-turn token), so a label that is a prefix
of another ("Account" / "Account Security") is not favoured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tuneforge.data.templates import Prompt, prompt_ids
from tuneforge.eval.metrics import classification_metrics


@dataclass
class ClassificationScores:
    """Gold and predicted labels of one evaluation, with the metrics derived from them."""

    labels: list[str]
    gold: list[str]
    predicted: list[str]

    def metrics(self) -> dict:
        """See :func:`tuneforge.eval.metrics.classification_metrics` for the keys."""
        return classification_metrics(self.gold, self.predicted, self.labels)

    @property
    def accuracy(self) -> float:
        return self.metrics()["accuracy"]

    def per_label(self) -> dict[str, dict[str, float]]:
        """precision, recall, F1 and support of each label."""
        return self.metrics()["per_class"]

    @property
    def macro_f1(self) -> float:
        return self.metrics()["macro_f1"]

    def to_dict(self) -> dict:
        return self.metrics()


@dataclass
class SharedPrefix:
    """The KV cache of the token ids that every prompt of an evaluation starts with.

    Scoring a prompt that starts with ``ids`` then runs only its own remaining tokens on a copy
    of ``cache``: a 3-shot prompt costs about what a zero-shot one does.
    """

    ids: list[int]
    cache: object

    MIN_TOKENS = 16  # below this, copying the cache costs more than it saves

    @classmethod
    @torch.no_grad()
    def of(cls, model, prompts: Sequence[list[int]], bf16: bool | None = None,
           ) -> SharedPrefix | None:
        """The longest prefix shared by all ``prompts`` (leaving each at least one token of its
        own), run once; None when there are fewer than two prompts or it is short."""
        if len(prompts) < 2:
            return None
        n = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for other in prompts[1:]:
            n = next((i for i in range(n) if other[i] != first[i]), n)
        if n < cls.MIN_TOKENS:
            return None
        with _autocast(model, bf16):
            out = model(input_ids=torch.tensor([first[:n]]), use_cache=True, logits_to_keep=1)
        return cls(list(first[:n]), out.cache)

    def starts(self, prompt: list[int]) -> bool:
        return len(prompt) > len(self.ids) and prompt[: len(self.ids)] == self.ids


@torch.no_grad()
def score_continuations(model, prompt: list[int], continuations: Sequence[list[int]],
                        bf16: bool | None = None, shared: SharedPrefix | None = None,
                        ) -> list[float]:
    """Sum of log p(continuation tokens | prompt) for each continuation (token ids).

    The prompt ``[P]`` runs once (after ``shared``'s cached tokens when it starts with them);
    its KV cache is repeated for the ``C`` continuations, which then run as one right-padded
    ``[C, W]`` batch (bf16 autocast where the hardware has it, unless ``bf16=False``). Right
    padding needs no attention mask: under causal attention a real token never sees the padding
    that follows it, and padded positions are not scored.
    """
    start, cache = 0, None
    if shared is not None and shared.starts(prompt):
        start, cache = len(shared.ids), copy.deepcopy(shared.cache)
    with _autocast(model, bf16):
        out = model(input_ids=torch.tensor([prompt[start:]]), cache=cache, use_cache=True,
                    position_ids=torch.arange(start, len(prompt))[None], logits_to_keep=1)
    cache, last_logits = out.cache, out.logits[0, -1]  # last_logits: [V]
    n = len(continuations)
    width = max(len(c) for c in continuations)
    batch = torch.tensor([c + [c[-1]] * (width - len(c)) for c in continuations])  # [C, W]
    cache.batch_repeat_interleave(n)
    positions = torch.arange(len(prompt), len(prompt) + width).expand(n, -1)
    with _autocast(model, bf16):
        step = model(input_ids=batch, cache=cache, position_ids=positions, use_cache=True)
    logits = torch.cat([last_logits.expand(n, 1, -1), step.logits[:, :-1]], dim=1)  # [C, W, V]
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch[:, :, None])[..., 0]
    return [float(logp[i, : len(c)].sum()) for i, c in enumerate(continuations)]


def label_log_probs(model, tokenizer, prompt: Prompt, candidates: Sequence[str],
                    bf16: bool | None = None, shared: SharedPrefix | None = None) -> list[float]:
    """Sum of log p(candidate tokens | prompt) for each candidate answer text.

    ``prompt`` is a conversation (rendered with the chat template) or raw prompt text; the
    candidates are tokenised as training tokenises an answer after that prompt.
    """
    ids = prompt_ids(prompt, tokenizer)
    if isinstance(prompt, str):  # raw completions are tokenised on their own in training
        cands = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in candidates]
    else:
        prompt_text = tokenizer.decode(ids, skip_special_tokens=False)
        cands = [_continuation_ids(tokenizer, prompt_text, ids, text) for text in candidates]
    return score_continuations(model, ids, cands, bf16, shared)


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


def classify(model, tokenizer, prompts: Sequence[Prompt], gold: list[str], labels: list[str],
             *, prefix: str = "", suffix: str = "", progress: Callable[[int], None] | None = None,
             bf16: bool | None = None) -> ClassificationScores:
    """Predict a label for each prompt by likelihood; ``progress`` is called after each one."""
    predicted = []
    was_training = model.training
    model.eval()
    try:
        shared = SharedPrefix.of(model, [prompt_ids(p, tokenizer) for p in prompts], bf16)
        for i, prompt in enumerate(prompts):
            scores = label_log_probs(model, tokenizer, prompt,
                                     [prefix + lab + suffix for lab in labels], bf16, shared)
            predicted.append(labels[max(range(len(labels)), key=scores.__getitem__)])
            if progress:
                progress(i + 1)
    finally:
        model.train(was_training)
    return ClassificationScores(labels=list(labels), gold=list(gold), predicted=predicted)
