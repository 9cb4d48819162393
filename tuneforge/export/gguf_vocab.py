"""The tokenizer half of a GGUF file: vocabulary, merges, special ids and the chat template.

A GGUF file carries no ``tokenizer.json``. llama.cpp, Ollama and transformers' GGUF loader all
rebuild the tokenizer from ``tokenizer.ggml.*`` metadata instead. For a byte-level BPE vocabulary
(GPT-2, Llama 3, Qwen2, SmolLM; ``"gpt2"`` in GGUF terms) that metadata is:

- ``tokens``: every token by id, spelled in the byte-level alphabet (``"Ġthe"``);
- ``token_type``: NORMAL, CONTROL (special tokens such as ``<|im_end|>``), USER_DEFINED (added
  tokens that are not special) or UNUSED (padding rows of the embedding beyond the tokenizer);
- ``merges``: the BPE merge list, best first, as ``"left right"``;
- ``pre``: the name of the rule that splits text before BPE runs (llama.cpp keeps a regex per name);
- the bos/eos/unk/pad ids, whether BOS/EOS are added, and ``tokenizer.chat_template``.

Only byte-level BPE tokenizers are exported; anything else is refused with a message rather than
written in a form llama.cpp would tokenize differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from tuneforge.export.errors import ExportError

# llama.cpp's name for "split text with the GPT-2 regex", which is what a bare ByteLevel
# pre-tokenizer (use_regex=True) does.
GPT2_PRE = "gpt-2"


@dataclass
class GGUFVocab:
    """Everything written under ``tokenizer.*`` in a GGUF file."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # "bos" | "eos" | "unk" | "pad" -> token id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def vocab_from_tokenizer(tokenizer, vocab_size: int, source_pre: str | None = None) -> GGUFVocab:
    """Describe a Hugging Face fast tokenizer as GGUF tokenizer metadata.

    ``vocab_size`` is the model's embedding row count: the token list is padded to it, as
    llama.cpp expects one entry per row. ``source_pre`` is the pre-tokenizer name from the GGUF
    file the base model came from, if it came from one (it names the split rule exactly).
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style); "
            f"this model's tokenizer is {model.get('type', 'unknown')} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}. Export --format safetensors instead."
        )
    tokens, token_types = _token_table(model["vocab"], spec.get("added_tokens") or [], vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = source_pre or pre_tokenizer_name(spec.get("pre_tokenizer"), has_merges=bool(merges))
    special_ids = {
        role: token_id
        for role, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                               ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id))
        if token_id is not None
    }
    add_bos, add_eos = _added_specials(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what runs
        template = template.get("default")
    return GGUFVocab(tokens, token_types, merges, pre, special_ids, add_bos, add_eos, template)


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Add the ``tokenizer.*`` keys for ``vocab`` to a writer (before its header is written)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    else:
        # llama.cpp and transformers both require the key, and GGUFWriter refuses to write an
        # empty array, so a merge-free vocabulary (every byte a token) is written with a key of
        # length zero by hand. See _EmptyArrayWriter in gguf_file.py.
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special_ids.items():
        setters[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def pre_tokenizer_name(pre_tokenizer: dict | None, *, has_merges: bool) -> str:
    """llama.cpp's name for the split rule a ``tokenizer.json`` pre-tokenizer applies.

    A bare ByteLevel with its regex is GPT-2's rule; a Split by regex followed by ByteLevel is
    matched against the regexes transformers' GGUF loader knows by name (Llama 3, Qwen2, ...),
    so that both llama.cpp and that loader split text the way training did.
    """
    kind = (pre_tokenizer or {}).get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return GPT2_PRE
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
            name = _known_splits().get((steps[0].get("pattern") or {}).get("Regex"))
            if name is not None:
                return name
    if not has_merges:
        # With no merges every byte is its own token, so no split rule can change the result.
        return "default"
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre_tokenizer)[:200]}) is not one GGUF can "
        "name, so llama.cpp would split text differently from training. Export --format "
        "safetensors instead."
    )


def source_pre_tokenizer(gguf_path: Path | None) -> str | None:
    """The ``tokenizer.ggml.pre`` of the GGUF a base model was converted from, if any."""
    if gguf_path is None or not gguf_path.is_file():
        return None
    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get(gguf.Keys.Tokenizer.PRE)
    return None if field is None else str(field.contents())


def _token_table(vocab: dict[str, int], added: list[dict], size: int) -> tuple[list[str], list[int]]:
    """(tokens by id, GGUF token types), padded with unused ``[PADn]`` tokens up to ``size``."""
    by_id: dict[int, str] = {i: tok for tok, i in vocab.items()}
    types: dict[int, int] = {}
    for entry in added:
        by_id[entry["id"]] = entry["content"]
        types[entry["id"]] = (gguf.TokenType.CONTROL if entry.get("special")
                              else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= size:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model's embedding has "
                          f"only {size} rows; the tokenizer does not belong to this model")
    tokens, token_types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(int(types.get(i, gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    return tokens, token_types


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding plain text, found by encoding a word both ways."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    extra = len(full) > len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (extra and bos is not None and full[0] == bos,
            extra and eos is not None and full[-1] == eos and plain[-1:] != [eos])


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer; this one is "
                          f"{type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _is_byte_level(spec: dict) -> bool:
    """Whether text reaches BPE as GPT-2's byte alphabet (ByteLevel pre-tokenizer and decoder)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (spec.get("normalizer") is None
            and any(step.get("type") == "ByteLevel" for step in steps)
            and (spec.get("decoder") or {}).get("type") == "ByteLevel")


def _known_splits() -> dict[str, str]:
    """{split regex: llama.cpp pre-tokenizer name}, from transformers' GGUF loader where present.

    Taking the table from the loader keeps writer and reader in step: a regex it knows by name
    is rebuilt exactly, and the names are llama.cpp's own.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # transformers < 5: no such table; only GPT-2's rule is recognised
        return {}
    table: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        table.setdefault(regex, name)  # first name listed for a regex is the canonical one
    return table
