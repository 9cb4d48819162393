"""Online RL pieces for PPO and GRPO: per-token tensors in, ``(loss, metrics)`` out.

Shapes: ``B`` sampled completions, ``T`` completion positions; ``logprobs[b, t]`` is the log-prob
of the sampled token ``t`` under the policy being trained, ``old_logprobs`` under the policy that
sampled it, ``ref_logprobs`` under the frozen reference; ``mask[b, t]`` is 1 on real completion
tokens and 0 on padding (valid tokens first: right padding). Losses are means over the masked
tokens (or sequences); metrics are detached 0-d tensors.

PPO: Schulman et al. 2017 (clipped surrogate), GAE from Schulman et al. 2016, the per-token KL
penalty and score on the last token as in Ziegler et al. 2019 / InstructGPT (Ouyang et al. 2022).
GRPO: Shao et al. 2024 (DeepSeekMath). KL estimators: Schulman, "Approximating KL divergence"
(2020).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tuneforge.losses import LossAndMetrics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set, over ``dim`` (all dimensions when None)."""
    kept = x * mask
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked entries (over ``dim``, or all); 0 where nothing is masked in."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (all dimensions), Bessel-corrected by default."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to unit variance (and zero mean if ``shift_mean``).

    Statistics over all masked entries of the batch; masked-out entries come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = ``log π - log π_ref``: unbiased per-token estimate of KL(π‖π_ref), high variance."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ``½ (log π - log π_ref)²``: biased but low variance, always ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = ``r - 1 - log r`` with ``r = π_ref/π``: unbiased, low variance, always ≥ 0."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - 1 - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}
"""Per-token estimators of KL(π‖π_ref) from tokens sampled from π: ``fn(logprobs, ref)``."""


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token; no gradient.

    ``rewards``, ``values``, ``mask``: ``[B, T]``. ``δ_t = r_t + γ·V_{t+1} - V_t`` with
    ``V = 0`` after the last valid token; ``A_t = δ_t + γλ·A_{t+1}``. Returns
    ``(advantages, returns = advantages + values)``, both 0 on padding.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    running = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages.append(running)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, (advantages + values) * mask


def _clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       advantages: torch.Tensor, clip_low: float,
                       clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``max(-A·ρ, -A·clip(ρ))`` with ``ρ = π/π_old``; also ``ρ`` and where clipping won."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def _surrogate_metrics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ratio: torch.Tensor,
                       was_clipped: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip fraction, KL(π_old‖π) by k3 (tokens were sampled from π_old) and the mean ratio."""
    with torch.no_grad():
        return {"clipfrac": masked_mean(was_clipped.float(), mask),
                "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), mask),
                "ratio": masked_mean(ratio, mask)}


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
) -> LossAndMetrics:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), mean over masked tokens.

    All inputs ``[B, T]``. Per token ``max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε_high))``, ``ρ = π/π_old``;
    ``clip_range_high`` (DAPO's "clip higher") defaults to ``clip_range``. Metrics:
    ``clipfrac`` (tokens where the clipped term was taken), ``approx_kl`` (KL(π_old‖π), k3),
    ``ratio`` (mean ρ).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    per_token, ratio, was_clipped = _clipped_surrogate(logprobs, old_logprobs, advantages,
                                                       clip_range, high)
    loss = masked_mean(per_token, mask)
    return loss, _surrogate_metrics(logprobs, old_logprobs, ratio, was_clipped, mask)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> LossAndMetrics:
    """Clipped value loss ``½·max((V-R)², (V_clip-R)²)``, mean over masked tokens.

    All inputs ``[B, T]``; ``V_clip = V_old + clip(V - V_old, ±clip_range_value)`` keeps the
    value head near the one that produced the returns (``None``: no clipping). Metrics:
    ``vf_clipfrac`` and ``explained_variance`` (1 - Var[R - V] / Var[R]).
    """
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        clipped = unclipped
    else:
        near = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
        clipped = (near - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        explained = 1 - masked_var(returns - values, mask) / masked_var(returns, mask)
        metrics = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "explained_variance": explained}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dimension: ``[..., V]`` -> ``[...]``.

    Rows are processed ``chunk_size`` at a time in fp32, so the fp32 copy of the probabilities
    never covers the whole ``[B, T, V]`` tensor at once. Differentiable (for an entropy bonus).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size):
        logp = F.log_softmax(chunk.float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std",
                    eps: float = 1e-4) -> LossAndMetrics:
    """Group-relative advantages (GRPO, Shao et al. 2024): no value network.

    ``rewards``: ``[B]``, ``B = groups × group_size``, each group's completions contiguous (all
    answers to one prompt). ``A = r - mean(group)``, divided by ``std(group) + eps``
    (Bessel-corrected) when ``scale="std"``; ``scale="none"`` keeps the raw difference (Dr.
    GRPO, Liu et al. 2025). Metrics: ``reward`` (mean), ``reward_std`` (mean within-group
    std) and ``zero_std_fraction`` (groups that all scored alike: no learning signal).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (>= 2)")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True)
    advantages = centred / (std + eps) if scale == "std" else centred
    metrics = {"reward": groups.mean(), "reward_std": std.mean(),
               "zero_std_fraction": (std < 1e-8).float().mean()}
    return advantages.view(-1), metrics


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "token",
    clip_range_high: float | None = None,
) -> LossAndMetrics:
    """GRPO objective: the clipped surrogate with one advantage per sequence, plus a k3 KL.

    ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``: ``[B, T]``; ``advantages``:
    ``[B]`` (from :func:`grpo_advantages`). ``old_logprobs=None`` means one update per sample
    (``π_old = π`` detached, ρ = 1 but the gradient flows). Per token:
    ``max(-A·ρ, -A·clip(ρ)) + beta·k3(π, π_ref)``. ``aggregation="sequence"``: mean over each
    sequence's tokens, then over sequences (the paper's eq. 3); ``"token"``: mean over all
    tokens of the batch, so long answers are not down-weighted (DAPO, Yu et al. 2025).
    Metrics: ``clipfrac``, ``approx_kl``, ``ratio`` and, with ``beta``, ``kl`` to the reference.
    """
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs
    high = clip_range if clip_range_high is None else clip_range_high
    per_token, ratio, was_clipped = _clipped_surrogate(logprobs, old_logprobs,
                                                       advantages[:, None], clip_range, high)
    metrics = _surrogate_metrics(logprobs, old_logprobs, ratio, was_clipped, mask)
    if beta:
        if ref_logprobs is None:
            raise ValueError("grpo_loss with beta > 0 needs ref_logprobs")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if aggregation == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = masked_mean(per_token, mask, dim=1).mean()
    return loss, metrics


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> LossAndMetrics:
    """Per-token PPO rewards: ``-kl_coef·KL_t`` everywhere, plus the score on the last token.

    ``scores``: ``[B]`` (reward model or verifier); the others ``[B, T]``. The KL penalty keeps
    the policy near the reference (Ziegler et al. 2019); ``estimator`` picks k1/k2/k3 from
    :data:`KL_ESTIMATORS`. Every row needs at least one valid token. Returns ``[B, T]`` rewards
    (0 on padding) and metrics ``kl`` (mean per-sequence summed KL), ``non_score_reward``
    (mean per-sequence penalty) and ``score``.
    """
    valid = mask.bool()
    if not valid.any(-1).all():
        raise ValueError("kl_penalized_rewards: a completion has no valid token")
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * valid
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=1).values
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    metrics = {"kl": kl.sum(1).mean(), "non_score_reward": -kl_coef * kl.sum(1).mean(),
               "score": scores.float().mean()}
    return rewards, metrics
