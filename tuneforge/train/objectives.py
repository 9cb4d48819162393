"""What a recipe hands the shared loop: a module to train and how a micro-batch becomes a loss.

The loop (train/loop.py) owns everything that is the same for every method: the data order,
accumulation, clipping, the schedule, mixed precision, evaluation, early stopping and
checkpoints. An :class:`Objective` owns what differs: which module accelerate wraps (it must
hold the trainable model as ``.model``), what one example is, and the summed loss of a
micro-batch together with summed metrics.

Losses and metrics are returned as *sums* over the micro-batch, and :meth:`Objective.weight`
says what they are sums over (trained tokens for language modelling, pairs for DPO). The loop
divides by the weight of the whole global batch, so accumulation and processes never change
the update, and logged metrics are means over the same units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from tuneforge.data.packing import pack
from tuneforge.data.render import TokenizedExample
from tuneforge.losses.causal_lm import CHUNK, CausalLMLoss


class Objective(Protocol):
    module: nn.Module
    """What accelerate prepares (DDP wraps it); ``module.model`` is the model being trained."""
    metric_keys: tuple[str, ...]
    """Names of the metrics :meth:`loss` returns (every process reduces each of them)."""

    def weight(self, examples: Sequence[Any]) -> int:
        """The units the loss of ``examples`` is summed over (tokens, pairs, ...)."""

    def tokens(self, example: Any) -> int:
        """Input tokens of one example, for throughput figures."""

    def loss(self, module: nn.Module, examples: Sequence[Any],
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss of a micro-batch (0-d, differentiable) and summed metrics (detached)."""


class CausalLMObjective:
    """Next-token loss on trained tokens, micro-batches packed padding-free into one row."""

    metric_keys = ()

    def __init__(self, model: nn.Module, chunk_size: int = CHUNK) -> None:
        self.module = CausalLMLoss(model, chunk_size)

    def weight(self, examples: Sequence[TokenizedExample]) -> int:
        return sum(ex.num_targets for ex in examples)

    def tokens(self, example: TokenizedExample) -> int:
        return len(example)

    def loss(self, module, examples, device):
        packed = pack(list(examples))
        nll, _ = module(packed["input_ids"].to(device), packed["targets"].to(device),
                        position_ids=packed["position_ids"].to(device), seq_lens=packed["seq_lens"])
        return nll, {}


class ResponsesObjective:
    """Base of the objectives whose examples are prompts with their responses
    (:class:`tuneforge.train.scoring.TokenizedResponses`: pairs, rankings, ratings, unpaired):
    losses and metrics are sums over examples, and an example's tokens are all its sequences'."""

    def weight(self, items: Sequence[Any]) -> int:
        return len(items)

    def tokens(self, item: Any) -> int:
        return sum(len(s) for s in item.sequences)
