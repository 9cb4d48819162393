"""Scoring a labelled task by the model's own likelihood of each label.

For every test prompt, each candidate answer ``prefix + label + suffix`` is scored as the sum of
its token log-probabilities after the prompt; the prediction is the best-scoring label. Both
base and tuned models are judged on the same footing (no parsing of free text, no luck in
sampling, no way to "miss" the format). The suffix closes the answer (a newline, or the
end-of-turn token), so a label that is a prefix of another ("Account" / "Account Security") is
not favoured.

:func:`score_packed` (what :func:`classify` uses) scores many prompts in one forward per group:
each prompt's candidates form a token tree (:class:`LabelTree`: the tokens candidates start with
run once, each label is a short branch), prompts of similar length and their trees are packed
into one row without padding, and the attention of each token, run as one batch over the row's
prompts, is limited to its own prompt and branch (:class:`tuneforge.models.attention.TreeBatch`).
Only the positions that predict a label token are projected onto the vocabulary. The tokens
that every prompt starts with (the system message, the k solved examples of a few-shot prompt)
run once for the whole evaluation (:class:`SharedPrefix`). :func:`score_continuations` is the plain path, one prompt at a time,
kept as the reference the packed one is tested against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tuneforge.data.packing import pack
from tuneforge.data.render import IGNORE_INDEX, TokenizedExample
from tuneforge.data.templates import Prompt, prompt_ids
from tuneforge.eval.metrics import classification_metrics
from tuneforge.losses.causal_lm import CausalLMLoss, chunked_target_logps, head_casts
from tuneforge.models.adapters import base_model
from tuneforge.models.attention import TreeBatch, can_use_packed_attention, packed_attention

GROUP_TOKENS = 2048
"""Tokens run per packed forward (prompts after the shared prefix, plus label branches): on the
support set 2,048 measured a little faster than 4,096 and 8,192 (bench/README.md), and 1,024
about 15% slower than 4,096."""


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
           limit: int | None = None) -> SharedPrefix | None:
        """The longest prefix shared by all ``prompts`` (leaving each at least one token of its
        own, and at most ``limit`` tokens), run once; None when there are fewer than two prompts
        or it is short."""
        if len(prompts) < 2:
            return None
        n = min(len(p) for p in prompts) - 1
        n = n if limit is None else min(n, limit)
        first = prompts[0]
        for other in prompts[1:]:
            n = next((i for i in range(n) if other[i] != first[i]), n)
        if n < cls.MIN_TOKENS:
            return None
        with _autocast(model, bf16):
            out = model(input_ids=torch.tensor([first[:n]]), use_cache=True, logits_to_keep=1)
        return cls(list(first[:n]), out.cache)

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's ``(keys, values)`` ``[1, Hkv, len(ids), D]``."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

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
    return candidate_ids_batch(tokenizer, [prompt], candidates)[0]


def candidate_ids_batch(tokenizer, prompts: Sequence[Prompt], candidates: Sequence[str],
                        ) -> list[tuple[list[int], list[list[int]]]]:
    """:func:`candidate_ids` of each prompt, the candidates' texts tokenised in one batched call.

    Prompt and answer are tokenised together, as training tokenises them, so merges at the
    boundary match. A tokenizer splits special tokens out before anything else, so the text
    after a prompt's last special token (a chat prompt's ``<|im_start|>assistant\n``)
    tokenises the same whatever comes before it: only that tail is joined to each answer
    (checked: the tail must come back as its own ids, else the whole prompt text is used).
    """
    ids = [prompt_ids(p, tokenizer) for p in prompts]
    out: list = [None] * len(prompts)
    alone = None
    if any(isinstance(p, str) for p in prompts):  # raw completions: each answer on its own
        alone = _tokenise(tokenizer, list(candidates))
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out[i] = (ids[i], [list(c) for c in alone])
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(t, "special", False)}
    chat = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    tails = {}
    for i in chat:
        start = next((j for j in range(len(ids[i]) - 1, -1, -1) if ids[i][j] in special), 0)
        tails[i] = ids[i][start:]
    for whole in (False, True):  # the tails first; the whole prompt where a tail fails
        todo = [i for i in chat if out[i] is None]
        if not todo:
            break
        heads = {i: ids[i] if whole else tails[i] for i in todo}
        texts = {i: tokenizer.decode(heads[i], skip_special_tokens=False) for i in todo}
        joint = _tokenise(tokenizer, [texts[i] + c for i in todo for c in candidates])
        for n, i in enumerate(todo):
            head, conts = heads[i], []
            for k in range(len(candidates)):
                j = joint[n * len(candidates) + k]
                if j[: len(head)] == head and len(j) > len(head):
                    conts.append(j[len(head) :])
                elif not whole:  # the tail does not come back as itself: use the whole prompt
                    break
                else:  # the answer merged into the prompt's last token: tokenise it alone
                    alone = alone or _tokenise(tokenizer, list(candidates))
                    conts.append(list(alone[k]))
            else:
                out[i] = (ids[i], conts)
    return out


def _tokenise(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _autocast(model, bf16: bool | None):
    """bf16 matmuls where the hardware has them: scoring needs ranks, not the last digit."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16_enabled(model, bf16))


def _bf16_enabled(model, bf16: bool | None) -> bool:
    from tuneforge.train.loop import use_bf16

    return use_bf16("auto", next(model.parameters()).device) if bf16 is None else bf16


@contextmanager
def bf16_weights(model, bf16: bool | None) -> Iterator[None]:
    """While scoring under bf16 autocast, hold every linear layer's weight (and bias) in bf16.

    Autocast re-casts each fp32 weight at every forward (it keeps a cast only for weights that
    require grad, and only within one autocast region): a LoRA model's frozen base would be
    cast once per packed forward. The casts made here are the same bf16 values, so the scores
    are the same. A weight tied to an embedding stays (the embedding runs in fp32); the fp32
    tensors are put back afterwards, whatever happens.
    """
    device = next(model.parameters()).device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed or not (_bf16_enabled(model, bf16) and device.type in ("cpu", "cuda")):
        yield  # sharded or replicated parameters are the engine's to manage: autocast casts
        return
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                for param in (module.weight, module.bias):
                    if param is not None and param.dtype == torch.float32 and id(param) not in embedded:
                        saved.append((param, param.data))
                        param.data = param.data.to(torch.bfloat16)
        yield
    finally:
        for param, data in saved:
            param.data = data


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
class LabelBatch:
    """One forward of label scoring: prompts of similar length, each followed by its
    candidates' :class:`LabelTree`, packed into one row without padding after ``prefix``
    shared tokens (the row leaves those out).

    ``order[b]`` is segment ``b``'s prompt (an index into the scored prompts), ``lengths[b]``
    its tokens; ``ids``/``positions`` the row's tokens and their positions in their own
    sequences; ``mask`` ``[B, 1, W, prefix + W]`` who sees whom when attention lays the
    segments out as a right-padded batch (:class:`tuneforge.models.attention.TreeBatch`);
    ``rows[i]`` the row position whose output predicts ``tokens[i]``, the targets of ``trees``
    one after another.
    """

    order: list[int]
    ids: list[int]
    positions: list[int]
    lengths: list[int]
    prefix: int
    mask: torch.Tensor
    rows: list[int]
    tokens: list[int]
    trees: list[LabelTree]


def label_batches(prompts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
                  shared: SharedPrefix | None = None, group_tokens: int = GROUP_TOKENS,
                  ) -> list[LabelBatch]:
    """The prompts, shortest first, cut into rows of at most ``group_tokens`` tokens (a row
    holds at least one prompt). Sorting by length keeps the padding of the attention batch
    small; a row's prompts all start with ``shared``'s tokens (which it then leaves out) or
    none does."""
    trees = [LabelTree.of(c) for c in continuations]
    skip = [len(shared.ids) if shared is not None and shared.starts(p) else 0 for p in prompts]
    size = [len(p) - skip[i] + len(trees[i].tokens) for i, p in enumerate(prompts)]
    if any(len(p) - skip[i] < 1 for i, p in enumerate(prompts)):
        raise ValueError("label scoring needs a prompt of at least one token")
    return [_batch(group, prompts, trees, skip[group[0]])
            for group in _groups(size, skip, group_tokens)]


def _groups(size: Sequence[int], skip: Sequence[int], group_tokens: int) -> list[list[int]]:
    """Indices, those after a shared prefix first, shortest first, cut into groups of at most
    ``group_tokens`` tokens (at least one each) with the same ``skip``."""
    out, group, total = [], [], 0
    for i in sorted(range(len(size)), key=lambda i: (-skip[i], size[i])):
        if group and (skip[i] != skip[group[0]] or total + size[i] > group_tokens):
            out.append(group)
            group, total = [], 0
        group.append(i)
        total += size[i]
    return out + [group] if group else out


def _batch(order: list[int], prompts: Sequence[list[int]], trees: list[LabelTree],
           prefix: int) -> LabelBatch:
    ids, positions, lengths, masks, rows, tokens = [], [], [], [], [], []
    for i in order:
        prompt, tree = prompts[i], trees[i]
        own, offset = len(prompt) - prefix, len(ids)
        ids += prompt[prefix:] + tree.tokens
        positions += list(range(prefix, len(prompt))) + [len(prompt) + d for d in tree.depths]
        lengths.append(own + len(tree.tokens))
        masks.append(tree.mask(own, prefix))
        rows += [offset + own - 1 if source < 0 else offset + own + source
                 for source, _ in tree.targets]
        tokens += [token for _, token in tree.targets]
    return LabelBatch(list(order), ids, positions, lengths, prefix,
                      _segments_mask(lengths, masks, prefix), rows, tokens,
                      [trees[i] for i in order])


def _segments_mask(lengths: Sequence[int], masks: Sequence[torch.Tensor],
                   prefix: int) -> torch.Tensor:
    """Each segment's ``[L, prefix + L]`` mask laid into one ``[B, 1, W, prefix + W]`` batch
    mask (:class:`tuneforge.models.attention.TreeBatch`: padding queries see key 0)."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), 1, width, prefix + width, dtype=torch.bool)
    for b, (n, seg) in enumerate(zip(lengths, masks)):
        mask[b, 0, :n, : prefix + n] = seg
        mask[b, 0, n:, 0] = True
    return mask


@torch.no_grad()
def score_packed(model, prompts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
                 bf16: bool | None = None, shared: SharedPrefix | None = None,
                 group_tokens: int = GROUP_TOKENS,
                 progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Sum of log p(continuation | prompt) for each prompt's continuations (token ids).

    One forward per :func:`label_batches` batch, after ``shared``'s cached tokens for the
    prompts that start with them, through the tuneforge_packed attention
    (:func:`tuneforge.models.attention.packed_attention`; ValueError for a model whose
    attention cannot switch to it). Returns one list of scores per prompt, in the order of its
    continuations: :func:`score_continuations`'s, up to rounding. ``progress`` gets the number
    of prompts done.
    """
    scores: list[list[float] | None] = [None] * len(prompts)
    done = 0
    with packed_attention(model) as switched:
        if not switched:
            raise ValueError("packed label scoring needs a model whose attention runs through "
                             "transformers' attention interface (sdpa or eager)")
        for batch in label_batches(prompts, continuations, shared, group_tokens):
            for i, row_scores in zip(batch.order, _score_batch(model, batch, shared, bf16)):
                scores[i] = row_scores
            done += len(batch.order)
            if progress:
                progress(done)
    return scores


def _score_batch(model, batch: LabelBatch, shared: SharedPrefix | None,
                 bf16: bool | None) -> list[list[float]]:
    base = base_model(model)
    with _autocast(model, bf16):
        hidden = _hidden(model, batch.ids, batch.positions, batch.lengths, batch.mask,
                         shared if batch.prefix else None)
        logps = _target_log_probs(hidden, base.get_output_embeddings(),
                                  torch.tensor(batch.rows, device=hidden.device),
                                  torch.tensor(batch.tokens, device=hidden.device))
    out, done = [], 0
    for label_tree in batch.trees:
        mine = logps[done : done + len(label_tree.targets)]
        out.append([float(mine[path].sum()) for path in label_tree.paths])
        done += len(label_tree.targets)
    return out


def _hidden(model, ids: list[int], positions: list[int], lengths: list[int], mask: torch.Tensor,
            shared: SharedPrefix | None) -> torch.Tensor:
    """The decoder's last hidden states ``[T, H]`` of a packed row of segments after
    ``shared``'s cached tokens, attention as a :class:`TreeBatch` (needs the tuneforge_packed
    attention switched on)."""
    device = next(model.parameters()).device
    tree = TreeBatch.of(lengths, mask.to(device), shared.kv if shared is not None else None)
    return base_model(model).get_decoder()(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        attention_mask=tree.mask, use_cache=False, packed_tree=tree).last_hidden_state[0]


@torch.no_grad()
def target_nll(model, sequences: Sequence[TokenizedExample], bf16: bool | None = None,
               group_tokens: int = GROUP_TOKENS) -> tuple[float, int]:
    """(sum of -log p, count) over the trained tokens (labels not -100) of ``sequences``, as
    training's loss counts them, packed as label scoring packs prompts: the untrained tokens
    every sequence starts with (a system message, few-shot examples) run once as a shared
    prefix, sequences of similar length share a forward, bf16 where the hardware has it.

    Falls back to one packed row of whole sequences at a time (training's loss) for a model
    whose attention cannot switch to tuneforge_packed or whose sliding window is reached.
    """
    ids = [list(s.input_ids) for s in sequences]
    targets = [list(s.labels[1:]) + [IGNORE_INDEX] for s in sequences]
    total, count = 0.0, sum(t != IGNORE_INDEX for row in targets for t in row)
    if not count:
        return 0.0, 0
    with bf16_weights(model, bf16):
        if not (_fits_packed(model, map(len, ids)) and can_use_packed_attention(model)):
            wrapper, device = CausalLMLoss(model), next(model.parameters()).device
            with _autocast(model, bf16):
                for lo in range(0, len(sequences), 8):
                    packed = pack(list(sequences[lo : lo + 8]))
                    nll, _ = wrapper(packed["input_ids"].to(device), packed["targets"].to(device),
                                     position_ids=packed["position_ids"].to(device),
                                     seq_lens=packed["seq_lens"])
                    total += float(nll)
            return total, count
        # the prefix may hold no target: its last token's prediction is not computed here
        first = min((next((t for t, y in enumerate(row) if y != IGNORE_INDEX), len(row))
                     for row in targets), default=0)
        shared = SharedPrefix.of(model, ids, bf16, limit=first)
        skip = [len(shared.ids) if shared is not None and shared.starts(i) else 0 for i in ids]
        head = base_model(model).get_output_embeddings()
        with packed_attention(model), _autocast(model, bf16):
            for group in _groups([len(i) - k for i, k in zip(ids, skip)], skip, group_tokens):
                p = skip[group[0]]
                lengths = [len(ids[i]) - p for i in group]
                mask = _segments_mask(lengths, [_causal(n, p) for n in lengths], p)
                hidden = _hidden(model, [t for i in group for t in ids[i][p:]],
                                 [t for i in group for t in range(p, len(ids[i]))], lengths, mask,
                                 shared if p else None)
                wanted = torch.tensor([t for i in group for t in targets[i][p:]],
                                      device=hidden.device)
                total -= float(chunked_target_logps(hidden, head, wanted).sum())
    return total, count


def _causal(n: int, prefix: int) -> torch.Tensor:
    """``[n, prefix + n]``: every token sees the prefix and itself and the tokens before it."""
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool).tril()
    return mask


def _target_log_probs(hidden: torch.Tensor, head: torch.nn.Module, rows: torch.Tensor,
                      tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``log_softmax(head(hidden[rows[i]]))[tokens[i]]`` for each i: ``[N]`` fp32.

    Each distinct row is projected onto the vocabulary once, ``chunk`` rows at a time (a
    prompt's last position predicts the first token of every candidate).
    """
    unique, inverse = torch.unique(rows, return_inverse=True)
    out = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
    if type(head) is torch.nn.Linear:
        # cast once, not per chunk (a tied output layer is the embedding's fp32 weight)
        dtype, weight, bias = head_casts(head, hidden.device.type)
        head = lambda x: torch.nn.functional.linear(x.to(dtype), weight, bias)  # noqa: E731
    for lo in range(0, len(unique), chunk):
        logp = torch.log_softmax(head(hidden[unique[lo : lo + chunk]]).float(), dim=-1)
        here = (inverse >= lo) & (inverse < lo + chunk)
        out[here] = logp[inverse[here] - lo, tokens[here]]
    return out


def _fits_packed(model, lengths: Sequence[int]) -> bool:
    """Whether the packed path gives the reference's scores for sequences of ``lengths``
    tokens: no sliding window is reached."""
    window = getattr(getattr(base_model(model), "config", None), "sliding_window", None)
    return not window or all(n <= window for n in lengths)


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
        tokenised = candidate_ids_batch(tokenizer, prompts, candidates)
        ids = [t[0] for t in tokenised]
        conts = [t[1] for t in tokenised]
        with bf16_weights(model, bf16):
            shared = SharedPrefix.of(model, ids, bf16)
            longest = [len(p) + max(map(len, c), default=0) for p, c in zip(ids, conts)]
            if packed and _fits_packed(model, longest) and can_use_packed_attention(model):
                scores = score_packed(model, ids, conts, bf16, shared, progress=progress)
            else:
                scores = []
                for p, c in zip(ids, conts):
                    scores.append(score_continuations(model, p, c, bf16, shared))
                    if progress:
                        progress(len(scores))
    finally:
        model.train(was_training)
    predicted = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    return ClassificationScores(labels=list(labels), gold=list(gold), predicted=predicted)
