"""Offline preference optimisation (DPO and its family), top to bottom.

config -> check data (preference pairs) -> tokenize chosen and rejected (only the response is
scored) -> load model -> adapter / freeze -> reference log-probs -> shared training loop ->
save adapter or model, loss curve, summary.

The reference model is the starting point of training. With an adapter it is the same model
with the adapters switched off, never a second copy in memory; with full fine-tuning every
reference log-prob is computed in one pass before the first step. The chosen and rejected
sequences of a micro-batch are packed into one padding-free row and scored in one forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuneforge.config import RunConfig
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.losses.preference import PREFERENCE_LOSSES, PreferenceInputs
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.objectives import ResponsesObjective
from tuneforge.train.progress import say
from tuneforge.train.run_folder import check_run_dir, setup_model, train_responses
from tuneforge.train.scoring import (
    Reference,
    SequenceLogProbs,
    render_responses,
    resolve_reference,
    score_sequences,
)


class PreferenceObjective(ResponsesObjective):
    """Sequence log-probs of chosen and rejected -> a loss of the DPO family, summed over pairs."""

    metric_keys = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward",
                   "chosen_logps", "rejected_logps", "likelihood_accuracy")

    def __init__(self, model: nn.Module, loss: str = "dpo", beta: float = 0.1,
                 options: dict | None = None, reference: str = "cached") -> None:
        self.module = SequenceLogProbs(model)
        self.spec = PREFERENCE_LOSSES[loss]
        self.beta, self.options = beta, dict(options or {})
        self.reference = Reference(self.module, reference) if self.spec.needs_reference else None
        self.compile_auto = self.reference is None  # see train.compile.use_compile

    def loss(self, module, pairs, device):
        logps, counts = score_sequences(module, pairs, device)  # chosen, rejected, chosen, ...
        ref_c = ref_r = None
        if self.reference is not None:
            ref = self.reference.sequence_logps(pairs, device)
            ref_c, ref_r = ref[0::2], ref[1::2]
        inputs = PreferenceInputs(logps[0::2], logps[1::2], counts[0::2], counts[1::2], ref_c, ref_r)
        out = self.spec.fn(inputs, beta=self.beta, **self.options)
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {"reward_margin": margin.sum(), "reward_accuracy": (margin > 0).float().sum(),
                   "chosen_reward": out.chosen_rewards.sum(),
                   "rejected_reward": out.rejected_rewards.sum(),
                   "chosen_logps": inputs.chosen_logps.detach().sum(),
                   "rejected_logps": inputs.rejected_logps.detach().sum(),
                   "likelihood_accuracy": _prefers_chosen(inputs).float().sum()}
        return out.losses.sum(), metrics


def _prefers_chosen(x: PreferenceInputs) -> torch.Tensor:
    """Whether the policy itself gives the chosen response the higher mean token log-prob.

    Unlike the implicit-reward accuracy (0 at the start, when policy == reference, by
    construction), this says how often the model prefers the chosen answer, before and after.
    """
    chosen = x.chosen_logps.detach() / x.chosen_tokens.clamp(min=1)
    rejected = x.rejected_logps.detach() / x.rejected_tokens.clamp(min=1)
    return chosen > rejected


def run_dpo(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one preference-optimisation job; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config, ("preference",), "dpo")
    train_set = tokenize_all(train_examples, tokenizer, config, "train", render_responses)
    val_set = tokenize_all(val_examples, tokenizer, config, "validation", render_responses)

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    pref = config.preference
    reference = resolve_reference(pref.reference, model)
    objective = PreferenceObjective(model, pref.loss, pref.beta, pref.options, reference)
    if acc.is_main_process:
        say(f"{len(train_set)} train / {len(val_set)} validation pairs; {pref.loss} "
            f"(beta {pref.beta}); training {params['trainable']:,} of {params['total']:,} "
            f"parameters ({config.adapter.method}) on {acc.device} x{acc.num_processes}")
    return train_responses(model, tokenizer, config, run_dir, acc, params, train_set, val_set,
                           objective, resume=resume, best=("val_reward_accuracy", "val_reward_margin"),
                           preference_loss=pref.loss, beta=pref.beta)
