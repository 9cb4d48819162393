"""Writing a merged model as one GGUF file that llama.cpp, Ollama and transformers can load.

The layout is the one llama.cpp's own converter writes for these architectures:

- tensor names from the ``gguf`` package's name map (``model.layers.3.self_attn.q_proj.weight``
  becomes ``blk.3.attn_q.weight``); the output projection is left out when it is the embedding;
- for ``llama`` (and Mistral, which llama.cpp runs as ``llama``) the rows of the query and key
  projections are reordered, because Hugging Face rotates the two halves of each head while
  llama.cpp's rope rotates adjacent pairs; Qwen2 uses the half layout in llama.cpp too;
- 1-D tensors (norms, biases) stay F32; 2-D weights take the requested type, except that a weight
  whose rows are not a whole number of Q8_0 blocks (32 values) falls back to F16;
- model hyper-parameters under ``<arch>.*`` and the tokenizer under ``tokenizer.*`` (see
  :mod:`.gguf_vocab`).

Tensors are converted and written one at a time, so memory stays near one model copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from tuneforge.export.errors import ExportError
from tuneforge.export.gguf_vocab import vocab_from_tokenizer, write_vocab

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers ``model_type`` is written."""

    arch: gguf.MODEL_ARCH
    interleave_rope: bool  # reorder q/k rows from HF's half rotation to llama.cpp's pair rotation


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    # Mistral is Llama plus a sliding window; llama.cpp runs it as "llama", and so do we (a window
    # shorter than the context is refused). transformers reads the file back as a Llama model.
    # (Its loader would take general.name == "mistral" as a hint, then fail in gguf-py 0.19.)
    "mistral": GGUFArch(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    "qwen2": GGUFArch(gguf.MODEL_ARCH.QWEN2, interleave_rope=False),
}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: where it comes from, its GGUF name, type and shape."""

    source: str  # state_dict key
    name: str
    ggml_type: Q
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for a weight
    rope_heads: int  # >0: reorder rows of this many heads for llama.cpp's rope

    @property
    def nbytes(self) -> int:
        return prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.ggml_type))


def write_gguf(model, tokenizer, path: Path, dtype: str, *, name: str,
               source_pre: str | None = None) -> dict:
    """Write ``model`` (a merged, plain transformers model) and its tokenizer to ``path``.

    ``dtype`` is one of :data:`GGUF_TYPES`. Returns a summary for the export manifest:
    architecture and how many tensors of each GGML type were written.
    """
    config = model.config
    arch = check_architecture(config)
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, source_pre)
    plan = tensor_plan(model, arch, dtype)
    writer = _Writer(path, gguf.MODEL_ARCH_NAMES[arch.arch])
    _write_model_keys(writer, config, arch, dtype, name)
    write_vocab(writer, vocab)
    for entry in plan:
        # The logical shape and the GGML type decide the layout; the numpy dtype is not used.
        writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes,
                               raw_dtype=entry.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    state = model.state_dict()
    for entry in tqdm(plan, desc=f"writing {path.name}", unit="tensor", disable=None):
        writer.write_tensor_data(encode_tensor(state[entry.source], entry))
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch.arch], "pre_tokenizer": vocab.pre,
            "tensor_types": dict(Counter(e.ggml_type.name for e in plan))}


def check_architecture(config) -> GGUFArch:
    """The GGUF layout for this config, or ExportError naming what cannot be written."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is "
            f"{config.model_type!r}. Export --format safetensors instead."
        )
    problems = []
    rope_type, _ = rope_settings(config)
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r} (only plain rope is written)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases on a llama model")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
    if uses_window and window is not None and window < config.max_position_embeddings:
        problems.append(f"sliding-window attention ({window} < context "
                        f"{config.max_position_embeddings}), which llama.cpp's {config.model_type} "
                        "does not apply")
    if _head_dim(config) * config.num_attention_heads != config.hidden_size and not arch.interleave_rope:
        problems.append("a head size other than hidden_size / num_attention_heads")
    if problems:
        raise ExportError(f"cannot write this {config.model_type} model as GGUF: "
                          + "; ".join(problems))
    return arch


def tensor_plan(model, arch: GGUFArch, dtype: str) -> list[TensorPlan]:
    """Every tensor to write, in state_dict order, with its GGUF name and type."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    tied = _tied_output(model)
    rope_heads = {"q_proj": config.num_attention_heads, "k_proj": _kv_heads(config)}
    plan = []
    for key, tensor in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # recomputed from the rope settings; the tied head is the embedding
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {key!r} of this {config.model_type} model")
        shape = tuple(tensor.shape)
        module = key.rsplit(".", 2)[-2]
        heads = rope_heads.get(module, 0) if arch.interleave_rope else 0
        plan.append(TensorPlan(key, gguf_name, tensor_type(shape, dtype), shape, heads))
    return plan


def tensor_type(shape: tuple[int, ...], dtype: str) -> Q:
    """The GGML type a tensor of ``shape`` is stored in, for a file of type ``dtype``."""
    if len(shape) < 2:
        return Q.F32  # norms and biases: a rounding error here costs accuracy and saves nothing
    wanted = GGUF_TYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16  # as llama.cpp does for rows that are not a whole number of blocks
    return wanted


def encode_tensor(tensor: torch.Tensor, entry: TensorPlan) -> np.ndarray:
    """The bytes of one tensor as the file stores them (an array of ``entry.nbytes`` bytes)."""
    data = tensor.detach().to(torch.float32)
    if entry.rope_heads:
        data = interleave_rope_rows(data, entry.rope_heads)
    if entry.ggml_type == Q.F32:
        return data.numpy()
    if entry.ggml_type == Q.F16:
        return data.to(torch.float16).numpy()
    if entry.ggml_type == Q.BF16:
        # numpy has no bfloat16: convert in torch (round to nearest even, as the merged
        # safetensors export does) and hand over the raw 16-bit patterns.
        return data.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(data.numpy(), entry.ggml_type)


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rope layout to llama.cpp's.

    ``weight``: (n_heads * head_dim, in_features), or (n_heads * head_dim,) for a bias. Within a
    head, HF rotates row i together with row i + head_dim/2; llama.cpp's ``llama`` rope rotates
    rows 2i and 2i+1. Row i of the first half goes to 2i, row i of the second half to 2i+1.
    """
    half = weight.shape[0] // n_heads // 2
    rows = weight.reshape(n_heads, 2, half, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def rope_settings(config) -> tuple[str, float]:
    """(rope type, base frequency) from a transformers 5 or 4 config."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return rope_type, float(theta if theta is not None else 10000.0)


def _write_model_keys(writer: gguf.GGUFWriter, config, arch: GGUFArch, dtype: str, name: str) -> None:
    """general.* and <arch>.* keys: what llama.cpp needs to build the graph."""
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_settings(config)[1])
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _tied_output(model) -> bool:
    """Whether the output projection is the input embedding (then GGUF stores it once)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty typed array.

    A byte-level vocabulary with no merges (every byte a token, as in tuneforge's tiny test
    models) still needs a ``tokenizer.ggml.merges`` key: llama.cpp and transformers read it
    unconditionally. The format allows a zero-length array; the Python writer refuses one only
    because it infers the element type from the first element, so it is packed here by hand.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
            header = self._pack("I", vtype) if add_vtype else b""
            return header + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
