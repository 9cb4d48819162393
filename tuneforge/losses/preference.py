"""Offline preference losses (the DPO family): sequence log-probs in, per-pair losses out.

Every loss takes a :class:`PreferenceInputs` (sums of token log-probs of the chosen and the
rejected response under the policy and, for reference-based losses, under the reference model,
plus their trained-token counts) and returns a :class:`PreferenceOutput` of ``[B]`` tensors.
The implicit rewards are what gets logged as "reward margin" and "reward accuracy".

Recipes pick a loss by name from :data:`PREFERENCE_LOSSES`; ``needs_reference`` says whether
reference log-probs must be computed for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceInputs:
    """Per-pair sequence statistics, all ``[B]``.

    ``*_logps`` are sums of log p(token) over the response's trained tokens; ``*_tokens`` are
    those token counts (for length-normalised losses). Reference log-probs are ``None`` for
    reference-free losses.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None


@dataclass
class PreferenceOutput:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable[..., PreferenceOutput]
    needs_reference: bool
    doc: str


def _log_ratios(x: PreferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        raise ValueError("this loss needs reference log-probs")
    return x.chosen_logps - x.ref_chosen_logps, x.rejected_logps - x.ref_rejected_logps


def dpo_loss(x: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 0.0,
             **_: float) -> PreferenceOutput:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))``.

    ``label_smoothing`` > 0 gives conservative DPO (cDPO): the preference label is assumed
    flipped with that probability.
    """
    chosen, rejected = _log_ratios(x)
    logits = beta * (chosen - rejected)
    losses = (-F.logsigmoid(logits) * (1 - label_smoothing)
              - F.logsigmoid(-logits) * label_smoothing)
    return PreferenceOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, needs_reference=True, doc="sigmoid DPO (cDPO with label_smoothing)"),
}
