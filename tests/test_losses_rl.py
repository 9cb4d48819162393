"""PPO/GAE/GRPO pieces: hand-computed values, a naive GAE, Monte Carlo KL, parity with TRL."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tuneforge.losses.rl import (
    KL_ESTIMATORS,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == 1.0
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0]))


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(1.0)
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.5)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(math.exp(-1))


def test_kl_estimators_are_right_on_average():
    """Sampled from π, k1 and k3 average to the exact KL(π‖π_ref); k2 is close for near dists."""
    gen = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.4, 0.4, 0.2])
    exact = (pi * (pi / ref).log()).sum().item()
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    logp, ref_logp = pi.log()[tokens], ref.log()[tokens]
    assert KL_ESTIMATORS["k1"](logp, ref_logp).mean().item() == pytest.approx(exact, abs=2e-3)
    assert KL_ESTIMATORS["k3"](logp, ref_logp).mean().item() == pytest.approx(exact, abs=1e-3)
    assert KL_ESTIMATORS["k2"](logp, ref_logp).mean().item() == pytest.approx(exact, rel=0.1)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # 9.0 is padding: must not leak in
    advantages, returns = gae(rewards, values, torch.tensor([[1, 1, 1, 0]]), gamma=0.9, lam=0.8)
    # δ2 = 1 - .5 = .5; δ1 = δ0 = .9·.5 - .5 = -.05; A1 = -.05 + .72·.5; A0 = -.05 + .72·A1
    a1 = -0.05 + 0.72 * 0.5
    a0 = -0.05 + 0.72 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.5, 1.0, 0.0]]))


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE straight from its definition: A_t = Σ_l (γλ)^l δ_{t+l}, V = 0 past the end."""
    n = len(rewards)
    v = values + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_matches_its_definition_on_ragged_rows():
    gen = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    lengths = [6, 4, 1]
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]
    advantages, _ = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        expected = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.95, 0.9)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(expected))
        assert advantages[b, n:].abs().sum() == 0


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    _, returns = gae(rewards, torch.randn(1, 3), torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))


def test_ppo_policy_loss_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 7.0]])
    old = torch.zeros(1, 4)
    logprobs = ratios.log().requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token max(-Aρ, -A·clip(ρ)): -1.2 (clipped), 0.8 (clipped), 2.2 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 2.2) / 3)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    loss.backward()
    # clipped tokens and padding get no gradient; the free one gets -A·ρ/3
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 2.2 / 3, 0.0]]))
    higher, _ = ppo_policy_loss(ratios.log(), old, advantages, mask, 0.2, clip_range_high=0.6)
    assert higher.item() == pytest.approx((-1.5 + 0.8 + 2.2) / 3)


def test_ppo_value_loss_hand_computed():
    values = torch.tensor([[1.0, 3.0, 0.0]])
    old = torch.tensor([[0.0, 3.5, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: V moved +1.0, clipped to 0.2: max((1-0)², (0.2-0)²) = 1, the unclipped term;
    # token 1: V moved -0.5, clipped to 3.3: max((3-2)², (3.3-2)²) = 1.69, the clipped one
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69) / 2)
    assert metrics["vf_clipfrac"].item() == pytest.approx(0.5)
    unclipped, _ = ppo_value_loss(values, old, returns, mask, clip_range_value=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_entropy_hand_computed_and_matches_trl():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2)) * 3
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), trl_entropy(logits))


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, metrics = grpo_advantages(rewards, group_size=4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert metrics["zero_std_fraction"].item() == 0.5
    assert metrics["reward"].item() == pytest.approx(1.25)
    raw, _ = grpo_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(raw, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(rewards, group_size=3)


def test_grpo_advantages_match_trl_formula():
    """TRL computes advantages inside ``_generate_and_score_completions``, which also generates
    text, so it cannot be called on given rewards; these are its lines (scale_rewards="group"),
    with TRL's own ``nanstd``."""
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    rewards = torch.randn(12, generator=torch.Generator().manual_seed(3))
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    expected = (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(rewards, 4)[0], expected)


def test_grpo_on_policy_step_is_the_policy_gradient():
    """Without old log-probs the ratio is 1: loss = -mean(A), gradient = -A/n per token."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = grpo_loss(logprobs, None, None, torch.tensor([1.0, -2.0]), mask,
                              aggregation="token")
    assert loss.item() == pytest.approx((-1 - 1 + 2) / 3)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert metrics["clipfrac"].item() == 0.0


def test_grpo_sequence_aggregation_and_kl_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref = logprobs - torch.tensor([[0.1, 0.0], [0.2, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = grpo_loss(logprobs, logprobs, ref, torch.tensor([1.0, -2.0]), mask,
                              beta=0.5, aggregation="sequence")
    k3 = [math.exp(-0.1) - 1 + 0.1, 0.0, math.exp(-0.2) - 1 + 0.2]
    seq1 = (-1 + 0.5 * k3[0] - 1 + 0.5 * k3[1]) / 2
    seq2 = 2 + 0.5 * k3[2]
    assert loss.item() == pytest.approx((seq1 + seq2) / 2, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)


def test_kl_penalized_rewards_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, metrics = kl_penalized_rewards(torch.tensor([1.0, 2.0]), logprobs, ref, mask,
                                            kl_coef=0.1)
    # k1 = (0.5, 0, 1) and (1, 0, padding); the score lands on each row's last valid token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, -0.1 + 1.0],
                                                      [-0.1, 0.0 + 2.0, 0.0]]))
    assert metrics["kl"].item() == pytest.approx(1.25)
    assert metrics["non_score_reward"].item() == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="no valid token"):
        kl_penalized_rewards(torch.ones(1), logprobs[:1], ref[:1], torch.zeros(1, 3), 0.1)


# --- parity with TRL's GRPOTrainer -------------------------------------------------------

PROMPT, COMPLETION = 3, 6


@pytest.fixture(scope="module")
def rollout():
    """4 sampled completions of a tiny policy: tokens, masks, our per-token log-probs."""
    pytest.importorskip("trl")
    from trl_reference import fused_tiny_llama, token_logps

    policy, ref = fused_tiny_llama(seed=0), fused_tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(7)
    prompt_ids = torch.randint(3, 259, (4, PROMPT), generator=gen)
    completion_ids = torch.randint(3, 259, (4, COMPLETION), generator=gen)
    completion_mask = (torch.arange(COMPLETION) < torch.tensor([6, 4, 5, 2])[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        ref_logps = token_logps(ref, input_ids, attention_mask)[:, PROMPT - 1:]
        # the sampling policy: the current one, perturbed so that ratios spread over the clip
        old_logps = (token_logps(policy, input_ids, attention_mask)[:, PROMPT - 1:]
                     + 0.3 * torch.randn(4, COMPLETION, generator=gen))
    return SimpleNamespace(
        policy=policy, input_ids=input_ids, attention_mask=attention_mask,
        mask=completion_mask, ref_logps=ref_logps, old_logps=old_logps,
        inputs={"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
                "completion_ids": completion_ids, "completion_mask": completion_mask,
                "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps})


def _trl_grpo(rollout, advantages: torch.Tensor, loss_type: str, beta: float, eps_low: float,
              eps_high: float) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
    """``GRPOTrainer._compute_loss`` (and its log-prob helper) on the tiny policy."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl_reference import borrow, grads

    trainer = borrow(
        GRPOTrainer, ("_compute_loss", "_get_per_token_logps_and_entropies"),
        model=rollout.policy, loss_type=loss_type, beta=beta, epsilon_low=eps_low,
        epsilon_high=eps_high, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None))
    loss = trainer._compute_loss(rollout.policy, dict(rollout.inputs, advantages=advantages))
    loss.backward()
    return loss, grads(rollout.policy), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _our_logps(rollout) -> torch.Tensor:
    from trl_reference import token_logps

    return token_logps(rollout.policy, rollout.input_ids, rollout.attention_mask)[:, PROMPT - 1:]


@pytest.mark.parametrize(("aggregation", "loss_type"), [("sequence", "grpo"), ("token", "bnpo")])
def test_grpo_loss_matches_trl(rollout, aggregation, loss_type):
    from trl_reference import assert_grads_close, grads

    advantages = torch.tensor([1.2, -0.4, -1.0, 0.2])
    theirs, their_grads, logged = _trl_grpo(rollout, advantages, loss_type, beta=0.04,
                                            eps_low=0.2, eps_high=0.28)
    ours, metrics = grpo_loss(_our_logps(rollout), rollout.old_logps, rollout.ref_logps,
                              advantages, rollout.mask, clip_range=0.2, beta=0.04,
                              aggregation=aggregation, clip_range_high=0.28)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(rollout.policy), their_grads)
    assert 0 < metrics["clipfrac"].item() < 1
    assert metrics["clipfrac"].item() == pytest.approx(logged["clip_ratio/region_mean"])
    assert metrics["kl"].item() == pytest.approx(logged["kl"], rel=1e-4)


def test_ppo_policy_loss_matches_trl_clipped_objective(rollout):
    """TRL 1.16 has no PPO trainer; its GRPO loss with per-token advantages, no KL and
    token-mean aggregation ("bnpo") is PPO's clipped surrogate, so that is the reference."""
    from trl_reference import assert_grads_close, grads

    advantages = torch.randn(4, COMPLETION, generator=torch.Generator().manual_seed(8))
    theirs, their_grads, logged = _trl_grpo(rollout, advantages, "bnpo", beta=0.0,
                                            eps_low=0.2, eps_high=0.2)
    ours, metrics = ppo_policy_loss(_our_logps(rollout), rollout.old_logps, advantages,
                                    rollout.mask, clip_range=0.2)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(rollout.policy), their_grads)
    assert metrics["clipfrac"].item() == pytest.approx(logged["clip_ratio/region_mean"])
