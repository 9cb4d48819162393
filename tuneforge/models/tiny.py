"""Tiny random models built in code, for tests: no downloads, a few thousand parameters.

``tiny:llama`` (or ``tiny:qwen2``, ``tiny:mistral``) builds a 2-layer model with hidden size 64
and a byte-level tokenizer (256 byte tokens plus ChatML specials) that carries a chat template,
so every code path that a real instruct model takes (templating, masking the prompt, stopping at
the end-of-turn token) runs on it too. Weights are initialised from a fixed seed: the same name
gives the same model every time.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from tuneforge.errors import ModelLoadError

# ChatML, as used by SmolLM2 and Qwen: every turn ends in <|im_end|>, the end-of-turn token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# hidden 64, 2 layers: small enough for a CPU test step in milliseconds, deep enough that
# "freeze all but the top layer" is a real choice.
TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "mistral": {"model_type": "mistral"},
}

TINY_DIMENSIONS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token.

    Ids 0..2 are the ChatML specials, 3..258 the bytes. Built in code, so tests never need a
    tokenizer file.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = TINY_DIMENSIONS["max_position_embeddings"]
    return tokenizer


def build_tiny(spec: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build ``tiny:<arch>`` as (model, tokenizer); the weights depend only on ``seed``."""
    arch = spec.split(":", 1)[1] if ":" in spec else spec
    if arch not in TINY_ARCHITECTURES:
        known = ", ".join(f"tiny:{a}" for a in TINY_ARCHITECTURES)
        raise ModelLoadError(f"unknown tiny model {spec!r}; known: {known}")
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(
        TINY_ARCHITECTURES[arch]["model_type"],
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_DIMENSIONS,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

