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
    keep = targets != IGNORE_INDEX
    rows = hidden[keep]  # [N, H]
    wanted = targets[keep]  # [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = head(rows[start : start + chunk_size]).float()
        total = total + F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="sum")
    return total


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
        base = self.base()
        extra = {"packed_seq_lens": seq_lens} if seq_lens is not None else {}
        out = base.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        nll = chunked_nll_sum(out.last_hidden_state, base.get_output_embeddings(), targets,
                              self.chunk_size)
        return nll, (targets != IGNORE_INDEX).sum()
