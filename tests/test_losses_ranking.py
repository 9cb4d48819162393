"""Policy-side listwise losses (LiPO-style Plackett-Luce, RRHF): hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.losses.preference import PreferenceInputs, dpo_loss
from tuneforge.losses.ranking import lipo_listmle_loss, rrhf_loss
from tuneforge.losses.reward import ranking_mask


def test_lipo_of_two_responses_is_dpo():
    logps = torch.tensor([[-3.0, -5.0], [-6.0, -4.0]])
    ref = torch.tensor([[-4.0, -4.0], [-5.0, -5.0]])
    loss, _ = lipo_listmle_loss(logps, ref, beta=0.5)
    dpo = dpo_loss(PreferenceInputs(logps[:, 0], logps[:, 1], torch.ones(2), torch.ones(2),
                                    ref[:, 0], ref[:, 1]), beta=0.5)
    torch.testing.assert_close(loss, dpo.losses.mean())


def test_lipo_hand_computed_with_ragged_lists():
    logps = torch.tensor([[-2.0, -4.0, -9.0], [-1.0, -3.0, 0.0]])
    ref = torch.full((2, 3), -3.0)
    # implicit rewards with beta = 1: (1, -1, -6) and (2, 0, padding)
    loss, metrics = lipo_listmle_loss(logps, ref, ranking_mask(torch.tensor([3, 2]), 3), beta=1.0)
    first = (math.log(math.exp(1) + math.exp(-1) + math.exp(-6)) - 1
             + math.log(math.exp(-1) + math.exp(-6)) + 1)
    second = math.log1p(math.exp(-2))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx((7 + 2) / 2)
    assert metrics["pair_accuracy"].item() == 1.0


def test_lipo_gradient_lifts_the_best_and_lowers_the_worst():
    logps = torch.full((1, 3), -4.0, requires_grad=True)
    lipo_listmle_loss(logps, torch.full((1, 3), -4.0))[0].backward()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 2]


def test_rrhf_hand_computed():
    # already in order by mean log-prob (-1, -2, -3): only the SFT term, the best's mean NLL
    loss, metrics = rrhf_loss(torch.tensor([[-2.0, -4.0, -9.0]]), torch.tensor([[2, 2, 3]]))
    assert loss.item() == pytest.approx(1.0) and metrics["rank_loss"].item() == 0.0
    # mean log-probs (-3, -1, -1): pairs (0,1) and (0,2) each cost 2, (1,2) ties at 0
    loss, metrics = rrhf_loss(torch.tensor([[-6.0, -2.0, -3.0]]), torch.tensor([[2, 2, 3]]),
                              sft_weight=0.5)
    assert metrics["rank_loss"].item() == pytest.approx(4.0)
    assert metrics["sft_loss"].item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(4.0 + 0.5 * 3.0)


def test_rrhf_ignores_padding_and_lifts_the_best():
    logps = torch.tensor([[-6.0, -2.0, 50.0]], requires_grad=True)
    loss, metrics = rrhf_loss(logps, torch.tensor([[2, 2, 1]]), ranking_mask(torch.tensor([2]), 3))
    assert metrics["rank_loss"].item() == pytest.approx(2.0)  # the padded 50 takes no part
    loss.backward()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 1] and logps.grad[0, 2] == 0
