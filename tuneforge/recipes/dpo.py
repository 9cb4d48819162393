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

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.config import PEFT_METHODS, RunConfig
from tuneforge.data.example import Example
from tuneforge.data.packing import pack
from tuneforge.data.render import TokenizedExample, render_response
from tuneforge.data.splits import load_splits, tokenize_all
from tuneforge.losses.causal_lm import SequenceLogProbs
from tuneforge.losses.preference import PREFERENCE_LOSSES, PreferenceInputs
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.loop import train, use_bf16
from tuneforge.train.progress import say
from tuneforge.train.run_folder import check_run_dir, finish_run, setup_model


@dataclass
class TokenizedPair:
    """A prompt with its chosen and rejected response, tokenized; reference log-probs once known."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    ref: tuple[float, float] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))

    @property
    def num_targets(self) -> int:
        return min(self.chosen.num_targets, self.rejected.num_targets)


def render_pair(example: Example, tokenizer, max_length: int | None = None) -> TokenizedPair:
    chosen, rejected = (render_response(example, i, tokenizer, max_length) for i in (0, 1))
    return TokenizedPair(chosen, rejected)


class PreferenceObjective:
    """Sequence log-probs of chosen and rejected -> a loss of the DPO family, summed over pairs."""

    metric_keys = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward",
                   "chosen_logps", "rejected_logps", "likelihood_accuracy")

    def __init__(self, model: nn.Module, loss: str = "dpo", beta: float = 0.1,
                 options: dict | None = None, reference: str = "cached") -> None:
        self.module = SequenceLogProbs(model)
        self.spec = PREFERENCE_LOSSES[loss]
        self.beta, self.options = beta, dict(options or {})
        self.reference = reference if self.spec.needs_reference else "none"
        self.compile_auto = self.reference == "none"  # see train.compile.use_compile

    def weight(self, pairs) -> int:
        return len(pairs)

    def tokens(self, pair: TokenizedPair) -> int:
        return len(pair.chosen) + len(pair.rejected)

    def loss(self, module, pairs, device):
        logps, counts = _score(module, pairs, device)
        ref_c = ref_r = None
        if self.reference != "none":
            missing = [p for p in pairs if p.ref is None or self.reference == "online"]
            if missing:
                self.compute_reference(missing, device)
            ref = torch.tensor([p.ref for p in pairs], device=device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
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

    @torch.no_grad()
    def compute_reference(self, pairs, device, batch_size: int = 8) -> None:
        """Fill ``pair.ref`` with the reference model's log-probs (adapters off, no dropout)."""
        model = self.module.model
        was_training = self.module.training
        self.module.eval()
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with off:
            for lo in range(0, len(pairs), batch_size):
                chunk = pairs[lo : lo + batch_size]
                logps, _ = _score(self.module, chunk, device)
                for pair, c, r in zip(chunk, logps[0::2].tolist(), logps[1::2].tolist()):
                    pair.ref = (c, r)
        self.module.train(was_training)


def _prefers_chosen(x: PreferenceInputs) -> torch.Tensor:
    """Whether the policy itself gives the chosen response the higher mean token log-prob.

    Unlike the implicit-reward accuracy (0 at the start, when policy == reference, by
    construction), this says how often the model prefers the chosen answer, before and after.
    """
    chosen = x.chosen_logps.detach() / x.chosen_tokens.clamp(min=1)
    rejected = x.rejected_logps.detach() / x.rejected_tokens.clamp(min=1)
    return chosen > rejected


def _score(module, pairs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and trained-token counts, ``[2B]``: chosen, rejected, chosen, ..."""
    packed = pack([seq for p in pairs for seq in (p.chosen, p.rejected)])
    return module(packed["input_ids"].to(device), packed["targets"].to(device),
                  position_ids=packed["position_ids"].to(device), seq_lens=packed["seq_lens"])


def run_dpo(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one preference-optimisation job; returns the summary also written to summary.json."""
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model.name)
    train_examples, val_examples = load_splits(config, ("preference",), "dpo")
    train_set = tokenize_all(train_examples, tokenizer, config, "train", render_pair)
    val_set = tokenize_all(val_examples, tokenizer, config, "validation", render_pair)

    model, tokenizer, acc, params = setup_model(config, run_dir, resume=resume)
    pref = config.preference
    reference = pref.reference
    if reference == "auto":
        reference = "cached" if config.adapter.method in PEFT_METHODS else "precompute"
    objective = PreferenceObjective(model, pref.loss, pref.beta, pref.options, reference)
    if acc.is_main_process:
        say(f"{len(train_set)} train / {len(val_set)} validation pairs; {pref.loss} "
            f"(beta {pref.beta}); training {params['trainable']:,} of {params['total']:,} "
            f"parameters ({config.adapter.method}) on {acc.device} x{acc.num_processes}")
    if objective.reference == "precompute":
        # before any update, and before resuming loads trained weights
        objective.module.to(acc.device)
        autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16,
                                  enabled=use_bf16(config.train.bf16, acc.device))
        say(f"computing reference log-probs of {len(train_set) + len(val_set)} pairs")
        with autocast:
            objective.compute_reference(train_set + val_set, acc.device, config.train.batch_size)

    result = train(model, train_set, val_set, config.train, run_dir, resume=resume, accelerator=acc,
                   objective=objective)
    extra = {"preference_loss": pref.loss, "beta": pref.beta, "reference": objective.reference}
    for key in ("val_reward_accuracy", "val_reward_margin"):
        extra[f"best_{key}"] = result.val_at_best(key)
    return finish_run(model, tokenizer, config, run_dir, result, acc, params,
                      len(train_set), len(val_set), **extra)
