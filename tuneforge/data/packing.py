"""Padding-free batches: the examples of a micro-batch laid end to end in one row.

A packed row spends no compute on padding. ``position_ids`` restart at 0 for every example;
transformers' attention reads those restarts (with no attention mask given) and builds a
block-diagonal causal mask, so no token attends across an example boundary. Targets are shifted
per example before concatenation, so no example is trained to predict the next one's first token.
"""

from __future__ import annotations

import torch

from tuneforge.data.render import IGNORE_INDEX, TokenizedExample


def pack(examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Pack examples into one row.

    Returns ``input_ids``, ``position_ids``, ``targets`` of shape ``[1, T]`` (``targets[t]`` is
    the token to predict after position t, -100 where no loss is taken), ``num_targets``,
    the count of trained tokens (a 0-d tensor), and ``seq_lens``, the example lengths.
    """
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for ex in examples:
        ids.extend(ex.input_ids)
        positions.extend(range(len(ex.input_ids)))
        targets.extend(ex.labels[1:])
        targets.append(IGNORE_INDEX)  # the last token of an example predicts nothing
    targets_t = torch.tensor([targets], dtype=torch.long)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "targets": targets_t,
        "num_targets": (targets_t != IGNORE_INDEX).sum(),
        "seq_lens": [len(ex.input_ids) for ex in examples],
    }


def score_packed(module, sequences: list[TokenizedExample], device: torch.device):
    """Pack ``sequences`` into one row and run ``module`` on it (a scorer whose ``forward`` takes
    ``(input_ids, targets, position_ids=, seq_lens=)``: tuneforge/train/scoring.py)."""
    packed = pack(list(sequences))
    return module(packed["input_ids"].to(device), packed["targets"].to(device),
                  position_ids=packed["position_ids"].to(device), seq_lens=packed["seq_lens"])


def pad(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """The same examples as a right-padded ``[B, L]`` batch with an attention mask.

    Used for reference (tests compare packed against padded losses) and by code that needs a
    rectangular batch.
    """
    length = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        targets[row, : n - 1] = torch.tensor(ex.labels[1:], dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "targets": targets,
        "num_targets": (targets != IGNORE_INDEX).sum(),
    }
