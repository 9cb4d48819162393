"""Group relative policy optimisation (GRPO, Shao et al. 2024), top to bottom.

config -> prompts (data.train, with the columns the reward reads) -> load model -> adapter /
freeze -> shared training loop, whose objective, for each micro-batch of prompts, samples
``rl.num_generations`` completions per prompt with the current policy, scores them with the
reward function and takes a clipped policy-gradient step with group-relative advantages ->
save adapter or model, loss and reward curves, summary.

No value network: a completion's advantage is its reward minus the mean reward of the other
completions of the same prompt (divided by their std), so rewards need only rank answers to one
prompt, as a verifier's pass/fail does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuneforge.config import RLConfig, RunConfig
from tuneforge.losses.rl import grpo_advantages, grpo_loss, masked_mean
from tuneforge.models.attention import use_packed_attention
from tuneforge.rewards import RewardFn
from tuneforge.train.loop import train
from tuneforge.train.progress import say
from tuneforge.train.rollouts import (
    PromptItem,
    Sampler,
    finish_online_run,
    rollout_stats,
    start_online_run,
)
from tuneforge.train.scoring import Reference, TokenLogProbs, score_tokens

DEFAULT_GROUP = 4


class GRPOObjective:
    """A micro-batch of prompts -> a group of sampled completions each -> the GRPO loss.

    One optimisation step per rollout: the completions are sampled by the policy as it is
    before the step, so the "old" log-probs of the clipped objective equal the current ones
    (detached; ratio 1, nothing is clipped) and the loss's gradient is the plain
    group-normalised policy gradient. With ``rl.kl_coef > 0`` a k3 estimate of KL(π‖π_ref) per
    token is added, π_ref being the model with its adapters off.

    Aggregation (``rl.aggregation``): ``token`` averages the per-token loss over all completion
    tokens of the micro-batch, ``sequence`` over each completion's tokens and then completions.
    Either mean is scaled by the micro-batch's number of completions, and :meth:`weight` is the
    number of completions, so the loop's update is the mean over micro-batches weighted by
    their completions (exactly the token mean of the global batch when it is one micro-batch).
    """

    def __init__(self, model: nn.Module, tokenizer, reward_fn: RewardFn, rl: RLConfig) -> None:
        use_packed_attention(model)  # before a full fine-tuning reference copies the model
        self.module = TokenLogProbs(model)
        self.rl = rl
        self.group = rl.num_generations or DEFAULT_GROUP
        self.sampler = Sampler(tokenizer, reward_fn, rl, group=self.group)
        self.reference = Reference.for_rollouts(self.module) if rl.kl_coef else None
        self.compile_auto = False  # new/old ratios and the KL: see train.compile.use_compile
        self.metric_keys = ("reward", "reward_std", "zero_std_fraction", "completion_length",
                            "stopped", "entropy", "clipfrac") + (("kl",) if rl.kl_coef else ())

    def weight(self, prompts: list[PromptItem]) -> int:
        return len(prompts) * self.group

    def tokens(self, prompt: PromptItem) -> int:
        return prompt.rollout_tokens or len(prompt)

    def loss(self, module, prompts, device):
        completions = self.sampler(self.module.model, list(prompts))
        scores = torch.tensor([c.score for c in completions], device=device)
        advantages, group_stats = grpo_advantages(scores, self.group, self.rl.scale_rewards)
        scored = score_tokens(module, completions, device)
        ref = None
        if self.reference is not None:
            ref = self.reference.token_logps(completions, device)
        loss, stats = grpo_loss(scored["logps"], None, ref, advantages, scored["mask"],
                                self.rl.clip_range, self.rl.kl_coef, self.rl.aggregation)
        n = len(completions)
        metrics = {k: torch.as_tensor(v, device=device) * n for k, v in rollout_stats(completions).items()}
        metrics["entropy"] = masked_mean(scored["entropy"], scored["mask"]) * n
        metrics.update({k: v.detach() * n for k, v in group_stats.items() if k != "reward"})
        metrics.update({k: stats[k].detach() * n for k in ("clipfrac", "kl") if k in stats})
        return loss * n, metrics


def run_grpo(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one GRPO job; returns the summary also written to summary.json."""
    reward_fn, train_set, val_set, model, tokenizer, acc, params = start_online_run(
        config, resume=resume, overwrite=overwrite)
    objective = GRPOObjective(model, tokenizer, reward_fn, config.rl)
    if acc.is_main_process:
        say(f"{len(train_set)} train / {len(val_set)} validation prompts, {objective.group} "
            f"completions each; reward {config.rl.reward}; training {params['trainable']:,} of "
            f"{params['total']:,} parameters ({config.adapter.method}) on {acc.device} "
            f"x{acc.num_processes}")
    result = train(model, train_set, val_set, config.train, Path(config.output_dir),
                   resume=resume, accelerator=acc, objective=objective)
    return finish_online_run(model, tokenizer, config, result, acc, params, len(train_set),
                             len(val_set), num_generations=objective.group)
