"""Cached bf16 casts of frozen linears: bit-identical to autocast's own casts, and reversible."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tuneforge.config import AdapterConfig
from tuneforge.data.render import TokenizedExample
from tuneforge.models import casts
from tuneforge.models.adapters import prepare_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.models.loading import load_model
from tuneforge.train.objectives import CausalLMObjective


def _batch() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 17, 12):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return out


def _loss_and_grads(model, objective, autocast: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, _ = objective.loss(objective.module, _batch(), torch.device("cpu"))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["lora", "freeze"])
@pytest.mark.parametrize("autocast", [True, False])
def test_cached_casts_give_bit_identical_loss_and_gradients(method, autocast):
    model, _ = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method=method, r=4, alpha=8, trainable_layers=1))
    use_packed_attention(model)
    objective = CausalLMObjective(model)
    keys = list(model.state_dict())
    plain_loss, plain_grads = _loss_and_grads(model, objective, autocast)

    n = casts.cache_frozen_casts(model)
    frozen = [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    assert n > 0 and n == sum(type(m) is casts.CastCachedLinear for m in model.modules())
    assert len(frozen) == n and all(type(m) is casts.CastCachedLinear for m in frozen)
    loss, grads = _loss_and_grads(model, objective, autocast)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[k], plain_grads[k]) for k in grads)
    # the casts are made under autocast only, and kept out of the state dict
    cached = sum(m.weight in casts._CASTS for m in frozen)
    assert cached == (n if autocast else 0)
    assert list(model.state_dict()) == keys

    casts.release_frozen_casts(model)
    assert not any(type(m) is casts.CastCachedLinear for m in model.modules())
    assert not any(m.weight in casts._CASTS for m in frozen)


def test_a_weight_changed_in_place_is_cast_again_and_copies_do_not_share_casts():
    layer = nn.Linear(8, 4).requires_grad_(False)
    casts.cache_frozen_casts(layer)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2)
        after = layer(x)
        expected = nn.functional.linear(x, layer.weight, layer.bias)
        twin = copy.deepcopy(layer)
        twin(x)
    assert torch.equal(after, expected) and not torch.equal(before, after)
    assert type(twin) is casts.CastCachedLinear
    assert casts._CASTS[twin.weight][1] is not casts._CASTS[layer.weight][1]


def test_trainable_linears_are_left_to_autocast():
    layer = nn.Linear(8, 4)
    assert casts.cache_frozen_casts(layer) == 0 and type(layer) is nn.Linear


def test_a_bf16_weight_is_used_as_it_is_and_not_kept():
    layer = nn.Linear(8, 4).requires_grad_(False).to(torch.bfloat16)
    casts.cache_frozen_casts(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight not in casts._CASTS
