"""Attention for padding-free packed rows that never computes across example boundaries.

With several examples packed in one row, transformers' SDPA path builds a block-diagonal
``[T, T]`` mask and the kernel does the work of the whole ``T x T`` square: with ``k`` examples
of similar length that is about ``k`` times the attention FLOPs actually needed (what it cost
a LoRA step, measured: bench/README.md, "What each change bought"). Here each example runs its
own causal SDPA call (``is_causal=True``, no mask tensor), which lets the kernel skip the
masked half as well.

The implementation is registered with transformers under the name ``tuneforge_packed``. It
takes the packed path only when the caller passes ``packed_seq_lens`` (our loss wrapper does);
otherwise (generation with padding masks and KV caches) it is exactly transformers' SDPA, and
the mask builder is SDPA's too. Label scoring passes ``packed_tree`` instead (a
:class:`PackedTree`: prompts whose candidate labels branch off them, after a cached prefix):
one masked SDPA call per prompt (:func:`tree_attention_forward`; inference only, no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tuneforge.models.adapters import base_model

NAME = "tuneforge_packed"


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_seq_lens: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query ``[1, H, T, D]``, key/value ``[1, Hkv, T, D]`` -> output ``[1, T, H, D]``."""
    tree = kwargs.pop("packed_tree", None)
    if tree is not None and query.shape[0] == 1 and key.shape[2] == tree.prefix + query.shape[2]:
        return tree_attention_forward(query, key, value, tree, scaling)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    usable = (
        packed_seq_lens is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == sum(packed_seq_lens)
        and not (window and max(packed_seq_lens) > window)
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of a slice writes its gradient into a zeroed tensor of
    # the whole row (one memset and one add per example, layer and tensor); split's is one cat
    lengths = list(packed_seq_lens)
    outputs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                       enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                           value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model (or a PEFT wrapper of one) to the packed implementation.

    Returns False (and changes nothing) for models that do not dispatch attention through
    transformers' attention interface or use something other than SDPA/eager.
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return False
    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for module in base.modules():  # the top config and any sub-configs that carry the choice
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = NAME
    return True


@dataclass
class PackedTree:
    """The layout of a packed row whose segments are token trees (label scoring).

    The keys are ``prefix`` cached tokens that every segment sees (a shared prompt start, or
    0), then the row's segments of ``lengths`` tokens. ``masks[i]`` is segment ``i``'s
    ``[L_i, prefix + L_i]`` boolean mask (True: may attend), over the prefix and its own
    tokens: a prompt is causal, and each label branch sees the prompt and its own ancestors
    but not its sibling branches. Passed to the model as the ``packed_tree`` keyword.
    """

    prefix: int
    lengths: list[int]
    masks: list[torch.Tensor]


def tree_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           tree: PackedTree, scaling: float | None = None,
                           ) -> tuple[torch.Tensor, None]:
    """Attention of a :class:`PackedTree` row, one masked SDPA call per segment.

    query ``[1, H, T, D]``, key/value ``[1, Hkv, prefix + T, D]`` -> ``[1, T, H, D]``. One mask
    over the whole row would be exact too, but the kernel would then do the work of the whole
    ``T x (prefix + T)`` rectangle: ``k`` segments cost ``k`` times the attention needed.
    """
    gqa = query.shape[1] != key.shape[1]
    p, lengths = tree.prefix, list(tree.lengths)
    k_pre, v_pre = key[:, :, :p], value[:, :, :p]
    outputs = []
    for q, k, v, mask in zip(query.split(lengths, dim=2), key[:, :, p:].split(lengths, dim=2),
                             value[:, :, p:].split(lengths, dim=2), tree.masks):
        if p:
            k, v = torch.cat([k_pre, k], dim=2), torch.cat([v_pre, v], dim=2)
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                      enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[bool]:
    """:func:`use_packed_attention` for the duration of a ``with`` block, then the model's own
    attention implementation again. Yields whether the switch was made."""
    configs = [m.config for m in base_model(model).modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")]
    before = list({id(c): (c, c._attn_implementation) for c in configs}.values())
    switched = use_packed_attention(model)
    try:
        yield switched
    finally:
        for config, name in before:
            config._attn_implementation = name
