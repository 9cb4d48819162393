"""``tuneforge export``: a run's result as files that other tools load without tuneforge.

Three kinds of output, each a folder:

- ``adapter`` (``--format safetensors`` on a LoRA/DoRA/... run, no ``--merge``): the PEFT folder
  as trained, for ``PeftModel.from_pretrained(base, folder)`` or a server that takes adapters;
- ``merged`` (``--merge``, or any full/freeze run): one plain transformers model (config.json,
  model.safetensors, tokenizer, chat template) in float32, bfloat16 or float16, for
  ``AutoModelForCausalLM.from_pretrained(folder)``, vLLM and TGI;
- ``gguf`` (``--format gguf``, always merged): one ``model-<type>.gguf`` for llama.cpp, Ollama or
  transformers' GGUF loader, in F32, F16, BF16 or Q8_0, plus an Ollama ``Modelfile``.

Every folder gets ``export.json``: what was exported, from which run, in which type, and the size
and sha256 of every file. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from tuneforge import __version__
from tuneforge.errors import ModelLoadError
from tuneforge.export.errors import ExportError
from tuneforge.models.runs import find_run_output

FORMATS = ("safetensors", "gguf")
DTYPE_ALIASES = {"f32": "f32", "float32": "f32", "fp32": "f32",
                 "f16": "f16", "float16": "f16", "fp16": "f16", "half": "f16",
                 "bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0", "q8": "q8_0"}
FORMAT_DTYPES = {"safetensors": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "bf16", "q8_0")}
DEFAULT_DTYPE = {"safetensors": "f32", "gguf": "f16"}
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "export.json"


def export_run(run: str | Path, out: str | Path, *, merge: bool = False, fmt: str = "safetensors",
               dtype: str | None = None, overwrite: bool = False) -> dict:
    """Export the result of a ``tuneforge train`` run into ``out``; returns the manifest.

    Options are checked before any model is loaded. ``out`` must not exist, be empty, or (with
    ``overwrite``) hold an earlier export: any other folder is never deleted.
    """
    dtype = resolve_dtype(fmt, dtype)
    run, out = Path(run), Path(out)
    output = find_run_output(run) if run.is_dir() else None
    if output is None:
        raise ExportError(f"{run}: not a tuneforge run folder (no adapter/ or model/ with "
                          "tuneforge.json); give the output_dir of a `tuneforge train` run")
    meta = json.loads((output / "tuneforge.json").read_text())
    check_destination(out, overwrite)
    is_adapter = output.name != "model" and meta.get("method") not in ("full", "freeze")
    kind = "gguf" if fmt == "gguf" else ("adapter" if is_adapter and not merge else "merged")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == "adapter":
            details = export_adapter(output, tmp, dtype, meta["base_model"])
        else:
            model, tokenizer = load_merged(run)
            details = (export_merged(model, tokenizer, tmp, dtype) if kind == "merged"
                       else export_gguf(model, tokenizer, tmp, dtype, _run_name(output),
                                        meta["base_model"]))
        manifest = {"tuneforge_version": __version__, "kind": kind, "format": fmt, "dtype": dtype,
                    "run": str(run.resolve()), "base_model": meta["base_model"],
                    "method": meta.get("method"),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
        manifest["files"] = file_digests(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def resolve_dtype(fmt: str, dtype: str | None) -> str:
    """The canonical type name (f32, f16, bf16, q8_0) for ``--dtype`` in ``--format fmt``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} unknown; use one of: {', '.join(FORMATS)}")
    if dtype is None:
        return DEFAULT_DTYPE[fmt]
    canonical = DTYPE_ALIASES.get(dtype.lower())
    if canonical not in FORMAT_DTYPES[fmt]:
        raise ExportError(f"--dtype {dtype!r} is not available for --format {fmt}; use one of: "
                          f"{', '.join(FORMAT_DTYPES[fmt])}")
    return canonical


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not an earlier export, and anything without --overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"--out {out}: folder exists and is not empty; pass --overwrite to "
                          "replace an earlier export, or choose another folder")
    if not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out}: holds files that are not a tuneforge export (no "
                          f"{MANIFEST}); refusing to delete it even with --overwrite")


def load_merged(run: Path):
    """(plain transformers model in float32, tokenizer) for a run: adapters merged into weights."""
    from tuneforge.models.runs import load_for_inference

    _say(f"loading {run}")
    model, tokenizer, description = load_for_inference(str(run), dtype="float32")
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        _say(f"merging {description}")
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def export_adapter(output: Path, dest: Path, dtype: str, base_model: str) -> dict:
    """Copy the PEFT folder, converting the adapter weights to ``dtype`` if asked."""
    from safetensors.torch import load_file, save_file

    for path in output.iterdir():
        if path.is_file() and path.name != "README.md":  # PEFT's empty model-card template
            shutil.copy2(path, dest / path.name)
    weights = dest / "adapter_model.safetensors"
    if dtype != "f32" and weights.is_file():
        tensors = load_file(weights)
        save_file({k: v.to(TORCH_DTYPES[dtype]) if v.is_floating_point() else v
                   for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    base_location = _base_location(base_model)
    config_path = dest / "adapter_config.json"
    if base_location and config_path.is_file():
        # Lets AutoPeftModelForCausalLM.from_pretrained(folder) find the base on this machine.
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_location
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"base_model_location": base_location}


def export_merged(model, tokenizer, dest: Path, dtype: str) -> dict:
    """Save a merged model as a plain transformers folder that also older loaders read."""
    _say(f"writing merged model ({dtype}) to {dest}")
    model.to(TORCH_DTYPES[dtype]).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    add_legacy_fields(dest)
    return {"architecture": model.config.model_type}


def export_gguf(model, tokenizer, dest: Path, dtype: str, name: str, base_model: str) -> dict:
    """Write ``model-<dtype>.gguf`` and an Ollama Modelfile next to it."""
    from tuneforge.export.gguf_file import write_gguf
    from tuneforge.export.gguf_vocab import source_pre_tokenizer

    gguf_name = f"model-{dtype}.gguf"
    _say(f"writing {gguf_name}")
    summary = write_gguf(model, tokenizer, dest / gguf_name, dtype, name=name,
                         source_pre=source_pre_tokenizer(_source_gguf(base_model)))
    write_modelfile(dest / "Modelfile", gguf_name, tokenizer)
    return {"gguf_file": gguf_name, **summary}


def write_modelfile(path: Path, gguf_name: str, tokenizer) -> None:
    """An Ollama Modelfile: the GGUF, and the end-of-turn token as a stop sequence.

    Ollama reads the chat template from the GGUF's tokenizer.chat_template itself.
    """
    lines = [f"FROM ./{gguf_name}"]
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path.write_text("\n".join(lines) + "\n")


def add_legacy_fields(folder: Path) -> None:
    """Add the keys transformers 4.x (and so many vLLM/TGI installs) read to the saved files.

    transformers 5 writes ``dtype`` and ``rope_parameters`` in config.json, the chat template
    beside tokenizer_config.json, and a tokenizer class name 4.x does not know. Older readers would
    fall back to float32 and a rope base of 10000 without a word, so the old spellings are added
    next to the new ones (transformers 5 reads the new ones and ignores these).
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    tok_path = folder / "tokenizer_config.json"
    if not tok_path.is_file():
        return
    tok = json.loads(tok_path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = folder / "chat_template.jinja"
    if template.is_file():
        tok.setdefault("chat_template", template.read_text())
    if isinstance(tok.get("extra_special_tokens"), list):
        tok.setdefault("additional_special_tokens", tok.pop("extra_special_tokens"))
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} for every file under ``folder``."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
        digests[str(path.relative_to(folder))] = {"bytes": path.stat().st_size,
                                                  "sha256": sha.hexdigest()}
    return digests


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export there goes only once this succeeds."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _source_gguf(base_model: str) -> Path | None:
    """The GGUF file a base model spec was converted from (builtin: or a .gguf path), if any."""
    try:
        if base_model.startswith("builtin:"):
            from tuneforge.models.builtin import builtin_gguf_path

            return builtin_gguf_path(base_model.split(":", 1)[1])
    except ModelLoadError:
        return None
    return Path(base_model) if base_model.endswith(".gguf") else None


def _base_location(base_model: str) -> str | None:
    """The base model's local folder, where it has one (not tiny: models, not a bare .gguf)."""
    if base_model.startswith("tiny:"):
        return None
    from tuneforge.models.loading import resolve_model_dir

    try:
        folder, gguf_file = resolve_model_dir(base_model)
    except ModelLoadError:
        return None
    return None if gguf_file else str(folder.resolve())


def _run_name(output: Path) -> str:
    """The run's folder name (output is RUN/adapter or RUN/model, or a bare output folder)."""
    return output.resolve().parent.name if output.name in ("adapter", "model") else output.name


def _say(message: str) -> None:
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)
