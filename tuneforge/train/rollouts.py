"""What the online recipes (PPO, GRPO) share: prompts in, sampled completions with their rewards
out.

prompt file (``load_prompts``) -> :class:`PromptItem` (token ids + the columns a reward reads)
-> :class:`Sampler` completions with the policy (generated through the serving engine,
:func:`tuneforge.generation.engine.generate_continuous`: continuous batching with a KV cache)
and score them with the reward function -> :class:`Completion` (prompt + completion token ids),
which tuneforge/train/scoring.py scores token by token under the policy and the reference
(``score_tokens``, ``Reference.token_logps``: right-padded ``[B, T]`` tensors, the shapes
tuneforge.losses.rl takes).

:func:`start_online_run` and :func:`finish_online_run` are the first and last lines both
recipes share (run folder, reward, prompts, model; reward.png and the reward summary).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.config import RLConfig, RunConfig
from tuneforge.data.example import Example
from tuneforge.data.render import IGNORE_INDEX, TokenizedExample, render_prompt
from tuneforge.errors import DataError
from tuneforge.generation.engine import generate_continuous
from tuneforge.models.loading import load_tokenizer
from tuneforge.rewards import RewardFn, call_reward, load_reward_fn
from tuneforge.train.plots import plot_metric
from tuneforge.train.run_folder import check_run_dir, finish_run, setup_model


@dataclass
class PromptItem:
    """One prompt to sample from: its conversation, token ids and reward columns.

    ``text`` is what a reward function receives as the prompt: the last user message.
    ``rollout_tokens`` counts the tokens of its latest rollout (prompt + completions), for the
    throughput figures of the training loop.
    """

    messages: list[dict]
    prompt_ids: list[int]
    text: str
    columns: dict
    where: str
    rollout_tokens: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Completion:
    """One sampled completion of ``prompt``: new token ids (with the stop token when it stopped)."""

    prompt: PromptItem
    ids: list[int]
    text: str
    stopped: bool
    score: float = 0.0

    def sequence(self) -> TokenizedExample:
        """Prompt + completion; only the completion tokens are targets."""
        return TokenizedExample(self.prompt.prompt_ids + self.ids,
                                [IGNORE_INDEX] * len(self.prompt.prompt_ids) + self.ids)


# ------------------------------------------------------------------------------- prompts


def load_prompt_splits(config: RunConfig, tokenizer) -> tuple[list[PromptItem], list[PromptItem]]:
    """Train and validation prompts (data.validation, or data.validation_fraction held out).

    A prompt plus ``rl.max_new_tokens`` must fit ``data.max_length``; longer prompts are an
    error listing them by file:line, or dropped with ``data.too_long=drop``.
    """
    from tuneforge.data.formats import load_prompts

    d = config.data
    train = [_item(ex, tokenizer) for ex in load_prompts(Path(d.train))]
    val = [_item(ex, tokenizer) for ex in load_prompts(Path(d.validation))] if d.validation else []
    if d.validation_fraction:
        random.Random(config.train.seed).shuffle(train)
        n_val = max(1, round(len(train) * d.validation_fraction))
        train, val = train[n_val:], train[:n_val]
    limit = d.max_length - config.rl.max_new_tokens
    too_long = [p for p in train + val if len(p) > limit]
    if too_long and d.too_long == "error":
        lines = [f"  {p.where}: {len(p)} tokens" for p in too_long[:20]]
        raise DataError(f"{len(too_long)} prompt(s) longer than data.max_length - "
                        f"rl.max_new_tokens = {limit} tokens:\n" + "\n".join(lines)
                        + "\nraise data.max_length, lower rl.max_new_tokens, or set "
                        "data.too_long=drop")
    train = [p for p in train if len(p) <= limit]
    val = [p for p in val if len(p) <= limit]
    if not train:
        raise DataError(f"{d.train}: no prompts left to train on")
    return train, val


def start_online_run(config: RunConfig, *, resume: bool, overwrite: bool):
    """The opening of the online recipes: check the run folder, load the reward function and the
    prompts, set up the model. Returns ``(reward_fn, train prompts, validation prompts, model,
    tokenizer, accelerator, parameter counts)``."""
    check_run_dir(Path(config.output_dir), resume=resume, overwrite=overwrite)
    reward_fn = load_reward_fn(config.rl.reward)
    train_set, val_set = load_prompt_splits(config, load_tokenizer(config.model.name))
    model, tokenizer, acc, params = setup_model(config, Path(config.output_dir), resume=resume)
    return reward_fn, train_set, val_set, model, tokenizer, acc, params


def finish_online_run(model, tokenizer, config: RunConfig, result, acc, params: dict,
                      n_train: int, n_val: int, save_extra: Callable | None = None,
                      **extra) -> dict:
    """reward.png, the reward figures of the summary, then :func:`finish_run`."""
    run_dir = Path(config.output_dir)
    if acc.is_main_process:
        plot_reward(result.history, run_dir / "reward.png",
                    title=f"{config.model.name} {config.recipe}: reward {config.rl.reward}")
    extra = reward_summary(result.history) | {"reward_fn": config.rl.reward} | extra
    return finish_run(model, tokenizer, config, run_dir, result, acc, params, n_train, n_val,
                      save_extra, **extra)


def _item(example: Example, tokenizer) -> PromptItem:
    messages = [{"role": m.role, "content": m.content} for m in example.prompt_messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return PromptItem(messages, render_prompt(messages, tokenizer), users[-1] if users else "",
                      dict(example.extra), example.where)


# ------------------------------------------------------------------------------- sampling


@dataclass
class Sampler:
    """Samples ``group`` completions per prompt with the policy and scores them.

    Each call draws its generation seed from torch's random stream, which checkpoints save and
    restore: a resumed run samples what the uninterrupted run would have. All completions of a
    call are submitted to one decode engine at once, the server's (``batch_size`` rows run
    together; a finished row's place goes to the next one at the next step); completion ``i``
    samples from stream ``i`` of the seed, so its tokens do not depend on ``batch_size``.
    """

    tokenizer: object
    reward_fn: RewardFn
    rl: RLConfig
    group: int = 1
    batch_size: int | None = None
    """Rows decoded together (None: all, up to 32)."""
    on_sample: list[Callable[[list[Completion]], None]] = field(default_factory=list)

    def __call__(self, model: nn.Module, prompts: list[PromptItem]) -> list[Completion]:
        """``len(prompts) * group`` scored completions; each prompt's group is contiguous."""
        seed = int(torch.randint(0, 2**31 - 1, ()))
        conversations = [p.messages for p in prompts for _ in range(self.group)]
        results = generate_continuous(
            model, self.tokenizer, conversations, max_new_tokens=self.rl.max_new_tokens,
            temperature=self.rl.temperature, top_p=self.rl.top_p, seed=seed,
            max_rows=self.batch_size, precision=self.rl.generation_precision)
        completions = [Completion(prompts[i // self.group], r.token_ids, r.text,
                                  r.finish_reason == "stop") for i, r in enumerate(results)]
        scores = self.score(completions)
        for c, s in zip(completions, scores):
            c.score = s
        for p in prompts:
            p.rollout_tokens = 0
        for c in completions:
            c.prompt.rollout_tokens += len(c.prompt) + len(c.ids)
        for hook in self.on_sample:
            hook(completions)
        return completions

    def score(self, completions: list[Completion]) -> list[float]:
        """The reward function's scores, given each completion's prompt text and columns."""
        keys = sorted({k for c in completions for k in c.prompt.columns})
        columns = {k: [c.prompt.columns.get(k) for c in completions] for k in keys}
        return call_reward(self.reward_fn, [c.prompt.text for c in completions],
                           [c.text for c in completions], columns)


def rollout_stats(completions: list[Completion]) -> dict[str, float]:
    """Means over completions: ``reward``, ``completion_length`` (tokens), ``stopped`` (share
    that ended at the end-of-turn token rather than at rl.max_new_tokens)."""
    n = max(1, len(completions))
    return {"reward": sum(c.score for c in completions) / n,
            "completion_length": sum(len(c.ids) for c in completions) / n,
            "stopped": sum(c.stopped for c in completions) / n}


def plot_reward(history: list[dict], path: Path, title: str = "") -> Path | None:
    """reward.png: mean reward per step (and validation reward) over the run."""
    return plot_metric(history, "reward", path, ylabel="mean reward", title=title)


def reward_summary(history: list[dict], window: int = 5) -> dict:
    """Mean reward of the first and last ``window`` logged steps (and the last validation)."""
    rewards = [r["reward"] for r in history if "reward" in r]
    out = {"reward_first": None, "reward_last": None}
    if rewards:
        k = min(window, len(rewards))
        out = {"reward_first": sum(rewards[:k]) / k, "reward_last": sum(rewards[-k:]) / k}
    val = [r["val_reward"] for r in history if "val_reward" in r]
    out["val_reward_last"] = val[-1] if val else None
    return out
