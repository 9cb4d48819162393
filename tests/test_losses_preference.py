"""DPO-family and KTO losses: hand-computed values, gradient directions, parity with TRL."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceInputs,
    kto_kl_estimate,
    kto_loss,
    kto_metrics,
    preference_metrics,
)

pytest.importorskip("trl")
from trl_reference import (  # noqa: E402
    assert_grads_close,
    borrow,
    fused_tiny_llama,
    grads,
    prompt_completion_batch,
    sequence_logps,
)


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def nls(z: float) -> float:
    """-log sigmoid(z)."""
    return math.log1p(math.exp(-z))


# Two pairs: log-ratios Δc = (1, -1), Δr = (-1, 1); token counts chosen (2, 3), rejected (4, 2).
HAND = PreferenceInputs(
    chosen_logps=torch.tensor([-3.0, -6.0]), rejected_logps=torch.tensor([-5.0, -4.0]),
    chosen_tokens=torch.tensor([2, 3]), rejected_tokens=torch.tensor([4, 2]),
    ref_chosen_logps=torch.tensor([-4.0, -5.0]), ref_rejected_logps=torch.tensor([-4.0, -5.0]),
)
DC, DR = (1.0, -1.0), (-1.0, 1.0)
B = 0.5  # beta: z = beta·(Δc - Δr) = (1, -1)


def _exo(z: float, eps: float) -> float:
    return sig(z) * (math.log(sig(z)) - math.log(1 - eps)) + sig(-z) * (math.log(sig(-z)) - math.log(eps))


def _discopop(z: float, tau: float) -> float:
    w = sig(z / tau)
    return (1 - w) * nls(z) + w * math.exp(-z)


def _orpo(c: float, r: float, lam: float) -> float:
    """c, r: per-token mean log-probs; odds p/(1-p) with p = exp(mean)."""
    log_odds = math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
    return -c + lam * nls(log_odds)


# name -> (options, expected per-pair losses written out from the papers' formulas)
EXPECTED = {
    "dpo": ({}, [nls(1), nls(-1)]),
    "robust": ({"label_smoothing": 0.1},
               [(0.9 * nls(1) - 0.1 * nls(-1)) / 0.8, (0.9 * nls(-1) - 0.1 * nls(1)) / 0.8]),
    "ipo": ({}, [(1 / 2 + 1 / 4 - 1) ** 2, (-1 / 3 - 1 / 2 - 1) ** 2]),
    "hinge": ({}, [0.0, 2.0]),
    "sppo_hard": ({}, [0.0, 8.0]),
    "nca_pair": ({}, [nls(0.5) + 0.5 * nls(-0.5) + 0.5 * nls(0.5),
                      nls(-0.5) + 0.5 * nls(0.5) + 0.5 * nls(-0.5)]),
    "apo_zero": ({}, [1 - sig(0.5) + sig(-0.5), 1 - sig(-0.5) + sig(0.5)]),
    "apo_down": ({}, [sig(0.5) + 1 - sig(1), sig(-0.5) + 1 - sig(-1)]),
    "exo_pair": ({"label_smoothing": 0.01}, [_exo(1, 0.01), _exo(-1, 0.01)]),
    "discopop": ({"tau": 0.5}, [_discopop(1, 0.5), _discopop(-1, 0.5)]),
    # reference-free, on mean log-probs: chosen (-1.5, -2), rejected (-1.25, -2)
    "simpo": ({"gamma": 0.25}, [nls(B * (-1.5 + 1.25) - 0.25), nls(B * 0 - 0.25)]),
    "orpo": ({}, [_orpo(-1.5, -1.25, B), _orpo(-2.0, -2.0, B)]),
}


def test_every_registered_loss_has_a_hand_computed_case():
    assert set(EXPECTED) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_matches_hand_computation(name):
    options, expected = EXPECTED[name]
    spec = PREFERENCE_LOSSES[name]
    keyword_only = {n for n, p in inspect.signature(spec.fn).parameters.items()
                    if p.kind == p.KEYWORD_ONLY}
    assert set(options) <= keyword_only  # the options config validation accepts
    out = spec.fn(HAND, beta=B, **options)
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_cdpo_label_smoothing_mixes_in_the_flipped_label():
    out = PREFERENCE_LOSSES["dpo"].fn(HAND, beta=B, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.9 * nls(1) + 0.1 * nls(-1),
                                                         0.9 * nls(-1) + 0.1 * nls(1)]))


def test_rewards_and_metrics():
    out = PREFERENCE_LOSSES["dpo"].fn(HAND, beta=B)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.5]))
    assert not out.chosen_rewards.requires_grad
    means = preference_metrics(out)
    assert means["rewards/margin"].item() == pytest.approx(0.0)
    assert means["rewards/accuracy"].item() == pytest.approx(0.5)
    sums = preference_metrics(out, reduction="sum")
    assert sums["rewards/accuracy"].item() == pytest.approx(1.0)
    assert sums["rewards/chosen"].item() == pytest.approx(0.0)
    # reference-free losses reward beta · mean log-prob
    simpo = PREFERENCE_LOSSES["simpo"].fn(HAND, beta=2.0)
    torch.testing.assert_close(simpo.chosen_rewards, torch.tensor([-3.0, -4.0]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """From a tie (policy = reference, chosen = rejected) every loss prefers the chosen answer."""
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-4.0, -6.0], requires_grad=True)
    x = PreferenceInputs(chosen, rejected, torch.tensor([4, 3]), torch.tensor([4, 3]),
                         torch.tensor([-4.0, -6.0]), torch.tensor([-4.0, -6.0]))
    spec = PREFERENCE_LOSSES[name]
    spec.fn(x, beta=B, **EXPECTED[name][0]).losses.sum().backward()
    assert (rejected.grad > 0).all()
    if name == "apo_down":  # "lower both, rejected more": at a tie only the rejected side moves
        assert torch.allclose(chosen.grad, torch.zeros(2))
    else:
        assert (chosen.grad < 0).all()


def test_reference_needs():
    free = PreferenceInputs(HAND.chosen_logps, HAND.rejected_logps, HAND.chosen_tokens,
                            HAND.rejected_tokens)
    for spec in PREFERENCE_LOSSES.values():
        if spec.needs_reference:
            with pytest.raises(ValueError, match="reference"):
                spec.fn(free, beta=B)
        else:
            torch.testing.assert_close(spec.fn(free, beta=B).losses, spec.fn(HAND, beta=B).losses)


def test_bad_smoothing_is_a_config_error():
    with pytest.raises(ConfigError, match="label_smoothing"):
        PREFERENCE_LOSSES["robust"].fn(HAND, beta=B, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        PREFERENCE_LOSSES["exo_pair"].fn(HAND, beta=B, label_smoothing=0.0)


def test_orpo_is_stable_for_likely_responses():
    """Mean log-probs near 0 (p -> 1) must not overflow the odds."""
    x = PreferenceInputs(torch.tensor([-1e-7]), torch.tensor([-30.0]), torch.tensor([1]),
                         torch.tensor([1]))
    assert torch.isfinite(PREFERENCE_LOSSES["orpo"].fn(x, beta=B).losses).all()


# --- KTO ---------------------------------------------------------------------------------

def test_kto_hand_computed():
    policy = torch.tensor([-2.0, -3.0, -1.0])
    ref = torch.tensor([-3.0, -2.0, -1.0])  # log-ratios 1, -1, 0
    desirable = torch.tensor([True, False, False])
    out = kto_loss(policy, ref, desirable, kl=0.4, beta=0.5, desirable_weight=2.0,
                   undesirable_weight=0.5)
    expected = [2.0 * (1 - sig(0.5 * (1 - 0.4))), 0.5 * (1 - sig(0.5 * (0.4 + 1))),
                0.5 * (1 - sig(0.5 * 0.4))]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    m = kto_metrics(out, desirable)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["kl"].item() == pytest.approx(0.4)


def test_kto_reference_point_is_a_clamped_detached_mean():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    est = kto_kl_estimate(policy, torch.tensor([-2.0, -2.5]))
    assert est.item() == pytest.approx(0.75) and not est.requires_grad
    assert kto_kl_estimate(policy, torch.tensor([0.0, 0.0])).item() == 0.0


def test_kto_gradient_directions():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    kto_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), 0.0).losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


# --- parity with TRL ---------------------------------------------------------------------

PAIRS = 3


@pytest.fixture(scope="module")
def models():
    return fused_tiny_llama(seed=0), fused_tiny_llama(seed=1)


@pytest.fixture(scope="module")
def pair_batch():
    """3 pairs as TRL's DPO collator lays them out: the chosen rows, then the rejected rows."""
    return prompt_completion_batch([2, 3, 4, 2, 3, 4], [5, 3, 4, 4, 6, 2], width=10, seed=0)


# our name -> (TRL DPOTrainer loss_type, options)
TRL_DPO = {
    "dpo": ("sigmoid", {}),
    "robust": ("robust", {"label_smoothing": 0.2}),
    "ipo": ("ipo", {}),
    "hinge": ("hinge", {}),
    "sppo_hard": ("sppo_hard", {}),
    "nca_pair": ("nca_pair", {}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "exo_pair": ("exo_pair", {"label_smoothing": 0.01}),
    "discopop": ("discopop", {"tau": 0.05}),
}


@pytest.mark.parametrize("name", sorted(TRL_DPO))
def test_dpo_family_matches_trl(name, models, pair_batch):
    """Calls ``DPOTrainer._compute_loss`` itself (TRL 1.16 computes the loss inline there).

    TRL scores the policy through its fused LM head; the reference log-probs are handed to it
    precomputed. Compared: the batch loss, the parameter gradients and the logged rewards.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    policy, ref = models
    loss_type, options = TRL_DPO[name]
    beta = 0.5
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, **pair_batch)
    trainer = borrow(
        DPOTrainer, ("_compute_loss",), model=policy, beta=beta, loss_types=[loss_type],
        loss_weights=[1.0], label_smoothing=options.get("label_smoothing", 0.0),
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        use_weighting=False, aux_loss_enabled=False,
        args=SimpleNamespace(discopop_tau=options.get("tau", 0.05)))
    inputs = dict(pair_batch, ref_chosen_logps=ref_logps[:PAIRS], ref_rejected_logps=ref_logps[PAIRS:])
    theirs = trainer._compute_loss(policy, inputs, return_outputs=False)
    theirs.backward()
    their_grads = grads(policy)

    logps, tokens = sequence_logps(policy, **pair_batch)
    x = PreferenceInputs(logps[:PAIRS], logps[PAIRS:], tokens[:PAIRS], tokens[PAIRS:],
                         ref_logps[:PAIRS], ref_logps[PAIRS:])
    out = PREFERENCE_LOSSES[name].fn(x, beta=beta, **options)
    ours = out.losses.mean()
    ours.backward()
    assert ours.item() > 0.05  # away from a trivial optimum
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads(policy), their_grads)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    metrics = preference_metrics(out)
    for ours_key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
                              ("rewards/accuracy", "rewards/accuracies")]:
        assert metrics[ours_key].item() == pytest.approx(logged[trl_key], rel=1e-4, abs=1e-5)


def _mean_logp_pairs(seed: int) -> tuple[PreferenceInputs, torch.Tensor, torch.Tensor]:
    """Random pairs; returns our inputs and the per-token mean log-probs TRL's CPO/ORPO take."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 9, (2, 6), generator=gen)
    means = -torch.rand(2, 6, generator=gen) * 3 - 0.05
    x = PreferenceInputs(means[0] * tokens[0], means[1] * tokens[1], tokens[0], tokens[1])
    return x, means[0], means[1]


def test_simpo_matches_trl_cpo_trainer():
    """``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``, on the mean log-probs it is given."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    x, chosen, rejected = _mean_logp_pairs(1)
    trainer = borrow(CPOTrainer, ("cpo_loss",), alpha=0.0, loss_type="simpo", beta=2.0,
                     simpo_gamma=0.7, label_smoothing=0.1)
    losses, chosen_rewards, _ = trainer.cpo_loss(chosen, rejected)
    out = PREFERENCE_LOSSES["simpo"].fn(x, beta=2.0, gamma=0.7, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)


def test_orpo_odds_ratio_term_matches_trl():
    """``ORPOTrainer.odds_ratio_loss`` gives ``beta·log σ(log odds ratio)``; ORPO's total is
    ``NLL - mean(that)``. Only the odds-ratio term is compared: TRL's NLL is pooled over the
    batch's prompt and response tokens, ours is each pair's response-token mean (checked by hand
    above)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    x, chosen, rejected = _mean_logp_pairs(2)
    trainer = borrow(ORPOTrainer, ("odds_ratio_loss",), beta=0.3)
    trl_term, chosen_rewards, *_ = trainer.odds_ratio_loss(chosen, rejected)
    out = PREFERENCE_LOSSES["orpo"].fn(x, beta=0.3)
    torch.testing.assert_close(out.losses - (-chosen), -trl_term)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)


def test_kto_matches_trl(models):
    """Calls ``KTOTrainer._compute_loss`` (and its ``_compute_kl_logps``) on a tiny model."""
    from trl.trainer.kto_trainer import KTOTrainer

    policy, ref = models
    batch = prompt_completion_batch([2, 3, 4, 3], [5, 3, 4, 4], width=10, seed=3)
    mismatched = prompt_completion_batch([2, 3, 4, 3], [4, 4, 5, 3], width=10, seed=4)
    desirable = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, **batch)
        # TRL takes the reference's log-probs of the mismatched pairs precomputed; put them
        # below the policy's so that the reference point is positive, not clamped to 0.
        ref_kl_logps = sequence_logps(policy, **mismatched)[0] - torch.tensor([0.2, 0.9, 0.4, 0.7])
    trainer = borrow(KTOTrainer, ("_compute_loss", "_compute_kl_logps"), model=policy,
                     calculate_KL=True, precompute_ref_logps=True, aux_loss_enabled=False,
                     loss_type="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    inputs = dict(batch, label=desirable, ref_logps=ref_logps, ref_KL_logps=ref_kl_logps,
                  KL_input_ids=mismatched["input_ids"],
                  KL_attention_mask=mismatched["attention_mask"],
                  KL_completion_mask=mismatched["completion_mask"])
    theirs = trainer._compute_loss(policy, inputs, return_outputs=False)
    theirs.backward()
    their_grads = grads(policy)

    logps, _ = sequence_logps(policy, **batch)
    with torch.no_grad():
        kl = kto_kl_estimate(sequence_logps(policy, **mismatched)[0], ref_kl_logps)
    assert kl.item() == pytest.approx(0.55, abs=1e-5)
    out = kto_loss(logps, ref_logps, desirable.bool(), kl, beta=0.3, desirable_weight=1.5,
                   undesirable_weight=0.7)
    out.losses.mean().backward()
    torch.testing.assert_close(out.losses.mean(), theirs, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads(policy), their_grads)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    metrics = kto_metrics(out, desirable.bool())
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margin"):
        trl_key = key.replace("margin", "margins")
        assert metrics[key].item() == pytest.approx(logged[trl_key], rel=1e-4, abs=1e-5)
