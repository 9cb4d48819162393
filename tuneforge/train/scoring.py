"""Scoring responses, under the policy and under the reference model: one home for both.

Every recipe that compares responses starts here: dpo and kto (a chosen and a rejected
response, or one judged response), rank (a ranked list, best first), reward (pairs, rankings
and ratings, through a scalar head), and the online recipes ppo and grpo (sampled completions,
token by token).

- **Items.** :class:`TokenizedResponses` is a prompt with its responses, each tokenized after
  the prompt (only the response is scored); rollouts' completions have ``sequence()``.
- **Scorers**, modules whose ``forward`` takes a packed row (the sequences of a micro-batch
  laid end to end, no padding) and returns: :class:`SequenceLogProbs` the summed log-prob of
  each sequence's response (DPO's log pi(y|x)) and its token count; :class:`TokenLogProbs` the
  log-prob, entropy (and, with a value head, the value) of every response token;
  :class:`SequenceRewards` a reward model's score of each sequence. Each holds the model it
  trains as ``.model``, which is what the loop checkpoints.
- **One way to call them**: ``score_packed`` (tuneforge/data/packing.py) packs sequences
  and runs a scorer;
  :func:`score_sequences` (per sequence, ``[S]``) and :func:`score_tokens` (per token, ``[B, T]``
  right-padded) shape what comes back.
- **The reference model** (:class:`Reference`) is the policy before training. With an adapter
  it is the same model with the adapters switched off (never a second copy in memory):
  ``cached`` scores an item the first time it is seen, ``online`` at every step. With full
  fine-tuning nothing frozen is left to switch to, so offline recipes ``precompute`` every item
  once before the first update, and online ones, whose completions are new at every step,
  keep a ``frozen`` copy.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data.example import Example
from tuneforge.data.packing import score_packed
from tuneforge.data.render import IGNORE_INDEX, TokenizedExample, render_response
from tuneforge.losses.causal_lm import CausalLMLoss, chunked_target_logps
from tuneforge.losses.reward import ranking_mask
from tuneforge.models.adapters import has_adapter
from tuneforge.train.loop import use_bf16
from tuneforge.train.progress import say

REFERENCE_MODES = ("cached", "online", "precompute", "frozen")


class Scored(Protocol):
    """What the helpers below need of an item: its sequences, and room for reference log-probs."""

    sequences: Sequence[TokenizedExample]
    ref: tuple[float, ...] | None


@dataclass
class TokenizedResponses:
    """A prompt with its responses, each tokenized after the prompt; best first for rankings,
    chosen then rejected for pairs.

    ``targets`` are the record's numbers: a rating (``[4.0]``), a thumbs up/down as ``[1.0]``
    or ``[0.0]``, a ranking's scores, or None. ``group`` identifies the prompt, so responses to
    the same prompt in different records (ratings) can be compared.
    """

    sequences: list[TokenizedExample]
    targets: list[float] | None = None
    margin: float | None = None
    group: str = ""
    ref: tuple[float, ...] | None = field(default=None, repr=False)
    last_scores: list[float] | None = field(default=None, repr=False)
    """What the model scored the sequences at the last evaluation (reward recipe metrics)."""

    def __len__(self) -> int:
        return max(len(s) for s in self.sequences)

    @property
    def num_targets(self) -> int:
        return min(s.num_targets for s in self.sequences)

    @property
    def chosen(self) -> TokenizedExample:
        """A pair's chosen response (a ranking's best)."""
        return self.sequences[0]

    @property
    def rejected(self) -> TokenizedExample:
        """A pair's rejected response."""
        return self.sequences[1]

    @property
    def where(self) -> str:
        return f"{self.sequences[0].source}:{self.sequences[0].line}"


def render_responses(example: Example, tokenizer, max_length: int | None = None) -> TokenizedResponses:
    """Tokenize every response of a preference, ranking, rating or unpaired example."""
    sequences = [render_response(example, i, tokenizer, max_length)
                 for i in range(len(example.responses or []))]
    targets = example.scores
    if example.desirable is not None:
        targets = [1.0 if example.desirable else 0.0]
    prompt = [(m.role, m.content) for m in example.prompt_messages or []]
    return TokenizedResponses(sequences, targets, group=json.dumps(prompt))


# ------------------------------------------------------------------------------- scorers


class SequenceLogProbs(CausalLMLoss):
    """``forward`` returns the summed target log-prob of each packed sequence: ``[S]`` and counts.

    The sequence statistics preference and ranking losses start from (DPO's log pi(y|x)).
    """

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, seq_lens=None):
        hidden = self.hidden(input_ids, position_ids, attention_mask, seq_lens)
        logps = chunked_target_logps(hidden, self.base().get_output_embeddings(), targets,
                                     self.chunk_size)
        if seq_lens is None:  # one sequence per row of a padded batch
            seq_lens = [targets.shape[-1]] * targets.shape[0]
        seq_of = torch.repeat_interleave(torch.arange(len(seq_lens), device=targets.device),
                                         torch.tensor(seq_lens, device=targets.device))
        seq_of = seq_of[(targets != IGNORE_INDEX).reshape(-1)]
        sums = logps.new_zeros(len(seq_lens)).index_add(0, seq_of, logps)
        counts = torch.bincount(seq_of, minlength=len(seq_lens))
        return sums, counts


class TokenLogProbs(CausalLMLoss):
    """The policy (and PPO's value head) scoring every response token of a packed row.

    ``forward`` returns flat ``[N]`` tensors over the N response tokens of the row, in order:
    ``logps`` (log-prob of each token, differentiable), ``entropy`` (of the policy at that
    position, detached) and, with a value head, ``values`` (the value of the state the token
    was sampled in: the final hidden state one position before it).
    """

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None,
                 chunk_size: int = 256) -> None:
        super().__init__(model, chunk_size)
        self.value_head = value_head

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, seq_lens=None):
        hidden = self.hidden(input_ids, position_ids, attention_mask, seq_lens)
        keep = targets != IGNORE_INDEX
        rows, wanted = hidden[keep], targets[keep]
        head = self.base().get_output_embeddings()
        logps, entropy = [], []
        for lo in range(0, rows.shape[0], self.chunk_size):
            # fp32 log-softmax of one chunk of positions at a time: [chunk, vocabulary]
            logp = F.log_softmax(head(rows[lo : lo + self.chunk_size]).float(), dim=-1)
            logps.append(logp.gather(-1, wanted[lo : lo + self.chunk_size, None])[:, 0])
            with torch.no_grad():
                entropy.append(-(logp.exp() * logp).sum(-1))
        out = {"logps": torch.cat(logps), "entropy": torch.cat(entropy)}
        if self.value_head is not None:
            out["values"] = self.value_head(rows).squeeze(-1).float()
        return out


class SequenceRewards(nn.Module):
    """A reward model (:class:`tuneforge.models.heads.RewardModel`, as ``.model``, so that
    checkpoints hold its head too) scoring each packed sequence: ``[S]`` rewards."""

    def __init__(self, reward_model: nn.Module) -> None:
        super().__init__()
        self.model = reward_model

    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                seq_lens=None) -> torch.Tensor:
        return self.model(input_ids, targets, position_ids, attention_mask, seq_lens)


def score_sequences(module: nn.Module, items: Sequence[Scored],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and trained-token counts of every item's sequences, in order: ``[S]``."""
    return score_packed(module, [seq for item in items for seq in item.sequences], device)


def score_tokens(module: nn.Module, completions: Sequence, device: torch.device) -> dict[str, torch.Tensor]:
    """One padding-free forward pass of a :class:`TokenLogProbs` over ``completions`` (items
    with ``sequence()`` and ``ids``); ``[B, T]`` tensors, right-padded.

    Returns its outputs reshaped to ``[B, T]`` (``T`` the longest completion) and ``mask`` (1.0
    on completion tokens, 0.0 on padding).
    """
    flat = score_packed(module, [c.sequence() for c in completions], device)
    counts = [len(c.ids) for c in completions]
    out = {k: to_rows(v, counts) for k, v in flat.items()}
    out["mask"] = to_rows(torch.ones(sum(counts), device=device), counts)
    return out


def to_rows(flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[sum(counts)]`` -> ``[len(counts), max(counts)]``, each row's values first, then 0."""
    return nn.utils.rnn.pad_sequence(list(flat.split(counts)), batch_first=True)


def as_lists(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence values ``[S]`` -> ``[B, K]`` lists (zero-padded) and their bool mask, where
    list ``b`` holds the next ``lengths[b]`` values; differentiable."""
    mask = ranking_mask(torch.tensor(lengths, device=flat.device), max(lengths))
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat), mask


# ------------------------------------------------------------------------------- reference


def resolve_reference(mode: str, model: nn.Module) -> str:
    """``auto``: ``cached`` with an adapter (switch it off), ``precompute`` for full fine-tuning."""
    if mode != "auto":
        return mode
    return "cached" if has_adapter(model) else "precompute"


class Reference:
    """Log-probs under the reference policy, the model before training (module docstring).

    ``scorer`` is the policy's own scoring module (unwrapped from DDP), ``mode`` one of
    :data:`REFERENCE_MODES`. For offline items (:meth:`sequence_logps`) ``item.ref`` holds an
    item's reference log-probs once known; rollouts' completions are scored afresh
    (:meth:`token_logps`). :meth:`for_rollouts` picks the mode for online recipes.
    """

    def __init__(self, scorer: nn.Module, mode: str = "cached") -> None:
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode {mode!r}: expected one of {', '.join(REFERENCE_MODES)}")
        self.scorer, self.mode = scorer, mode
        self.frozen = None
        if mode == "frozen":
            self.frozen = TokenLogProbs(copy.deepcopy(scorer.model), chunk_size=scorer.chunk_size)
            self.frozen.eval().requires_grad_(False)

    @classmethod
    def for_rollouts(cls, scorer: nn.Module) -> Reference:
        """Adapters off when the policy has them (``online``), else a ``frozen`` copy, made now."""
        return cls(scorer, "online" if has_adapter(scorer.model) else "frozen")

    @contextmanager
    def policy(self, device: torch.device) -> Iterator[nn.Module]:
        """The module that scores as the reference: the frozen copy, or the policy's own scorer in
        eval mode (no dropout) with its adapters off; put back as it was afterwards."""
        if self.frozen is not None:
            yield self.frozen.to(device)
            return
        was_training = self.scorer.training
        self.scorer.eval()
        model = self.scorer.model
        try:
            with model.disable_adapter() if has_adapter(model) else nullcontext():
                yield self.scorer
        finally:
            self.scorer.train(was_training)

    @torch.no_grad()
    def compute(self, items: Sequence[Scored], device: torch.device, batch_size: int = 8) -> None:
        """Fill ``item.ref`` with the reference log-probs of each item's sequences."""
        with self.policy(device) as scorer:
            for lo in range(0, len(items), batch_size):
                chunk = items[lo : lo + batch_size]
                logps = score_sequences(scorer, chunk, device)[0].tolist()
                for item in chunk:
                    n = len(item.sequences)
                    item.ref, logps = tuple(logps[:n]), logps[n:]

    def sequence_logps(self, items: Sequence[Scored], device: torch.device) -> torch.Tensor:
        """The items' reference log-probs ``[S]`` (flat, in order), computing what the mode asks:
        every item (``online``) or those not scored yet."""
        missing = list(items) if self.mode == "online" else [it for it in items if it.ref is None]
        if missing:
            self.compute(missing, device)
        return torch.tensor([v for it in items for v in it.ref], device=device)

    def precompute(self, items: list, acc, bf16: str, batch_size: int) -> None:
        """Score every item with the untrained model, before any update (and before resuming
        loads trained weights), under the same autocast as training."""
        self.scorer.to(acc.device)
        autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16,
                                  enabled=use_bf16(bf16, acc.device))
        say(f"computing reference log-probs of {len(items)} examples")
        with autocast:
            self.compute(items, acc.device, batch_size)

    @torch.no_grad()
    def token_logps(self, completions: Sequence, device: torch.device) -> torch.Tensor:
        """``[B, T]`` reference log-probs of each completion's tokens (right-padded)."""
        with self.policy(device) as scorer:
            return score_tokens(scorer, completions, device)["logps"]
