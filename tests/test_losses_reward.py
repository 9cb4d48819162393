"""Reward-model losses and ranking metrics: hand-computed values, scipy and TRL parity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from tuneforge.losses.reward import (
    all_pairs_loss,
    bradley_terry_loss,
    kendall_tau,
    pairwise_accuracy,
    plackett_luce_loss,
    ranking_mask,
    ranking_metrics,
    regression_loss,
    spearman_rho,
)
from tuneforge.models.tiny import TINY_DIMENSIONS


def nls(z: float) -> float:
    """-log sigmoid(z)."""
    return math.log1p(math.exp(-z))


def test_bradley_terry_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((nls(1) + nls(-1)) / 2)
    assert metrics["accuracy"].item() == 0.5 and metrics["margin"].item() == 0.0
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]),
                                 center_coefficient=0.1)
    # centring term: 0.1 · mean((2+1)², (0+1)²) = 0.5
    assert loss.item() == pytest.approx((nls(0.5) + nls(-1)) / 2 + 0.5)


def test_bradley_terry_gradient_separates_the_pair():
    chosen = torch.zeros(3, requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])).item() == \
        pytest.approx(1 / 3)


def test_plackett_luce_hand_computed_with_ragged_lists():
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 5.0]])
    mask = ranking_mask(torch.tensor([3, 2]), 3)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    loss, metrics = plackett_luce_loss(scores, mask)
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1)) - math.log(math.exp(1) / (math.exp(1) + 1))
    second = nls(1)  # the padded 5.0 takes no part
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert metrics["kendall_tau"].item() == pytest.approx(1.0)


def test_plackett_luce_of_two_is_bradley_terry():
    scores = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    pl, _ = plackett_luce_loss(scores)
    bt, _ = bradley_terry_loss(scores[:, 0], scores[:, 1])
    torch.testing.assert_close(pl, bt)


def test_plackett_luce_padding_takes_no_gradient():
    scores = torch.tensor([[1.0, 0.5, 1e4, 1e4]], requires_grad=True)
    loss, _ = plackett_luce_loss(scores, ranking_mask(torch.tensor([2]), 4))
    loss.backward()
    assert loss.item() == pytest.approx(nls(0.5))
    assert scores.grad[0, 2:].tolist() == [0.0, 0.0]
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]


def test_all_pairs_hand_computed():
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 5.0], [3.0, 0.0, 0.0]])
    mask = ranking_mask(torch.tensor([3, 2, 1]), 3)  # the 1-entry list has no pair: left out
    loss, metrics = all_pairs_loss(scores, mask)
    first = (nls(1) + nls(2) + nls(1)) / 3
    assert loss.item() == pytest.approx((first + nls(1)) / 2, rel=1e-6)
    assert metrics["pair_accuracy"].item() == 1.0


def test_regression_hand_computed():
    loss, metrics = regression_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    assert loss.item() == pytest.approx(2.5) and metrics["mae"].item() == pytest.approx(1.5)


def test_rank_correlations_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])  # one discordant pair out of six
    assert kendall_tau(x, y).item() == pytest.approx(4 / 6)
    assert spearman_rho(x, y).item() == pytest.approx(1 - 6 * 2 / (4 * 15))
    tied = torch.tensor([1.0, 1.0, 2.0])  # tau-b and average ranks
    assert kendall_tau(tied, torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(2 / math.sqrt(6))
    assert spearman_rho(tied, torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1.5 / math.sqrt(3))


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (6, 7), generator=gen).double()  # small range: plenty of ties
    y = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 6, 5, 4, 3, 7])
    mask = ranking_mask(lengths, 7)
    tau, rho = kendall_tau(x, y, mask), spearman_rho(x, y, mask)
    for b, n in enumerate(lengths.tolist()):
        xs, ys = x[b, :n].numpy(), y[b, :n].numpy()
        assert tau[b].item() == pytest.approx(stats.kendalltau(xs, ys).statistic, nan_ok=True)
        assert rho[b].item() == pytest.approx(stats.spearmanr(xs, ys).statistic, nan_ok=True)


def test_ranking_metrics_of_right_and_reversed_orders():
    right = ranking_metrics(torch.tensor([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]]))
    assert {k: v.item() for k, v in right.items()} == {"pair_accuracy": 1.0, "kendall_tau": 1.0,
                                                       "spearman": 1.0}
    wrong = ranking_metrics(torch.tensor([[1.0, 2.0, 3.0]]))
    assert wrong["pair_accuracy"].item() == 0.0 and wrong["kendall_tau"].item() == -1.0


def _tiny_reward_model() -> torch.nn.Module:
    config = AutoConfig.for_model("llama", vocab_size=259, num_labels=1, pad_token_id=0,
                                  **TINY_DIMENSIONS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():  # spread the rewards so that the pairs are not all near-ties
        model.score.weight.mul_(30)
    return model


def test_bradley_terry_matches_trl_reward_trainer():
    """Calls ``RewardTrainer.compute_loss`` on a tiny reward model, with margins and centring."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer
    from trl_reference import assert_grads_close, borrow, grads, prompt_completion_batch

    model = _tiny_reward_model()
    batch = prompt_completion_batch([2, 3, 4, 2, 3, 4, 3, 2], [4, 3, 4, 5, 6, 2, 2, 5], width=10,
                                    seed=5)
    del batch["completion_mask"]
    margin = torch.tensor([0.0, 0.5, 1.0, 0.25])
    trainer = borrow(RewardTrainer, ("compute_loss",), model=model,
                     args=SimpleNamespace(center_rewards_coefficient=0.05))
    theirs = trainer.compute_loss(model, dict(batch, margin=margin))
    theirs.backward()
    their_grads = grads(model)

    rewards = model(**batch).logits[:, 0]
    ours, metrics = bradley_terry_loss(rewards[:4], rewards[4:], margin=margin,
                                       center_coefficient=0.05)
    ours.backward()
    torch.testing.assert_close(ours, theirs)
    assert_grads_close(grads(model), their_grads)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert 0 < metrics["accuracy"].item() < 1
    assert metrics["accuracy"].item() == pytest.approx(logged["accuracy"])
    assert metrics["margin"].item() == pytest.approx(logged["margin"], rel=1e-5)
