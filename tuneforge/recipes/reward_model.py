"""Reward modelling, top to bottom.

config -> check data (pairs, rankings or ratings) -> choose the loss that fits it -> tokenize
every response after its prompt -> load model -> adapter / freeze -> scalar head -> shared
training loop -> save adapter or model with the head, loss curve, summary.

The reward of a (prompt, response) is a linear head on the final hidden state of the
sequence's last token (:class:`tuneforge.models.heads.RewardModel`). All responses of a
micro-batch are packed into one padding-free row and scored in one forward pass. Losses
(tuneforge/losses/reward.py): Bradley-Terry on pairs (with a record's ``margin``, if given),
Plackett-Luce or all-pairs Bradley-Terry on rankings, squared error on ratings.

Training logs each micro-batch's figures averaged over the step. Validation figures
(``val_pairwise_accuracy``, ``val_kendall_tau``, ``val_spearman``; ``val_pearson`` for
ratings) are exact over the whole held-out set: :func:`held_out_metrics` computes them from the
rewards the validation pass scored, and ``tuneforge score`` reports the same figures.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

from tuneforge.config import RunConfig
from tuneforge.data.example import Example
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.errors import DataError
from tuneforge.losses.ranking import best_worst_gap
from tuneforge.losses.reward import (
    all_pairs_loss,
    bradley_terry_loss,
    plackett_luce_loss,
    ranking_metrics,
    regression_loss,
    spearman_rho,
)
from tuneforge.models.adapters import trainable_summary
from tuneforge.models.heads import RewardModel, save_head
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.loop import train
from tuneforge.train.objectives import ResponsesObjective
from tuneforge.train.progress import say
from tuneforge.train.run_folder import check_run_dir, finish_run, setup_model
from tuneforge.train.scoring import (
    SequenceRewards,
    TokenizedResponses,
    as_lists,
    render_responses,
    score_packed,
)

LOSS_KINDS = {"bradley_terry": ("preference",), "plackett_luce": ("ranking", "preference"),
              "all_pairs": ("ranking", "preference"), "regression": ("rating",)}
"""The data kinds each reward loss trains on (a pair is a ranking of two)."""
AUTO_LOSS = {"preference": "bradley_terry", "ranking": "plackett_luce", "rating": "regression"}
LISTWISE = {"plackett_luce": plackett_luce_loss, "all_pairs": all_pairs_loss}
METRIC_KEYS = {
    "bradley_terry": ("pairwise_accuracy", "reward_margin", "chosen_reward", "rejected_reward"),
    "plackett_luce": ("pairwise_accuracy", "kendall_tau", "spearman", "reward_margin"),
    "all_pairs": ("pairwise_accuracy", "kendall_tau", "spearman", "reward_margin"),
    "regression": ("mae", "mean_reward"),
}


def choose_loss(setting: str, examples: list[Example]) -> str:
    """``reward.loss``, with ``auto`` resolved from the kind of the training data."""
    return AUTO_LOSS[examples[0].kind] if setting == "auto" else setting


def check_kinds(examples: list[Example], loss: str) -> None:
    """Refuse, by file:line, the first record the chosen loss cannot train on."""
    for ex in examples:
        if ex.kind not in LOSS_KINDS[loss]:
            fits = AUTO_LOSS.get(ex.kind)
            hint = f"; for {ex.kind} data use reward.loss={fits} (or auto)" if fits else ""
            raise DataError(f"{ex.where}: {ex.kind} data cannot train reward.loss={loss}, which "
                            f"needs {' or '.join(LOSS_KINDS[loss])} records{hint}")


def render_rewarded(example: Example, tokenizer, max_length: int | None = None, *,
                    use_margin: bool = True) -> TokenizedResponses:
    """Tokenize an example's responses; a pair keeps its record's numeric ``margin``, if any."""
    item = render_responses(example, tokenizer, max_length)
    margin = example.extra.get("margin") if use_margin else None
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"{example.where}: margin: expected a finite number, got {margin!r}")
        item.margin = float(margin)
    return item


class RewardObjective(ResponsesObjective):
    """Rewards of every response in a micro-batch -> a reward loss, summed over examples.

    An example is one pair, ranking or rating, so losses and metrics are means over examples.
    The rewards of each example are kept in ``item.last_scores`` for :func:`held_out_metrics`.
    """

    def __init__(self, reward_model: RewardModel, loss: str = "bradley_terry",
                 center_coefficient: float = 0.0) -> None:
        self.module = SequenceRewards(reward_model)
        self.loss_name = loss
        self.center_coefficient = center_coefficient
        self.metric_keys = METRIC_KEYS[loss]

    def loss(self, module, items, device):
        rewards = score_packed(module, [seq for item in items for seq in item.sequences], device)
        _keep_scores(items, rewards)
        if self.loss_name == "regression":
            loss, metrics = self._regression(items, rewards)
        elif self.loss_name == "bradley_terry":
            loss, metrics = self._pairwise(items, rewards)
        else:
            loss, metrics = self._listwise(items, rewards)
        n = len(items)
        return loss * n, {k: v.detach() * n for k, v in metrics.items()}

    def _pairwise(self, items, rewards):
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = None
        if any(it.margin is not None for it in items):
            margin = torch.tensor([it.margin or 0.0 for it in items], device=rewards.device)
        loss, m = bradley_terry_loss(chosen, rejected, margin, self.center_coefficient)
        return loss, {"pairwise_accuracy": m["accuracy"], "reward_margin": m["margin"],
                      "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}

    def _listwise(self, items, rewards):
        scores, mask = as_lists(rewards, [len(it.sequences) for it in items])
        loss, m = LISTWISE[self.loss_name](scores, mask)
        return loss, {"pairwise_accuracy": m["pair_accuracy"],
                      "kendall_tau": m["kendall_tau"].nan_to_num(0.0),
                      "spearman": m["spearman"].nan_to_num(0.0),
                      "reward_margin": best_worst_gap(scores, mask).mean()}

    def _regression(self, items, rewards):
        targets = torch.tensor([it.targets[0] for it in items], device=rewards.device)
        loss, m = regression_loss(rewards, targets)
        return loss, {"mae": m["mae"], "mean_reward": rewards.mean()}


def _keep_scores(items, rewards: torch.Tensor) -> None:
    flat = rewards.detach().float().tolist()
    for item in items:
        n = len(item.sequences)
        item.last_scores, flat = flat[:n], flat[n:]


def held_out_metrics(items: list[TokenizedResponses]) -> dict[str, float]:
    """Exact figures over scored items (``item.last_scores``) against their order or ratings.

    Lists (pairs, rankings): ``pairwise_accuracy`` over every ordered pair of every list (ties
    count as wrong), mean ``kendall_tau`` and ``spearman`` per list, ``pairs``. Single rated
    responses (ratings, thumbs up/down as 1/0): ``pearson`` and ``spearman`` of rewards
    against ratings, and ``pairwise_accuracy`` over pairs of responses to the same prompt with
    different ratings (left out when there are none).
    """
    if all(len(it.sequences) >= 2 for it in items):
        lengths = torch.tensor([len(it.sequences) for it in items])
        flat = torch.tensor([s for it in items for s in it.last_scores], dtype=torch.float64)
        scores, mask = as_lists(flat, lengths.tolist())
        m = ranking_metrics(scores, mask)
        pairs = int((lengths * (lengths - 1) // 2).sum())
        return {"pairwise_accuracy": float(m["pair_accuracy"]), "kendall_tau": float(m["kendall_tau"]),
                "spearman": float(m["spearman"]), "pairs": pairs}
    return _rating_metrics(items)


def _rating_metrics(items: list[TokenizedResponses]) -> dict[str, float]:
    pred = torch.tensor([it.last_scores[0] for it in items], dtype=torch.float64)
    rating = torch.tensor([it.targets[0] for it in items], dtype=torch.float64)
    out = {"pearson": float(torch.corrcoef(torch.stack([pred, rating]))[0, 1]),
           "spearman": float(spearman_rho(pred, rating)),
           "mse": float(((pred - rating) ** 2).mean())}
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_prompt[it.group].append(i)
    right = total = 0
    for members in by_prompt.values():
        for a in members:
            for b in members:
                if rating[a] > rating[b]:
                    total += 1
                    right += bool(pred[a] > pred[b])
    if total:
        out.update(pairwise_accuracy=right / total, pairs=total)
    return out


def validation_metrics(val_set: list[TokenizedResponses], acc):
    """``metrics_fn`` for the loop: :func:`held_out_metrics` of the validation pass just run.

    Each process scored its share of the validation set (``val_set[rank::world]``); their
    rewards are gathered so every process computes, and acts on, the same figures.
    """
    def metrics(_model) -> dict[str, float]:
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            mine = [(i, val_set[i].last_scores)
                    for i in range(acc.process_index, len(val_set), acc.num_processes)]
            for i, scores in gather_object(mine):
                val_set[i].last_scores = scores
        out = held_out_metrics(val_set)
        out.pop("pairs", None)
        return out

    return metrics


def run_reward(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a reward model; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config, ("preference", "ranking", "rating"), "reward")
    loss = choose_loss(config.reward.loss, train_examples)
    check_kinds(train_examples + val_examples, loss)
    render = partial(render_rewarded, use_margin=config.reward.use_margin)
    train_set = tokenize_all(train_examples, tokenizer, config, "train", render)
    val_set = tokenize_all(val_examples, tokenizer, config, "validation", render)

    model, tokenizer, acc, _ = setup_model(config, run_dir, resume=resume)
    reward_model = RewardModel(model)
    if loss == "regression":  # start at the mean rating: the first steps learn the order
        with torch.no_grad():
            reward_model.head.bias.fill_(sum(it.targets[0] for it in train_set) / len(train_set))
    params = trainable_summary(reward_model)
    objective = RewardObjective(reward_model, loss, config.reward.center_coefficient)
    if acc.is_main_process:
        say(f"{len(train_set)} train / {len(val_set)} validation {train_examples[0].kind} "
            f"examples; reward loss {loss}; training {params['trainable']:,} of "
            f"{params['total']:,} parameters ({config.adapter.method} + head) on {acc.device} "
            f"x{acc.num_processes}")
    result = train(reward_model, train_set, val_set, config.train, run_dir, resume=resume,
                   accelerator=acc, objective=objective,
                   metrics_fn=validation_metrics(val_set, acc) if val_set else None)
    extra = {"reward_loss": loss}
    for key in ("val_pairwise_accuracy", "val_kendall_tau", "val_spearman", "val_pearson"):
        if (value := result.val_at_best(key)) is not None:
            extra[f"best_{key}"] = value
    return finish_run(model, tokenizer, config, run_dir, result, acc, params,
                      len(train_set), len(val_set),
                      save_extra=lambda folder: save_head(reward_model, folder) | {"reward_loss": loss},
                      **extra)
