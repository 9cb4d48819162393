"""Loss functions: tensors in, (loss, metrics) out."""

from __future__ import annotations

import torch

LossAndMetrics = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""What the reward, ranking and RL functions return: the result tensor (a 0-d loss to
backpropagate, or advantages / per-token rewards) and detached 0-d metrics by name."""
