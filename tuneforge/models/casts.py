"""Frozen linear layers cast to bf16 once, instead of on every call under autocast.

Under ``torch.autocast(dtype=bfloat16)`` every ``F.linear`` casts its fp32 weight to bf16.
Autocast caches that cast only for leaf tensors that require grad; a frozen weight (the base
model under LoRA, the lower layers under ``freeze``, the tied output head) is cast again in
every forward pass of every micro-batch, and the fresh copy is kept alive for the backward
pass. On a CPU those casts took about 0.7 s of a ~6 s LoRA step of SmolLM2-135M.

:func:`cache_frozen_casts` makes each frozen ``nn.Linear`` use one bf16 copy of its weight,
made on first use, whenever bf16 autocast is on. The result is bit-identical (the same
round-to-nearest-even cast, done once); outside autocast the layer runs on its fp32 weight as
before. A weight changed in place (its version counter moves) is cast again. The copies live
in a weak table keyed by the weight, so they are never saved, copied with the model or kept
after :func:`release_frozen_casts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

# weight -> (its version when cast, bf16 copy); keyed by identity, dropped with the weight
_CASTS = WeakTensorKeyDictionary()


class CastCachedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight enters bf16 autocast through a cached cast.

    Instances are made by changing the class of an existing ``nn.Linear`` (parameters, hooks
    and state-dict keys stay as they are); :func:`release_frozen_casts` changes it back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        kind = x.device.type
        if (not weight.requires_grad and torch.is_autocast_enabled(kind)
                and torch.get_autocast_dtype(kind) == torch.bfloat16):
            weight = _bf16(weight)
        return F.linear(x, weight, self.bias)


def _bf16(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.bfloat16:  # a bf16 copy of the model: nothing to cast or keep
        return weight
    cached = _CASTS.get(weight)
    if cached is None or cached[0] != weight._version:
        with torch.no_grad():
            cached = (weight._version, weight.detach().to(torch.bfloat16))
        _CASTS[weight] = cached
    return cached[1]


def cache_frozen_casts(model: nn.Module) -> int:
    """Give every frozen plain ``nn.Linear`` of ``model`` a cached bf16 cast; returns how many.

    Trainable linears keep autocast's own handling (their weights change every step).
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = CastCachedLinear
            count += 1
    return count


def release_frozen_casts(model: nn.Module) -> None:
    """Undo :func:`cache_frozen_casts` and drop the bf16 copies (their memory is freed)."""
    for module in model.modules():
        if type(module) is CastCachedLinear:
            _CASTS.pop(module.weight, None)
            module.__class__ = nn.Linear
