"""KTO: learning from unpaired thumbs-up/down completions, top to bottom.

config -> check data (``unpaired`` records: prompt, completion, label true/false) -> tokenize
each completion after its prompt, and beside it a *mismatched* one (the prompt followed by the
next record's completion) -> load model -> adapter / freeze -> reference log-probs -> shared
training loop -> save adapter or model, loss curve, summary.

The loss (tuneforge/losses/preference.py ``kto_loss``, Ethayarajh et al. 2024) needs no pairs:
a completion's implicit reward ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` is pushed above
the reference point ``z0`` when the completion is desirable and below it when it is not.
``z0`` estimates ``beta * KL(pi || pi_ref)`` on the micro-batch from the mismatched
completions (their log-ratios say how far the policy has drifted in general, independent of
the labels), clamped at 0 and without gradient. The reference is the model before training,
exactly as in the dpo recipe (tuneforge/train/scoring.py): adapters switched off, or one
pass before training for full fine-tuning. A completion and its mismatched twin are packed
into the micro-batch's single padding-free row and scored in one forward pass.

Logged: ``reward_accuracy`` (share of examples on the right side of ``z0``), ``signed_reward``
(``r`` for thumbs up, ``-r`` for thumbs down: rises as the model learns), ``kl`` (``z0/beta``),
``desirable_logps`` / ``undesirable_logps`` (summed log-probs of each kind's completions, per
example of the batch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from tuneforge.config import RunConfig
from tuneforge.data.example import Example
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.losses.preference import kto_kl_estimate, kto_loss
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


def with_mismatched(examples: list[Example]) -> list[Example]:
    """Each example with a second response: the next example's completion (the last takes the
    first's), for KTO's KL estimate. The label stays the example's own."""
    n = len(examples)
    return [dataclasses.replace(ex, responses=[ex.responses[0], examples[(i + 1) % n].responses[0]])
            for i, ex in enumerate(examples)]


class KTOObjective(ResponsesObjective):
    """Log-probs of each completion and of its mismatched twin -> the KTO loss, summed."""

    metric_keys = ("reward_accuracy", "signed_reward", "kl", "desirable_logps", "undesirable_logps")
    compile_auto = False  # compares policy and reference passes: see train.compile.use_compile

    def __init__(self, model: nn.Module, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, reference: str = "cached") -> None:
        self.module = SequenceLogProbs(model)
        self.beta, self.weights = beta, (desirable_weight, undesirable_weight)
        self.reference = Reference(self.module, reference)

    def loss(self, module, items, device):
        logps, _ = score_sequences(module, items, device)  # own, mismatched, own, ...
        ref = self.reference.sequence_logps(items, device)
        desirable = torch.tensor([it.targets[0] > 0.5 for it in items], device=device)
        kl = kto_kl_estimate(logps[1::2].detach(), ref[1::2])
        out = kto_loss(logps[0::2], ref[0::2], desirable, kl, beta=self.beta,
                       desirable_weight=self.weights[0], undesirable_weight=self.weights[1])
        sign = desirable.float() * 2 - 1
        own = logps[0::2].detach()
        n = len(items)
        metrics = {"reward_accuracy": ((out.rewards - self.beta * kl) * sign > 0).float().sum(),
                   "signed_reward": (out.rewards * sign).sum(), "kl": kl * n,
                   "desirable_logps": own[desirable].sum(), "undesirable_logps": own[~desirable].sum()}
        return out.losses.sum(), metrics


def run_kto(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train on unpaired thumbs-up/down data; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config, ("unpaired",), "kto")
    train_set = tokenize_all(with_mismatched(train_examples), tokenizer, config, "train",
                             render_responses)
    val_set = tokenize_all(with_mismatched(val_examples), tokenizer, config, "validation",
                           render_responses) if val_examples else []

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    k = config.kto
    objective = KTOObjective(model, k.beta, k.desirable_weight, k.undesirable_weight,
                             resolve_reference(k.reference, model))
    if acc.is_main_process:
        up = sum(1 for ex in train_examples if ex.desirable)
        say(f"{len(train_set)} train ({up} thumbs up, {len(train_examples) - up} down) / "
            f"{len(val_set)} validation completions; kto (beta {k.beta}, weights "
            f"{k.desirable_weight}/{k.undesirable_weight}); training {params['trainable']:,} of "
            f"{params['total']:,} parameters ({config.adapter.method}) on {acc.device} "
            f"x{acc.num_processes}")
    return train_responses(model, tokenizer, config, run_dir, acc, params, train_set, val_set,
                           objective, resume=resume, best=("val_reward_accuracy", "val_signed_reward"),
                           beta=k.beta)
