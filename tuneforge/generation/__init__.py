"""Text generation.

- :mod:`.decode`: decoding: :func:`generate_reply` (`tuneforge generate` / `chat`),
  :func:`generate_batch` (evaluation) and :func:`generate_rows` (one batch of token-id prompts,
  each with its own settings), the batched KV-cache decode loop, the samplers and caches.
- :mod:`.engine`: continuous batching, :class:`DecodeEngine` (rows join and leave at every
  decode step): the server's batcher and the RL rollouts (:func:`generate_continuous`) run on it.
- :mod:`.inference_copy`: the model that decoding runs for each precision
  (:func:`inference_model`): the fp32 model, or its bf16 copy with int4-packed weights where
  that is exact. Its settings (``PACK_INT4``, ``BF16_ACTIVATIONS``, ``INT4_MAX_ROWS``) are read
  there: set or patch them on that module, not on this package.
"""

from tuneforge.generation.decode import (
    CACHES,
    GenerationResult,
    RowSettings,
    TokenCallback,
    generate_batch,
    generate_reply,
    generate_rows,
)
from tuneforge.generation.engine import DecodeEngine, EngineRow, generate_continuous
from tuneforge.generation.inference_copy import PRECISIONS, inference_model

__all__ = [
    "CACHES",
    "DecodeEngine",
    "EngineRow",
    "PRECISIONS",
    "GenerationResult",
    "RowSettings",
    "TokenCallback",
    "generate_batch",
    "generate_continuous",
    "generate_reply",
    "generate_rows",
    "inference_model",
]
