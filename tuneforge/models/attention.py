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
:class:`TreeBatch`: prompts whose candidate labels branch off them, after a shared prefix): one
masked SDPA call per batch (:func:`tree_attention_forward`; inference only, no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tuneforge.models.adapters import base_model

NAME = "tuneforge_packed"

CPU_BACKWARD_FP32 = True
"""Training on the CPU under bf16 autocast: the packed attention takes fp32 inputs. SDPA's CPU
backward is faster in fp32 than in bf16 (the same kernel; a LoRA step of the built-in model
gained ~8% tokens/s, measured: bench/README.md, "What each change bought"); calls without
gradients (validation, scoring, generation) stay in bf16, where the forward is faster."""


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
    if tree is not None:
        return tree_attention_forward(module, query, key, value, tree, scaling)
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
    if (CPU_BACKWARD_FP32 and query.device.type == "cpu" and query.requires_grad
            and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            return packed_attention_forward(module, query.float(), key.float(), value.float(),
                                            None, dropout, scaling, packed_seq_lens)
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


def can_use_packed_attention(model: torch.nn.Module) -> bool:
    """Whether :func:`use_packed_attention` would switch ``model`` (changes nothing)."""
    config = getattr(base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager", NAME)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model (or a PEFT wrapper of one) to the packed implementation.

    Returns False (and changes nothing) for models that do not dispatch attention through
    transformers' attention interface or use something other than SDPA/eager.
    """
    if not can_use_packed_attention(model):
        return False
    base = base_model(model)
    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for module in base.modules():  # the top config and any sub-configs that carry the choice
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = NAME
    return True


@dataclass
class TreeBatch:
    """Label scoring's layout: a packed row of ``B`` segments, each a prompt followed by its
    candidate labels as a token tree, after ``prefix`` shared tokens; attention runs the
    segments as a right-padded batch of ``W`` tokens each.

    ``gather`` ``[B * W]``: the row position of each batch position (padding repeats the
    segment's first token); ``scatter`` ``[T]``: the batch position of each row token.
    ``mask`` ``[B, 1, W, prefix + W]`` bool (True: may attend), over the prefix and the
    segment: a prompt is causal, each label branch sees the prompt and its own ancestors but
    not its sibling branches; a padding query sees key 0 only (no empty row).
    ``prefix_kv[layer]`` is that layer's ``(keys, values)`` ``[1, Hkv, prefix, D]`` of the
    shared tokens (None when there are none). Passed to the model as ``packed_tree``.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
    _additive: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, lengths: Sequence[int], mask: torch.Tensor,
           prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> TreeBatch:
        """The layout of segments of ``lengths`` tokens laid end to end."""
        width = max(lengths)
        gather = torch.zeros(len(lengths), width, dtype=torch.long)
        scatter, at = [], 0
        for b, n in enumerate(lengths):
            gather[b, :n] = torch.arange(at, at + n)
            gather[b, n:] = at
            scatter.append(torch.arange(b * width, b * width + n))
            at += n
        return cls(gather.view(-1).to(mask.device), torch.cat(scatter).to(mask.device), mask,
                   prefix_kv)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """``mask`` as 0 / -inf in ``dtype``, built once and reused by every layer."""
        if dtype not in self._additive:
            self._additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype,
                                                device=self.mask.device).masked_fill_(
                                                    ~self.mask, float("-inf"))
        return self._additive[dtype]


def tree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, tree: TreeBatch, scaling: float | None = None,
                           ) -> tuple[torch.Tensor, None]:
    """Attention of a :class:`TreeBatch` row: one SDPA call over its segments as a batch.

    query ``[1, H, T, D]``, key/value ``[1, Hkv, T, D]`` -> ``[1, T, H, D]``. The segments are
    gathered into ``[B, h, W, D]`` and the shared prefix's keys and values (``prefix_kv`` at the
    module's ``layer_idx``) put before each segment's. Under autocast q, k and v are cast
    first, so the copies move half the bytes. One mask over the whole row would make the kernel
    do the whole ``T x (prefix + T)`` rectangle; one call per segment pays the call's cost ``B``
    times per layer (both slower on the CPU, measured: bench/README.md).
    """
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    b, w = tree.mask.shape[0], tree.mask.shape[2]

    def batch(x: torch.Tensor) -> torch.Tensor:  # [1, h, T, D] -> [B, h, W, D]
        return (x[0].to(dtype).index_select(1, tree.gather).view(x.shape[1], b, w, x.shape[-1])
                .transpose(0, 1))

    k, v = batch(key), batch(value)
    if tree.prefix_kv is not None:
        k_pre, v_pre = tree.prefix_kv[module.layer_idx]
        k = torch.cat([k_pre.to(dtype).expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([v_pre.to(dtype).expand(b, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(batch(query), k, v, attn_mask=tree.additive(dtype),
                                         scale=scaling, enable_gqa=query.shape[1] != k.shape[1])
    out = out.transpose(1, 2).reshape(b * w, query.shape[1], query.shape[-1])
    return out.index_select(0, tree.scatter)[None], None


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
