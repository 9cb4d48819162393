"""Next-token cross-entropy on the trained tokens only, without the full logits tensor.

The naive loss is ``F.cross_entropy(lm_head(hidden).float().view(-1, V), targets.view(-1))``:
it projects every position onto the 49k-word vocabulary and keeps an fp32 copy. Here only the
positions that carry a target are projected (completion-only training skips the prompt), and
in chunks, so memory grows with the chunk, not with batch x length x vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data.render import IGNORE_INDEX
from tuneforge.models.adapters import base_model

CHUNK = 256
"""Trained positions projected onto the vocabulary at once: 256 x 49k fp32 logits is ~50 MB
(larger chunks cost memory at no speed gain: bench/README.md, "What each change bought")."""


def chunked_nll_sum(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = CHUNK
) -> torch.Tensor:
    """Sum of -log p(target) over positions whose target is not -100.

    hidden: ``[..., T, H]``; targets: ``[..., T]``. Returns a 0-d fp32 tensor.
    """
    return -chunked_target_logps(hidden, head, targets, chunk_size).sum()


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or PEFT) so that ``forward`` returns the summed token loss.

    Putting the loss inside ``forward`` lets accelerate's DDP/FSDP wrapper see the whole
    computation. Returns ``(nll_sum, num_targets)``; the caller normalises.
    """

    def __init__(self, model: nn.Module, chunk_size: int = CHUNK) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def base(self) -> nn.Module:
        """The transformers model under any PEFT wrapper (its layers carry the adapters)."""
        return base_model(self.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_lens: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_lens`` (packed rows) lets the tuneforge_packed attention run per example."""
        hidden = self.hidden(input_ids, position_ids, attention_mask, seq_lens)
        nll = chunked_nll_sum(hidden, self.base().get_output_embeddings(), targets, self.chunk_size)
        return nll, (targets != IGNORE_INDEX).sum()

    def hidden(self, input_ids, position_ids=None, attention_mask=None, seq_lens=None):
        """Final hidden states ``[B, T, H]`` (the decoder without the vocabulary projection)."""
        extra = {"packed_seq_lens": seq_lens} if seq_lens is not None else {}
        out = self.base().get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False, **extra)
        return out.last_hidden_state


def chunked_target_logps(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = CHUNK
) -> torch.Tensor:
    """log p(target) at every position whose target is not -100, in order: ``[N]`` fp32.

    Like :func:`chunked_nll_sum`, only trained positions are projected onto the vocabulary.
    With a plain ``nn.Linear`` head the projection runs through :class:`_TargetLogProbs`, which
    keeps no logits for backward; other heads (a PEFT-wrapped ``lm_head``) go through autograd
    chunk by chunk.
    """
    keep = targets != IGNORE_INDEX
    rows, wanted = hidden[keep], targets[keep]
    if rows.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if type(head) is not nn.Linear:
        parts = [-F.cross_entropy(head(rows[i : i + chunk_size]).float(), wanted[i : i + chunk_size],
                                  reduction="none")
                 for i in range(0, rows.shape[0], chunk_size)]
        return torch.cat(parts)
    dtype, weight, bias = head_casts(head, rows.device.type)  # their backward is autograd's
    return _TargetLogProbs.apply(rows.to(dtype), weight, bias, wanted, chunk_size)


def head_casts(head: nn.Linear, device_type: str) -> tuple[torch.dtype, torch.Tensor,
                                                            torch.Tensor | None]:
    """(dtype, weight, bias) of the casts autocast would make for ``head``'s matmul, made once
    for all chunks (without autocast: the head's own dtype and tensors)."""
    weight, bias = head.weight, head.bias
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else weight.dtype)
    return dtype, weight.to(dtype), bias.to(dtype) if bias is not None else None


class _TargetLogProbs(torch.autograd.Function):
    """``log_softmax(rows @ weight.T + bias)[i, targets[i]]`` in fp32, chunk by chunk.

    The autograd version saves every chunk's logits in bf16, their fp32 copy and the fp32
    log-softmax for backward: ~10 bytes per trained token per vocabulary entry (~330 MB for 650
    trained tokens of a 49k vocabulary). Here forward keeps one log-sum-exp per row, and
    backward recomputes each chunk's logits (one more head matmul) to form
    ``d logp / d logits = onehot - softmax`` in place. Memory is one chunk's logits at a time.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size):
        n = rows.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=rows.device)
        lse = torch.empty(n, dtype=torch.float32, device=rows.device)
        for i in range(0, n, chunk_size):
            logits = F.linear(rows[i : i + chunk_size], weight, bias).float()
            lse[i : i + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[i : i + chunk_size, None]).squeeze(1)
            logps[i : i + chunk_size] = picked - lse[i : i + chunk_size]
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        rows, weight, bias, targets, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        chunk = ctx.chunk_size
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        grad_logps = grad_logps.float()
        for i in range(0, rows.shape[0], chunk):
            part = slice(i, i + chunk)
            g = grad_logps[part, None]
            logits = F.linear(rows[part], weight, bias).float()
            d = logits.sub_(lse[part, None]).exp_().mul_(-g)  # -g * softmax
            d.scatter_add_(1, targets[part, None], g)  # + g at the target
            d = d.to(rows.dtype)
            if need_rows:
                grad_rows[part] = d @ weight
            if need_weight:
                grad_weight.add_(d.t() @ rows[part])
            if need_bias:
                grad_bias.add_(d.sum(0, dtype=torch.float32))
        return (grad_rows,
                grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None,
                None, None)
