"""Several responses to one prompt, tokenized, scored together, and their reference log-probs.

Shared by the recipes that compare responses: dpo (a chosen and a rejected response), rank (a
ranked list, best first) and reward (pairs, rankings and ratings). An item's sequences are
packed with those of the rest of its micro-batch into one padding-free row.

The reference model is the policy before training. With an adapter it is the same model with
the adapters switched off (never a second copy in memory): ``cached`` scores an item the first
time it is seen, ``online`` at every step. With full fine-tuning nothing frozen is left to
switch to, so ``precompute`` scores every item once before the first update.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tuneforge.config import PEFT_METHODS
from tuneforge.data.example import Example
from tuneforge.data.packing import pack
from tuneforge.data.render import TokenizedExample, render_response
from tuneforge.losses.causal_lm import SequenceLogProbs
from tuneforge.losses.reward import ranking_mask
from tuneforge.train.loop import use_bf16
from tuneforge.train.progress import say


class Scored(Protocol):
    """What the helpers below need of an item: its sequences, and room for reference log-probs."""

    sequences: Sequence[TokenizedExample]
    ref: tuple[float, ...] | None


@dataclass
class TokenizedResponses:
    """A prompt with its responses, each tokenized after the prompt; best first for rankings.

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


def score_sequences(module: SequenceLogProbs, items: Sequence[Scored],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and trained-token counts of every item's sequences, in order: ``[S]``."""
    packed = pack([seq for item in items for seq in item.sequences])
    return module(packed["input_ids"].to(device), packed["targets"].to(device),
                  position_ids=packed["position_ids"].to(device), seq_lens=packed["seq_lens"])


def as_lists(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence values ``[S]`` -> ``[B, K]`` lists (zero-padded) and their bool mask, where
    list ``b`` holds the next ``lengths[b]`` values; differentiable."""
    mask = ranking_mask(torch.tensor(lengths, device=flat.device), max(lengths))
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat), mask


@torch.no_grad()
def compute_reference(module: SequenceLogProbs, items: Sequence[Scored], device: torch.device,
                      batch_size: int = 8) -> None:
    """Fill ``item.ref`` with the reference model's log-probs (adapters off, no dropout)."""
    model = module.model
    was_training = module.training
    module.eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with off:
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            logps = score_sequences(module, chunk, device)[0].tolist()
            for item in chunk:
                n = len(item.sequences)
                item.ref, logps = tuple(logps[:n]), logps[n:]
    module.train(was_training)


def reference_logps(module: SequenceLogProbs, items: Sequence[Scored], device: torch.device,
                    mode: str) -> torch.Tensor:
    """The items' reference log-probs ``[S]`` (flat, in order), computing what ``mode`` asks."""
    missing = list(items) if mode == "online" else [it for it in items if it.ref is None]
    if missing:
        compute_reference(module, missing, device)
    return torch.tensor([v for it in items for v in it.ref], device=device)


def resolve_reference(mode: str, method: str) -> str:
    """``auto``: cached with an adapter (switch it off), precompute for full fine-tuning."""
    if mode != "auto":
        return mode
    return "cached" if method in PEFT_METHODS else "precompute"


def precompute_reference(module: SequenceLogProbs, items: list, acc, bf16: str,
                         batch_size: int) -> None:
    """Score every item with the untrained model, before any update (and before resuming
    loads trained weights), under the same autocast as training."""
    module.to(acc.device)
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16,
                              enabled=use_bf16(bf16, acc.device))
    say(f"computing reference log-probs of {len(items)} examples")
    with autocast:
        compute_reference(module, items, acc.device, batch_size)
