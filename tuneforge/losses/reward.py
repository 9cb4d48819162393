"""Reward-model losses and metrics: scalar scores in, ``(loss, metrics)`` out.

A reward model maps (prompt, response) to one number. It learns from pairwise preferences
(:func:`bradley_terry_loss`), from rankings of two or more responses
(:func:`plackett_luce_loss`, :func:`all_pairs_loss`) or from numeric ratings
(:func:`regression_loss`). Rankings are ``[B, K]`` score tensors whose columns are ordered best
first; lists shorter than ``K`` are padded and marked by a ``[B, K]`` bool ``mask``
(:func:`ranking_mask` builds it from lengths).

Losses are means over the batch (pairs, lists or ratings); metrics are detached 0-d tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.losses import LossAndMetrics


def ranking_mask(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` bool mask with the first ``lengths[b]`` entries of row ``b`` set."""
    return torch.arange(k, device=lengths.device) < lengths[:, None]


def resolve_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mask`` as bool, or all True (every list full) when it is None."""
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen score is strictly higher (a tie counts as wrong)."""
    return (chosen > rejected).float().mean()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> LossAndMetrics:
    """Pairwise Bradley-Terry loss ``-log σ(r_chosen - r_rejected - margin)``, batch mean.

    ``chosen_rewards``, ``rejected_rewards``, ``margin``: ``[B]``. The optional margin (Llama 2,
    Touvron et al. 2023) asks for a larger gap on pairs rated as clearly different.
    ``center_coefficient`` adds ``c · mean((r_chosen + r_rejected)²)`` (Eisenstein et al. 2023)
    to keep rewards centred on zero, since the pairwise loss ignores any shared offset.
    """
    gap = chosen_rewards - rejected_rewards
    target = gap if margin is None else gap - margin
    loss = -F.logsigmoid(target).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {"accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards).detach(),
               "margin": gap.detach().float().mean()}
    return loss, metrics


def _suffix_logsumexp(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = log Σ_{j ≥ i, mask[b, j]} exp(scores[b, j])``, finite everywhere.

    Masked entries get a huge negative score instead of -inf: an all-masked tail then stays
    finite, so its (discarded) terms cannot put NaN into the gradient.
    """
    low = torch.finfo(scores.dtype).min / 4
    filled = scores.masked_fill(~mask, low)
    return torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> LossAndMetrics:
    """Listwise Plackett-Luce negative log-likelihood of the given order (ListMLE; Xia et al. 2008).

    ``scores``: ``[B, K]``, columns ranked best first; ``mask``: ``[B, K]`` bool (padding
    False). The probability of the ranking is ``Π_i exp(s_i) / Σ_{j ≥ i} exp(s_j)`` over the
    valid entries: pick the best out of all, then the next out of the rest, and so on. The loss
    is the per-list NLL (summed over positions), averaged over lists. With ``K = 2`` it is the
    Bradley-Terry loss.
    """
    scores = scores.float()
    mask = resolve_mask(scores, mask)
    terms = (_suffix_logsumexp(scores, mask) - scores).masked_fill(~mask, 0.0)
    loss = terms.sum(-1).mean()
    return loss, ranking_metrics(scores.detach(), mask)


def ordered_pairs(mask: torch.Tensor) -> torch.Tensor:
    """``[..., K, K]``: pairs ``(i, j)`` with ``i`` ranked above ``j`` (``i < j``), both valid."""
    k = mask.shape[-1]
    above = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    return above & mask[..., :, None] & mask[..., None, :]


def all_pairs_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> LossAndMetrics:
    """Bradley-Terry over every ordered pair of each ranking (InstructGPT; Ouyang et al. 2022).

    ``scores``: ``[B, K]`` best first; ``mask``: ``[B, K]``. Each list's loss is the mean of
    ``-log σ(s_i - s_j)`` over its ``C(n, 2)`` pairs ``i`` above ``j``, so every ranking weighs
    the same however long it is; lists with fewer than two entries are left out.
    """
    scores = scores.float()
    mask = resolve_mask(scores, mask)
    pairs = ordered_pairs(mask)
    gaps = scores[:, :, None] - scores[:, None, :]
    per_pair = -F.logsigmoid(gaps) * pairs
    counts = pairs.sum((-2, -1))
    has_pairs = counts > 0
    loss = (per_pair.sum((-2, -1))[has_pairs] / counts[has_pairs]).mean()
    return loss, ranking_metrics(scores.detach(), mask)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> LossAndMetrics:
    """Mean squared error of predicted against rated scores (``[B]`` each), plus MAE."""
    error = pred.float() - target.float()
    return (error**2).mean(), {"mae": error.detach().abs().mean()}


def kendall_tau(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Kendall's tau-b of each row of ``x`` against ``y`` (``[..., K]`` -> ``[...]``).

    Tau-b corrects for ties (as ``scipy.stats.kendalltau`` does): ``(concordant - discordant) /
    sqrt(pairs untied in x · pairs untied in y)``. NaN where either row is constant.
    """
    pairs = ordered_pairs(resolve_mask(x, mask))
    sx = torch.sign(x[..., :, None] - x[..., None, :]) * pairs
    sy = torch.sign(y[..., :, None] - y[..., None, :]) * pairs
    num = (sx * sy).sum((-2, -1))
    den = (sx.abs().sum((-2, -1)) * sy.abs().sum((-2, -1))).sqrt()
    return num / den


def _average_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's valid entries, ties sharing their average rank."""
    valid = mask[..., None, :]
    below = ((x[..., None, :] < x[..., :, None]) & valid).sum(-1)
    equal = ((x[..., None, :] == x[..., :, None]) & valid).sum(-1)
    return below + (equal + 1) / 2


def spearman_rho(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spearman's rank correlation of each row of ``x`` against ``y`` (``[..., K]`` -> ``[...]``).

    Pearson correlation of the average ranks (ties handled as ``scipy.stats.spearmanr``).
    NaN where either row is constant.
    """
    mask = resolve_mask(x, mask)
    m = mask.to(torch.float64)
    n = m.sum(-1, keepdim=True)
    rx, ry = _average_ranks(x, mask) * m, _average_ranks(y, mask) * m
    dx = (rx - (rx.sum(-1, keepdim=True) / n)) * m
    dy = (ry - (ry.sum(-1, keepdim=True) / n)) * m
    return ((dx * dy).sum(-1) / ((dx**2).sum(-1) * (dy**2).sum(-1)).sqrt()).to(x.dtype)


def ranking_metrics(scores: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """How well ``[B, K]`` scores reproduce the best-first order of their columns.

    ``pair_accuracy``: fraction of ordered pairs scored in the right order (ties wrong), over
    all pairs of the batch; ``kendall_tau`` and ``spearman``: means over lists of two or more
    entries whose scores are not all tied.
    """
    scores = scores.detach()
    mask = resolve_mask(scores, mask)
    pairs = ordered_pairs(mask)
    right = (scores[:, :, None] > scores[:, None, :]) & pairs
    truth = -torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype).expand_as(scores)
    tau = kendall_tau(scores, truth, mask)
    rho = spearman_rho(scores, truth, mask)
    return {"pair_accuracy": right.sum() / pairs.sum().clamp(min=1),
            "kendall_tau": tau.nanmean(), "spearman": rho.nanmean()}
