"""Run TRL's own loss code on the tensors our losses see, for parity tests.

TRL (a test-only dependency) computes most of its losses inside trainer methods that read a
handful of attributes. Rather than construct a whole trainer (datasets, optimizer, output
folder), :func:`borrow` makes a bare object that carries TRL's methods plus just the attributes
those methods read, and calls them as TRL would. The models are real tiny models; TRL scores
them through its own fused LM head (:func:`fused_tiny_llama`), tuneforge through a plain forward
(:func:`sequence_logps`), so the log-probs are computed independently on each side.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.models.tiny import build_tiny

FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


class SingleProcess:
    """What TRL trainers ask of ``accelerate.Accelerator``, for one CPU process.

    With one process every gather and reduce returns its input unchanged; a real Accelerator
    would do the same but also fix global state for the rest of the test session.
    """

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def autocast(self) -> nullcontext:
        return nullcontext()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


def borrow(trainer_cls: type, methods: tuple[str, ...], **attrs: Any) -> Any:
    """A bare object with ``trainer_cls``'s ``methods`` and the given attributes.

    It also carries the single-process accelerator and the metric store every TRL trainer
    logs into (``obj._metrics[mode][name]`` lists).
    """
    namespace = {name: inspect.getattr_static(trainer_cls, name) for name in methods}
    obj = type(f"Borrowed{trainer_cls.__name__}", (), namespace)()
    vars(obj).update(accelerator=SingleProcess(), _total_train_tokens=0, _tp_size=1,
                     _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)
    return obj


def fused_tiny_llama(seed: int, sharpness: float = 20.0) -> nn.Module:
    """``tiny:llama`` in eval mode with TRL's fused LM head added (the plain forward still works).

    A fresh random model predicts nearly uniformly, so two of them give log-ratios near 0 and
    every loss sits at its value at 0; scaling the output layer by ``sharpness`` spreads the
    log-probs so that the losses are tested away from that point.
    """
    from trl.trainer.utils import add_fused_lm_head

    model = build_tiny("tiny:llama", seed=seed)[0].eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
    return model


def token_logps(model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: log p(token t+1 | tokens ≤ t) from the model's plain logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return F.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B] summed completion log-probs, [B] completion token counts)``."""
    keep = completion_mask[:, 1:].float()
    return (token_logps(model, input_ids, attention_mask) * keep).sum(-1), keep.sum(-1)


def prompt_completion_batch(prompt_lens: list[int], completion_lens: list[int], width: int,
                            seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of random byte tokens: ``input_ids``, ``attention_mask``, ``completion_mask``."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(prompt_lens)
    input_ids = torch.randint(3, 259, (rows, width), generator=gen)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # the pad token
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}


def grads(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the parameter gradients, then zeroes them."""
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Gradients equal up to float noise, judged against each tensor's largest entry (two
    forward passes that sum in different orders differ in the last bits)."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-8)
