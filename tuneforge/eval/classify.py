"""Scoring a labelled task by the model's own likelihood of each label.

For every test prompt, each candidate answer ``prefix + label + suffix`` is scored as the sum of
its token log-probabilities after the prompt; the prediction is the best-scoring label. Both
base and tuned models are judged on the same footing (no parsing of free text, no luck in
sampling, no way to "miss" the format). The suffix closes the answer (a newline, or the
end-of-turn token), so a label that is a prefix of another ("Account" / "Account Security") is
not favoured.

:func:`score_packed` (what :func:`classify` uses) scores many prompts in one forward per group:
each prompt's candidates form a token tree (:class:`LabelTree`: the tokens candidates start with
run once, each label is a short branch), the prompts and their trees are packed into one row
without padding, and the attention of each token is limited to its own prompt and branch
(:class:`tuneforge.models.attention.PackedTree`). Only the positions that predict a label token
are projected onto the vocabulary. The tokens that every prompt starts with (the system message,
the k solved examples of a few-shot prompt) run once for the whole evaluation
(:class:`SharedPrefix`). :func:`score_continuations` is the plain path, one prompt at a time,
kept as the reference the packed one is tested against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tuneforge.data.templates import Prompt, prompt_ids
from tuneforge.eval.metrics import classification_metrics
from tuneforge.models.adapters import base_model
from tuneforge.models.attention import PackedTree, packed_attention

GROUP_TOKENS = 4096
"""Tokens run per packed forward (prompts after the shared prefix, plus label branches): fewer,
larger forwards use the matmuls better (1024 cost ~15% more time on the support set)."""


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
    ids, cands = candidate_ids(tokenizer, prompt, candidates)
    return score_continuations(model, ids, cands, bf16, shared)


def candidate_ids(tokenizer, prompt: Prompt, candidates: Sequence[str],
                  ) -> tuple[list[int], list[list[int]]]:
    """(prompt token ids, each candidate's token ids), tokenised as training tokenises an
    answer after that prompt."""
    ids = prompt_ids(prompt, tokenizer)
    if isinstance(prompt, str):  # raw completions are tokenised on their own in training
        return ids, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in candidates]
    prompt_text = tokenizer.decode(ids, skip_special_tokens=False)
    return ids, [_continuation_ids(tokenizer, prompt_text, ids, text) for text in candidates]


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


@dataclass
class LabelTree:
    """The candidate continuations of one prompt as a token tree: shared starts run once.

    ``tokens`` are the tree's inner nodes, the ones the model runs (each after its parent);
    ``parents[i]`` is the inner node before node ``i`` (-1: the prompt's last token) and
    ``depths[i]`` its distance from the prompt. ``targets`` holds one ``(source, token)`` pair
    per tree node: the inner node whose output predicts ``token`` (-1: the prompt's last token);
    candidate ``c`` scores the sum over ``targets[t] for t in paths[c]``. A candidate's last
    token never runs (nothing after it is scored), so "Department: Billing\n" and
    "Department: Sales\n" cost the shared "Department:" once plus a token or two each.
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    targets: list[tuple[int, int]]
    paths: list[list[int]]

    @classmethod
    def of(cls, continuations: Sequence[list[int]]) -> LabelTree:
        tree = cls([], [], [], [], [])
        target_of: dict[tuple[int, int], int] = {}
        inner_of: dict[int, int] = {}  # target index -> inner node index
        for cont in continuations:
            source, path = -1, []
            for depth, token in enumerate(cont):
                t = target_of.setdefault((source, token), len(tree.targets))
                if t == len(tree.targets):
                    tree.targets.append((source, token))
                path.append(t)
                if depth < len(cont) - 1:  # a token with a successor runs through the model
                    if t not in inner_of:
                        inner_of[t] = len(tree.tokens)
                        tree.tokens.append(token)
                        tree.parents.append(source)
                        tree.depths.append(depth)
                    source = inner_of[t]
            tree.paths.append(path)
        return tree

    def mask(self, prompt: int, prefix: int = 0) -> torch.Tensor:
        """``[prompt + N, prefix + prompt + N]`` bool: who sees whom in the segment of a prompt
        of ``prompt`` own tokens (after ``prefix`` cached ones) followed by the N inner nodes."""
        n = len(self.tokens)
        mask = torch.zeros(prompt + n, prefix + prompt + n, dtype=torch.bool)
        mask[:, :prefix] = True
        mask[:prompt, prefix : prefix + prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
        mask[prompt:, prefix : prefix + prompt] = True
        nodes = mask[prompt:, prefix + prompt :]  # [N, N], a view
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                nodes[i] = nodes[parent]
            nodes[i, i] = True
        return mask


@dataclass
class PackedRow:
    """One forward of label scoring: several prompts (after a shared prefix) and their trees.

    ``ids``/``positions``: the row's tokens and their positions in their own sequences;
    ``layout``: its segments and masks; ``rows[i]`` is the row position whose output predicts
    ``tokens[i]``, the targets of ``trees`` one after another.
    """

    ids: list[int]
    positions: list[int]
    layout: PackedTree
    rows: list[int]
    tokens: list[int]
    trees: list[LabelTree]


def pack_label_rows(prompts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
                    shared: SharedPrefix | None = None, group_tokens: int = GROUP_TOKENS,
                    ) -> list[PackedRow]:
    """The prompts, in order, packed with their candidates' trees into rows of about
    ``group_tokens`` tokens each (a prompt is never split); a row's prompts all start with
    ``shared``'s tokens (which the row then leaves out) or none does."""
    trees = [LabelTree.of(c) for c in continuations]
    skip = [len(shared.ids) if shared is not None and shared.starts(p) else 0 for p in prompts]
    out, group, size = [], [], 0
    for i, prompt in enumerate(prompts):
        group.append(i)
        size += len(prompt) - skip[i] + len(trees[i].tokens)
        if size >= group_tokens or i == len(prompts) - 1 or skip[i + 1] != skip[i]:
            out.append(_pack_row([prompts[j] for j in group], [trees[j] for j in group], skip[i]))
            group, size = [], 0
    return out


def _pack_row(prompts: list[list[int]], trees: list[LabelTree], prefix: int) -> PackedRow:
    ids, positions, lengths, masks, rows, tokens = [], [], [], [], [], []
    for prompt, tree in zip(prompts, trees):
        own, offset = len(prompt) - prefix, len(ids)
        if own < 1:
            raise ValueError("label scoring needs a prompt of at least one token")
        ids += prompt[prefix:] + tree.tokens
        positions += list(range(prefix, len(prompt))) + [len(prompt) + d for d in tree.depths]
        lengths.append(own + len(tree.tokens))
        masks.append(tree.mask(own, prefix))
        rows += [offset + own - 1 if source < 0 else offset + own + source
                 for source, _ in tree.targets]
        tokens += [token for _, token in tree.targets]
    return PackedRow(ids, positions, PackedTree(prefix, lengths, masks), rows, tokens, trees)


@torch.no_grad()
def score_packed(model, prompts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
                 bf16: bool | None = None, shared: SharedPrefix | None = None,
                 group_tokens: int = GROUP_TOKENS,
                 progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Sum of log p(continuation | prompt) for each prompt's continuations (token ids).

    One forward per :func:`pack_label_rows` row, after ``shared``'s cached tokens for the
    prompts that start with them. Returns one list of scores per prompt, in the order of its
    continuations: :func:`score_continuations`'s, up to rounding. Exact under any SDPA
    attention; the tuneforge_packed one (:func:`tuneforge.models.attention.packed_attention`)
    skips the masked-out blocks. ``progress`` gets the number of prompts done.
    """
    scores: list[list[float]] = []
    for row in pack_label_rows(prompts, continuations, shared, group_tokens):
        cache = copy.deepcopy(shared.cache) if row.layout.prefix else None
        scores += _score_row(model, row, cache, bf16)
        if progress:
            progress(len(scores))
    return scores


def _score_row(model, row: PackedRow, cache, bf16: bool | None) -> list[list[float]]:
    base = base_model(model)
    with _autocast(model, bf16):
        hidden = base.get_decoder()(
            input_ids=torch.tensor([row.ids]), position_ids=torch.tensor([row.positions]),
            attention_mask=_row_mask(row.layout), cache=cache, use_cache=cache is not None,
            packed_tree=row.layout).last_hidden_state[0]  # [T, H]
        logps = _target_log_probs(hidden, base.get_output_embeddings(), torch.tensor(row.rows),
                                  torch.tensor(row.tokens))
    out, done = [], 0
    for tree in row.trees:
        mine = logps[done : done + len(tree.targets)]
        out.append([float(mine[path].sum()) for path in tree.paths])
        done += len(tree.targets)
    return out


def _row_mask(layout: PackedTree) -> torch.Tensor:
    """The whole row's ``[1, 1, T, prefix + T]`` mask: what any SDPA needs to be exact (the
    tuneforge_packed attention uses the per-segment masks instead, and skips the rest)."""
    total = sum(layout.lengths)
    mask = torch.zeros(total, layout.prefix + total, dtype=torch.bool)
    mask[:, : layout.prefix] = True
    at = 0
    for n, seg in zip(layout.lengths, layout.masks):
        mask[at : at + n, layout.prefix + at : layout.prefix + at + n] = seg[:, layout.prefix :]
        at += n
    return mask[None, None]


def _target_log_probs(hidden: torch.Tensor, head: torch.nn.Module, rows: torch.Tensor,
                      tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``log_softmax(head(hidden[rows[i]]))[tokens[i]]`` for each i: ``[N]`` fp32.

    Each distinct row is projected onto the vocabulary once, ``chunk`` rows at a time (a
    prompt's last position predicts the first token of every candidate).
    """
    unique, inverse = torch.unique(rows, return_inverse=True)
    out = torch.empty(len(rows), dtype=torch.float32)
    for lo in range(0, len(unique), chunk):
        logp = torch.log_softmax(head(hidden[unique[lo : lo + chunk]]).float(), dim=-1)
        here = (inverse >= lo) & (inverse < lo + chunk)
        out[here] = logp[inverse[here] - lo, tokens[here]]
    return out


def _fits_packed(model, prompts: Sequence[list[int]], continuations) -> bool:
    """Whether the packed path gives the reference's scores: no sliding window is reached."""
    window = getattr(getattr(base_model(model), "config", None), "sliding_window", None)
    if not window:
        return True
    return all(len(p) + max(map(len, c), default=0) <= window for p, c in zip(prompts, continuations))


def classify(model, tokenizer, prompts: Sequence[Prompt], gold: list[str], labels: list[str],
             *, prefix: str = "", suffix: str = "", progress: Callable[[int], None] | None = None,
             bf16: bool | None = None, packed: bool = True) -> ClassificationScores:
    """Predict a label for each prompt by likelihood; ``progress`` gets the number done.

    ``packed`` scores groups of prompts per forward (:func:`score_packed`); False takes the
    plain path, one prompt at a time (:func:`score_continuations`), with the same scores.
    """
    candidates = [prefix + lab + suffix for lab in labels]
    was_training = model.training
    model.eval()
    try:
        tokenised = [candidate_ids(tokenizer, p, candidates) for p in prompts]
        ids = [t[0] for t in tokenised]
        conts = [t[1] for t in tokenised]
        shared = SharedPrefix.of(model, ids, bf16)
        scores = None
        if packed and _fits_packed(model, ids, conts):
            with packed_attention(model) as switched:
                if switched:
                    scores = score_packed(model, ids, conts, bf16, shared, progress=progress)
        if scores is None:
            scores = []
            for p, c in zip(ids, conts):
                scores.append(score_continuations(model, p, c, bf16, shared))
                if progress:
                    progress(len(scores))
    finally:
        model.train(was_training)
    predicted = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    return ClassificationScores(labels=list(labels), gold=list(gold), predicted=predicted)
