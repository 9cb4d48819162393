"""Offline preference losses (the DPO family, KTO): sequence log-probs in, per-example losses out.

Every paired loss takes a :class:`PreferenceInputs` (sums of token log-probs of the chosen and the
rejected response under the policy and, for reference-based losses, under the reference model,
plus their trained-token counts) and returns a :class:`PreferenceOutput` of ``[B]`` tensors.
The implicit rewards are what gets logged as "reward margin" and "reward accuracy"
(:func:`preference_metrics`).

Recipes pick a loss by name from :data:`PREFERENCE_LOSSES`; ``needs_reference`` says whether
reference log-probs must be computed for it; a loss's options are its keyword-only
parameters besides ``beta``. Unpaired thumbs-up/down data goes through :func:`kto_loss` instead.

Notation in the docstrings: ``Δc = chosen_logps - ref_chosen_logps`` and
``Δr = rejected_logps - ref_rejected_logps`` (log-ratios against the reference), ``σ`` the
logistic function, ``n`` a response's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge.errors import ConfigError


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


def _mean_logps(x: PreferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs of chosen and rejected (an empty response counts as 1 token)."""
    return (x.chosen_logps / x.chosen_tokens.clamp(min=1),
            x.rejected_logps / x.rejected_tokens.clamp(min=1))


def _rewarded(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
              beta: float) -> PreferenceOutput:
    """Output whose rewards are ``beta`` times the per-pair statistics (log-ratios, mean logps)."""
    return PreferenceOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


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
    return _rewarded(losses, chosen, rejected, beta)


def robust_dpo_loss(x: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 0.1,
                    **_: float) -> PreferenceOutput:
    """rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), for labels flipped with prob. ε.

    ``((1-ε)·-log σ(z) - ε·-log σ(-z)) / (1-2ε)`` with ``z = beta·(Δc-Δr)``: unlike cDPO, an
    unbiased estimate of the clean-label DPO loss. ``label_smoothing`` is ε, in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _log_ratios(x)
    z = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _rewarded(losses, chosen, rejected, beta)


def ipo_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """IPO (Azar et al. 2023, eq. 17): ``(Δc/n_c - Δr/n_r - 1/(2·beta))²``.

    The log-ratios are per-token means, as in the authors' experiments (and TRL): with sums the
    squared target would scale with response length. ``beta`` is the paper's τ.
    """
    chosen, rejected = _log_ratios(x)
    gap = chosen / x.chosen_tokens.clamp(min=1) - rejected / x.rejected_tokens.clamp(min=1)
    return _rewarded((gap - 1 / (2 * beta)) ** 2, chosen, rejected, beta)


def hinge_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """SLiC-HF hinge (Zhao et al. 2023) on DPO log-ratios: ``max(0, 1 - beta·(Δc-Δr))``."""
    chosen, rejected = _log_ratios(x)
    return _rewarded(torch.relu(1 - beta * (chosen - rejected)), chosen, rejected, beta)


def sppo_hard_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0.

    ``(Δc - 1/(2·beta))² + (Δr + 1/(2·beta))²``: each log-ratio is regressed to its own target,
    so the chosen response's likelihood rises in absolute terms, not only relative to the
    rejected one.
    """
    chosen, rejected = _log_ratios(x)
    half = 0.5 / beta
    return _rewarded((chosen - half) ** 2 + (rejected + half) ** 2, chosen, rejected, beta)


def nca_pair_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment").

    ``-log σ(beta·Δc) - ½ log σ(-beta·Δc) - ½ log σ(-beta·Δr)``: absolute rewards, so the
    chosen likelihood is not pushed down along with the rejected one.
    """
    chosen, rejected = _log_ratios(x)
    rc, rr = beta * chosen, beta * rejected
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return _rewarded(losses, chosen, rejected, beta)


def apo_zero_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): ``1 - σ(beta·Δc) + σ(beta·Δr)``.

    For chosen answers better than the model's own: raise chosen, lower rejected.
    """
    chosen, rejected = _log_ratios(x)
    losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return _rewarded(losses, chosen, rejected, beta)


def apo_down_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): ``σ(beta·Δc) + 1 - σ(beta·(Δc-Δr))``.

    For chosen answers worse than the model's own: lower both, the rejected one more.
    """
    chosen, rejected = _log_ratios(x)
    losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    return _rewarded(losses, chosen, rejected, beta)


def exo_pair_loss(x: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 1e-3,
                  **_: float) -> PreferenceOutput:
    """EXO (Ji et al. 2024, eq. 16) for two responses: ``KL(q_θ || p)`` over {chosen, rejected}.

    ``q_θ = (σ(z), σ(-z))`` with ``z = beta·(Δc-Δr)``, ``p = (1-ε, ε)``; ε = ``label_smoothing``
    must be > 0 (the target would otherwise put zero mass on the rejected answer).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ConfigError(f"exo_pair: label_smoothing must be in (0, 1), got {label_smoothing}")
    chosen, rejected = _log_ratios(x)
    z = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return _rewarded(losses, chosen, rejected, beta)


def discopop_loss(x: PreferenceInputs, *, beta: float = 0.1, tau: float = 0.05,
                  **_: float) -> PreferenceOutput:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, eq. 5).

    With ``z = beta·(Δc-Δr)`` and ``w = σ(z/tau)``: ``(1-w)·-log σ(z) + w·exp(-z)``, a blend of
    the logistic (DPO) and exponential losses steered by the margin itself.
    """
    chosen, rejected = _log_ratios(x)
    z = beta * (chosen - rejected)
    w = torch.sigmoid(z / tau)
    losses = (1 - w) * -F.logsigmoid(z) + w * torch.exp(-z)
    return _rewarded(losses, chosen, rejected, beta)


def simpo_loss(x: PreferenceInputs, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, **_: float) -> PreferenceOutput:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

    ``-log σ(beta·(mean log p(chosen) - mean log p(rejected)) - gamma)``; ``label_smoothing``
    mixes in the flipped label as in cDPO. Rewards are ``beta · mean log p``.
    """
    chosen, rejected = _mean_logps(x)
    z = beta * (chosen - rejected) - gamma
    losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return _rewarded(losses, chosen, rejected, beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(x: PreferenceInputs, *, beta: float = 0.1, **_: float) -> PreferenceOutput:
    """ORPO (Hong et al. 2024): SFT on the chosen response plus an odds-ratio penalty.

    Per pair: ``mean NLL(chosen) - beta · log σ(log odds(chosen) - log odds(rejected))`` where
    ``odds(y) = p/(1-p)`` with ``p`` the per-token mean probability ``exp(mean log p(y))``.
    ``beta`` is the paper's λ. Reference-free; rewards are ``beta · mean log p``. The SFT term
    is each pair's own per-token mean (TRL pools tokens over the batch, and includes the prompt).
    """
    chosen, rejected = _mean_logps(x)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return _rewarded(losses, chosen, rejected, beta)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, needs_reference=True, doc="sigmoid DPO (cDPO with label_smoothing)"),
    "robust": PreferenceLoss(robust_dpo_loss, True, "rDPO: unbiased under noisy labels"),
    "ipo": PreferenceLoss(ipo_loss, True, "IPO: squared loss on per-token log-ratio gaps"),
    "hinge": PreferenceLoss(hinge_loss, True, "SLiC hinge on DPO log-ratios"),
    "sppo_hard": PreferenceLoss(sppo_hard_loss, True, "SPPO with hard win probabilities"),
    "nca_pair": PreferenceLoss(nca_pair_loss, True, "NCA, pairwise"),
    "apo_zero": PreferenceLoss(apo_zero_loss, True, "APO-zero: chosen better than the model's"),
    "apo_down": PreferenceLoss(apo_down_loss, True, "APO-down: chosen worse than the model's"),
    "exo_pair": PreferenceLoss(exo_pair_loss, True, "EXO, pairwise"),
    "discopop": PreferenceLoss(discopop_loss, True, "DiscoPOP log-ratio modulated loss"),
    "simpo": PreferenceLoss(simpo_loss, False, "SimPO: reference-free, length-normalised margin"),
    "orpo": PreferenceLoss(orpo_loss, False, "ORPO: SFT + odds-ratio term, reference-free"),
}


def preference_metrics(out: PreferenceOutput, reduction: str = "mean") -> dict[str, torch.Tensor]:
    """Logged reward statistics of a batch: 0-d detached tensors.

    ``rewards/accuracy`` counts pairs whose chosen reward is strictly higher. ``reduction="sum"``
    gives sums over pairs instead of means, for a loop that divides by the global pair count.
    """
    margins = out.chosen_rewards - out.rejected_rewards
    per_pair = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margin": margins,
        "rewards/accuracy": (margins > 0).float(),
    }
    reduce = {"mean": torch.mean, "sum": torch.sum}[reduction]
    return {key: reduce(value.detach().float()) for key, value in per_pair.items()}


@dataclass
class KTOOutput:
    losses: torch.Tensor  # [B], weighted
    rewards: torch.Tensor  # [B], detached beta * log-ratio
    kl: torch.Tensor  # 0-d, the reference point z0 that was used


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of ``log π(y'|x) - log π_ref(y'|x)``, ≥ 0.

    ``[B]`` sequence log-probs of *mismatched* completions ``y'`` (each prompt paired with
    another example's completion), so the estimate is not biased by the labels. Detached: no
    gradient flows through the reference point.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, eq. 7) for unpaired thumbs-up/down completions.

    ``policy_logps``, ``ref_logps``: ``[B]`` summed completion log-probs; ``desirable``: ``[B]``
    bool; ``kl``: the reference point from :func:`kto_kl_estimate`. With ``r = beta·(logp -
    ref_logp)`` and ``z0 = beta·kl``, a desirable example costs ``λD·(1 - σ(r - z0))``, an
    undesirable one ``λU·(1 - σ(z0 - r))``. Take the mean of ``losses`` over the batch.
    """
    ratio = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device)
    desirable = desirable.bool()
    value = torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - kl)),
                        1 - torch.sigmoid(beta * (kl - ratio)))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(value.dtype)
    return KTOOutput(weights * value, (beta * ratio).detach(), kl.detach())


def kto_metrics(out: KTOOutput, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean reward of desirable and undesirable examples, their gap, and the KL estimate.

    A group absent from the batch gives NaN for its mean (and the margin).
    """
    desirable = desirable.bool()
    chosen = out.rewards[desirable].float().mean()
    rejected = out.rewards[~desirable].float().mean()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected, "kl": out.kl.float()}
