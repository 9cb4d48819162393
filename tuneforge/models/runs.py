"""Loading a model for inference: a base model spec, or the output of a tuneforge run."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import ModelLoadError
from tuneforge.models.loading import load_model


def find_run_output(path: Path) -> Path | None:
    """The adapter/ or model/ folder a run wrote, if ``path`` is a run folder or one of those."""
    if (path / "tuneforge.json").is_file():
        return path
    for name in ("adapter", "model"):
        if (path / name / "tuneforge.json").is_file():
            return path / name
    return None


def load_for_inference(spec: str, *, dtype: str = "float32"):
    """(model, tokenizer, description) for a base model spec or a run folder, in eval mode."""
    output = find_run_output(Path(spec)) if Path(spec).is_dir() else None
    if output is None:
        model, tokenizer = load_model(spec, dtype=dtype)
        return model.eval(), tokenizer, spec
    meta = json.loads((output / "tuneforge.json").read_text())
    if output.name == "model" or meta.get("method") in ("full", "freeze"):
        model, tokenizer = load_model(str(output), dtype=dtype)
        return model.eval(), tokenizer, f"{spec} (fine-tuned {meta['base_model']})"
    from peft import PeftModel

    base, tokenizer = load_model(meta["base_model"], dtype=dtype)
    try:
        model = PeftModel.from_pretrained(base, output)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the adapter in {output}: {err}") from err
    return model.eval(), tokenizer, f"{spec} ({meta['method']} adapter on {meta['base_model']})"
