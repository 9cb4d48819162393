"""Comparative ranking for the policy (LiPO-style listwise, RRHF), top to bottom.

config -> check data (rankings of 2+ responses best first; a preference pair is a ranking of
two) -> tokenize every response after its prompt (only the response is scored) -> load model
-> adapter / freeze -> reference log-probs (lipo) -> shared training loop -> save adapter or
model, loss curve, summary.

Losses (tuneforge/losses/ranking.py):

- ``lipo``: the Plackett-Luce likelihood of the ranking under the DPO implicit rewards
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` (ListMLE, one of LiPO's listwise objectives;
  with two responses it is DPO). The reference is the model with adapters off, or precomputed
  for full fine-tuning, exactly as in the dpo recipe (tuneforge/train/scoring.py).
- ``rrhf``: a hinge on every wrongly ordered pair of length-normalised log-probs plus the SFT
  loss of the best response; no reference model.

All responses of a micro-batch are packed into one padding-free row and scored in one pass.
Logged: ``pairwise_accuracy``, ``kendall_tau``, ``spearman`` of the loss's scores against the
ranking, ``logp_margin`` (mean token log-prob of the best response minus the worst's), and
``reward_margin`` (lipo: implicit reward, best minus worst) or ``rank_loss``/``sft_loss``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tuneforge.config import RunConfig
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.losses.ranking import best_worst_gap, lipo_listmle_loss, rrhf_loss
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.objectives import ResponsesObjective
from tuneforge.train.progress import say
from tuneforge.train.run_folder import check_run_dir, setup_model, train_responses
from tuneforge.train.scoring import (
    Reference,
    SequenceLogProbs,
    as_lists,
    render_responses,
    resolve_reference,
    score_sequences,
)

METRIC_KEYS = {"lipo": ("pairwise_accuracy", "kendall_tau", "spearman", "logp_margin", "reward_margin"),
               "rrhf": ("pairwise_accuracy", "kendall_tau", "spearman", "logp_margin", "rank_loss",
                        "sft_loss")}


class RankObjective(ResponsesObjective):
    """Sequence log-probs of each list's responses -> a listwise loss, summed over lists."""

    def __init__(self, model: nn.Module, loss: str = "lipo", beta: float = 0.1,
                 sft_weight: float = 1.0, reference: str = "cached") -> None:
        self.module = SequenceLogProbs(model)
        self.loss_name, self.beta, self.sft_weight = loss, beta, sft_weight
        self.reference = Reference(self.module, reference) if loss == "lipo" else None
        self.compile_auto = self.reference is None  # see train.compile.use_compile
        self.metric_keys = METRIC_KEYS[loss]

    def loss(self, module, items, device):
        logps, counts = score_sequences(module, items, device)
        lengths = [len(it.sequences) for it in items]
        policy, mask = as_lists(logps, lengths)
        tokens = as_lists(counts.float(), lengths)[0]
        if self.loss_name == "lipo":
            ref = as_lists(self.reference.sequence_logps(items, device), lengths)[0]
            loss, m = lipo_listmle_loss(policy, ref, mask, beta=self.beta)
        else:
            loss, m = rrhf_loss(policy, tokens, mask, sft_weight=self.sft_weight)
        m["pairwise_accuracy"] = m.pop("pair_accuracy")
        m["kendall_tau"], m["spearman"] = m["kendall_tau"].nan_to_num(0.0), m["spearman"].nan_to_num(0.0)
        per_token = policy.detach() / tokens.clamp(min=1)
        m["logp_margin"] = best_worst_gap(per_token, mask).mean()
        n = len(items)
        return loss * n, {k: v.detach().float() * n for k, v in m.items()}


def run_rank(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the policy on ranked responses; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config, ("ranking", "preference"), "rank")
    train_set = tokenize_all(train_examples, tokenizer, config, "train", render_responses)
    val_set = tokenize_all(val_examples, tokenizer, config, "validation", render_responses)

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    rank = config.rank
    objective = RankObjective(model, rank.loss, rank.beta, rank.sft_weight,
                              resolve_reference(rank.reference, model))
    if acc.is_main_process:
        what = f"beta {rank.beta}" if rank.loss == "lipo" else f"sft_weight {rank.sft_weight}"
        say(f"{len(train_set)} train / {len(val_set)} validation ranked lists; {rank.loss} "
            f"({what}); training {params['trainable']:,} of {params['total']:,} parameters "
            f"({config.adapter.method}) on {acc.device} x{acc.num_processes}")
    return train_responses(model, tokenizer, config, run_dir, acc, params, train_set, val_set,
                           objective, resume=resume, best=("val_pairwise_accuracy", "val_logp_margin"),
                           rank_loss=rank.loss)

