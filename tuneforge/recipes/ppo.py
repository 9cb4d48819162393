"""Proximal policy optimisation from a reward (PPO, as in Ziegler et al. 2019 / InstructGPT).

config -> prompts (data.train, with the columns the reward reads) -> load model -> adapter /
freeze -> value head -> for each rollout: sample completions with the current policy, score
them with the reward function, per-token rewards = score on the last token minus
``rl.kl_coef`` x KL to the reference, GAE advantages and returns from the value head ->
``rl.ppo_epochs`` passes over ``rl.minibatches`` minibatches of the rollout, each an optimizer
step on the clipped surrogate plus ``rl.vf_coef`` x the clipped value loss -> save adapter or
model with ``value_head.safetensors`` next to it, loss and reward curves, summary.

Why a step of its own: the shared loop (train/loop.py) takes one optimizer step per global
batch, while PPO takes ``ppo_epochs x minibatches`` steps on each rollout, from log-probs and
values frozen when the rollout was made. Everything around the step is shared: the run
lifecycle (train/lifecycle.py: resume, metrics.jsonl, checkpoints, progress, validation
logging), the data order (:func:`global_batches`), AdamW and the schedule, accelerate.

Units: a logged ``step`` is one rollout (``train.batch_size x train.grad_accum`` prompts per
process, ``rl.num_generations`` completions each); ``train.max_steps`` counts rollouts; the
learning-rate schedule runs over the optimizer updates (``optimizer_steps`` in the log).
Advantages are whitened per process's rollout. The value head is ``Linear(hidden, 1)`` on the
policy's final hidden states, sharing the trunk (and the adapter) with the policy.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from tuneforge.config import RLConfig, RunConfig
from tuneforge.losses.rl import (
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from tuneforge.models.attention import use_packed_attention
from tuneforge.models.heads import make_value_head, save_value_head
from tuneforge.train.compile import CompiledLayers, compiled_layers, use_compile
from tuneforge.train.lifecycle import RunLifecycle, TrainResult
from tuneforge.train.loop import (
    global_batches,
    lr_lambda,
    make_optimizer,
    total_steps,
    use_bf16,
)
from tuneforge.train.progress import say
from tuneforge.train.rollouts import (
    Completion,
    PromptItem,
    Sampler,
    finish_online_run,
    rollout_stats,
    start_online_run,
)
from tuneforge.train.scoring import Reference, TokenLogProbs, score_tokens


@dataclasses.dataclass
class Rollout:
    """Completions of one rollout and what the updates need of them, frozen: ``[B, T]`` each."""

    completions: list[Completion]
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, float]


class PPO:
    """The policy with its value head, the reference, the sampler; rollouts and updates."""

    def __init__(self, model: nn.Module, tokenizer, reward_fn, rl: RLConfig) -> None:
        use_packed_attention(model)  # before a full fine-tuning reference copies the model
        self.rl = rl
        self.module = TokenLogProbs(model, make_value_head(model))
        self.reference = Reference.for_rollouts(self.module)
        self.sampler = Sampler(tokenizer, reward_fn, rl, group=rl.num_generations or 1)

    @torch.no_grad()
    def rollout(self, wrapper: nn.Module, prompts: list[PromptItem], device: torch.device,
                autocast) -> Rollout:
        """Sample, score, and compute the frozen log-probs, values, advantages and returns."""
        completions = self.sampler(self.module.model, prompts)
        wrapper.eval()
        with autocast():
            scored = score_tokens(wrapper, completions, device)
            ref = self.reference.token_logps(completions, device)
        mask, logps, values = scored["mask"], scored["logps"].float(), scored["values"].float()
        scores = torch.tensor([c.score for c in completions], device=device)
        rewards, kl_stats = kl_penalized_rewards(scores, logps, ref.float(), mask, self.rl.kl_coef)
        advantages, returns = gae(rewards, values, mask, self.rl.gamma, self.rl.lam)
        if self.rl.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        stats = rollout_stats(completions)
        stats.update({"kl": float(kl_stats["kl"]), "non_score_reward": float(kl_stats["non_score_reward"]),
                      "entropy": float(masked_mean(scored["entropy"], mask)),
                      "value_mean": float(masked_mean(values, mask))})
        return Rollout(completions, logps, values, advantages, returns, mask, stats)

    def minibatch_loss(self, wrapper: nn.Module, ro: Rollout,
                       index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped surrogate + ``vf_coef`` x clipped value loss on the completions ``index``."""
        out = score_tokens(wrapper, [ro.completions[i] for i in index.tolist()], ro.mask.device)
        width = out["mask"].shape[1]  # the minibatch's longest completion

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x[index, :width]

        mask = out["mask"]
        policy_loss, pm = ppo_policy_loss(out["logps"].float(), pick(ro.logps), pick(ro.advantages),
                                          mask, self.rl.clip_range)
        value_loss, vm = ppo_value_loss(out["values"].float(), pick(ro.values), pick(ro.returns),
                                        mask, self.rl.clip_range_value)
        loss = policy_loss + self.rl.vf_coef * value_loss
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), **pm, **vm}
        return loss, metrics


def run_ppo(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one PPO job; returns the summary also written to summary.json."""
    reward_fn, train_set, val_set, model, tokenizer, acc, params = start_online_run(
        config, resume=resume, overwrite=overwrite)
    ppo = PPO(model, tokenizer, reward_fn, config.rl)
    rl = config.rl
    if acc.is_main_process:
        say(f"{len(train_set)} train / {len(val_set)} validation prompts, {ppo.sampler.group} "
            f"completion(s) each; reward {rl.reward}; {rl.ppo_epochs} epoch(s) x "
            f"{rl.minibatches} minibatch(es) per rollout; training {params['trainable']:,} of "
            f"{params['total']:,} parameters ({config.adapter.method}) + value head on "
            f"{acc.device} x{acc.num_processes}")
    result = ppo_loop(ppo, train_set, val_set, config, Path(config.output_dir), acc, resume=resume)
    return finish_online_run(
        model, tokenizer, config, result, acc, params, len(train_set), len(val_set),
        save_extra=lambda folder: save_value_head(ppo.module.value_head, folder),
        num_generations=ppo.sampler.group, ppo_epochs=rl.ppo_epochs, minibatches=rl.minibatches)


def ppo_loop(ppo: PPO, train_set: list[PromptItem], val_set: list[PromptItem], config: RunConfig,
             run_dir: Path, acc, *, resume: bool = False) -> TrainResult:
    """Rollouts and PPO updates; writes metrics.jsonl and checkpoints/ under ``run_dir``."""
    cfg, rl = config.train, config.rl
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(cfg.seed + rank)
    rollouts = total_steps(len(train_set), cfg, world)
    updates_per_rollout = rl.ppo_epochs * rl.minibatches
    optimizer = make_optimizer(ppo.module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, rollouts * updates_per_rollout))
    wrapper, optimizer = acc.prepare(ppo.module, optimizer)
    bf16 = use_bf16(cfg.bf16, acc.device)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    # the update passes, and the rollouts' scoring passes with them (the same kernels, so that
    # the first ratio is 1 in bf16 too); sampling with a KV cache stays eager
    compiled = use_compile(cfg.compile, acc.device, ppo.module, rollouts * updates_per_rollout,
                           auto=False)  # new/old ratios and the KL compare passes: see use_compile
    layers = CompiledLayers(ppo.module) if compiled else None

    life = RunLifecycle(run_dir, cfg, acc, rollouts, acc.unwrap_model(wrapper), optimizer,
                        scheduler, resume=resume, select_best=False,
                        state={"optimizer_steps": 0}, unit="rollout")
    per_process = cfg.batch_size * cfg.grad_accum
    batches = global_batches(len(train_set), per_process * world, cfg.seed, life.start_step)
    for step in life.steps_to_run():
        indices = next(batches)[rank * per_process : (rank + 1) * per_process]
        with compiled_layers(layers):
            ro = ppo.rollout(wrapper, [train_set[i] for i in indices], acc.device, autocast)
        wrapper.train()
        sums: dict[str, float] = {}
        for _ in range(rl.ppo_epochs):
            order = torch.randperm(len(ro.completions), device=acc.device)
            for index in order.chunk(rl.minibatches):
                with autocast(), compiled_layers(layers):
                    loss, metrics = ppo.minibatch_loss(wrapper, ro, index)
                acc.backward(loss)
                if cfg.max_grad_norm:
                    metrics["grad_norm"] = acc.clip_grad_norm_(wrapper.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                metrics["loss"] = loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["updates"] = sums.get("updates", 0.0) + 1
        updates = sums.pop("updates")
        # means over this process's updates and rollout, then over processes
        means = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean"))
                 for k, v in sorted(({k: v / updates for k, v in sums.items()} | ro.stats).items())}
        prompts = {id(c.prompt): c.prompt for c in ro.completions}.values()
        counts = torch.tensor([sum(p.rollout_tokens for p in prompts), float(ro.mask.sum())],
                              device=acc.device)
        step_tokens, trained = (int(x) for x in acc.reduce(counts, "sum").tolist())
        life.state["optimizer_steps"] += int(updates)
        record = {"step": step, "epoch": round(step * per_process * world / len(train_set), 4),
                  "optimizer_steps": life.state["optimizer_steps"], "lr": scheduler.get_last_lr()[0],
                  **means, "tokens": step_tokens, "trained_tokens": trained,
                  "tokens_per_s": step_tokens / life.step_seconds(), "elapsed_s": life.elapsed()}
        life.step_done(step, record, means["loss"], tokens=step_tokens, trained_tokens=trained)
        if val_set and life.eval_due(step):
            life.validated(step, {"val_reward": validation_reward(ppo, val_set, cfg.batch_size, acc)})
        life.checkpoint(step)
    return life.finish()


def validation_reward(ppo: PPO, val_set: list[PromptItem], batch_size: int, acc) -> float:
    """Mean reward of greedy completions of the validation prompts (sharded over processes)."""
    greedy = dataclasses.replace(ppo.sampler, rl=dataclasses.replace(ppo.rl, temperature=0.0),
                                 group=1, on_sample=[])
    mine = val_set[acc.process_index :: acc.num_processes]
    total = 0.0
    for lo in range(0, len(mine), batch_size):
        total += sum(c.score for c in greedy(ppo.module.model, mine[lo : lo + batch_size]))
    summed = acc.reduce(torch.tensor([total, float(len(mine))], device=acc.device), "sum")
    return float(summed[0] / summed[1].clamp(min=1))
