"""Listwise ranking losses for the policy: ``K`` ranked responses per prompt, best first.

Both losses take ``[B, K]`` sequence log-probs (sums over each response's trained tokens) of
responses whose columns are ordered best first, with a ``[B, K]`` bool ``mask`` for ragged lists
(:func:`tuneforge.losses.reward.ranking_mask` builds it from lengths), and return
``(loss, metrics)``: the loss a mean over lists, the metrics detached 0-d tensors.
"""

from __future__ import annotations

import torch

from tuneforge.losses import LossAndMetrics
from tuneforge.losses.reward import ordered_pairs, plackett_luce_loss, ranking_metrics, resolve_mask


def lipo_listmle_loss(logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor | None = None,
                      beta: float = 0.1) -> LossAndMetrics:
    """Plackett-Luce (ListMLE) on DPO implicit rewards, as in LiPO (Liu et al. 2024).

    The implicit reward of response ``i`` is ``beta·(logps_i - ref_logps_i)``; the loss is the
    negative log-likelihood of the given ranking under Plackett-Luce on those rewards. For
    ``K = 2`` it is exactly the DPO loss. Metrics: ``pair_accuracy``, ``kendall_tau`` and
    ``spearman`` of the implicit rewards against the ranking, and ``reward_margin``, the mean
    gap between each list's best and worst valid response.
    """
    mask = resolve_mask(logps, mask)
    rewards = beta * (logps.float() - ref_logps.float())
    loss, metrics = plackett_luce_loss(rewards, mask)
    metrics["reward_margin"] = best_worst_gap(rewards.detach(), mask)[mask.sum(-1) >= 2].mean()
    return loss, metrics


def best_worst_gap(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: each list's first (best) valid value minus its last (worst) valid one; 0 for a
    list with fewer than two valid entries."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    first = torch.where(mask, positions, mask.shape[-1]).min(-1).values.clamp(max=mask.shape[-1] - 1)
    last = torch.where(mask, positions, -1).max(-1).values.clamp(min=0)
    gaps = values.gather(-1, first[:, None])[:, 0] - values.gather(-1, last[:, None])[:, 0]
    return torch.where(mask.sum(-1) >= 2, gaps, torch.zeros_like(gaps))


def rrhf_loss(logps: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
              sft_weight: float = 1.0) -> LossAndMetrics:
    """RRHF (Yuan et al. 2023): rank responses by length-normalised log-prob, plus SFT.

    ``logps``: ``[B, K]`` summed log-probs, ``tokens``: ``[B, K]`` their token counts, best
    first. With ``p_i = logps_i / tokens_i``, the ranking term sums ``max(0, p_j - p_i)`` over
    every pair ``i`` ranked above ``j``; the SFT term is the mean token NLL of the best
    response, ``-p_0``. Per list: ``rank + sft_weight · sft``; averaged over lists. No
    reference model. Metrics: ``rank_loss``, ``sft_loss`` and the ranking metrics of ``p``.
    """
    mask = resolve_mask(logps, mask)
    p = logps.float() / tokens.clamp(min=1)
    pairs = ordered_pairs(mask)
    rank = (torch.relu(p[:, None, :] - p[:, :, None]) * pairs).sum((-2, -1))
    first = mask.float().argmax(-1, keepdim=True)  # the best valid response of each list
    sft = -p.gather(-1, first)[:, 0]
    loss = (rank + sft_weight * sft).mean()
    metrics = ranking_metrics(p.detach(), mask)
    metrics.update(rank_loss=rank.detach().mean(), sft_loss=sft.detach().mean())
    return loss, metrics
