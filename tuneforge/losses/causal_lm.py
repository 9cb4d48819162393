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


def chunked_nll_sum(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
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

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def base(self) -> nn.Module:
        """The transformers model under any PEFT wrapper (its layers carry the adapters)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

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
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target) at every position whose target is not -100, in order: ``[N]`` fp32.

    Like :func:`chunked_nll_sum`, only trained positions are projected onto the vocabulary.
    """
    keep = targets != IGNORE_INDEX
    rows, wanted = hidden[keep], targets[keep]
    parts = [-F.cross_entropy(head(rows[i : i + chunk_size]).float(), wanted[i : i + chunk_size],
                              reduction="none")
             for i in range(0, rows.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class SequenceLogProbs(CausalLMLoss):
    """``forward`` returns the summed target log-prob of each packed sequence: ``[S]`` and counts.

    The sequence statistics preference and ranking losses start from (DPO's log pi(y|x)).
    """

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, seq_lens=None):
        hidden = self.hidden(input_ids, position_ids, attention_mask, seq_lens)
        logps = chunked_target_logps(hidden, self.base().get_output_embeddings(), targets,
                                     self.chunk_size)
        if seq_lens is None:  # one sequence per row of a padded batch
            seq_lens = [targets.shape[-1]] * targets.shape[0]
        seq_of = torch.repeat_interleave(torch.arange(len(seq_lens), device=targets.device),
                                         torch.tensor(seq_lens, device=targets.device))
        seq_of = seq_of[(targets != IGNORE_INDEX).reshape(-1)]
        sums = logps.new_zeros(len(seq_lens)).index_add(0, seq_of, logps)
        counts = torch.bincount(seq_of, minlength=len(seq_lens))
        return sums, counts
