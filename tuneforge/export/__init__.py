"""Exporting a run: the PEFT adapter, a merged transformers model, or a GGUF file.

:func:`export_run` is what ``tuneforge export`` calls; :mod:`.gguf_file` and :mod:`.gguf_vocab`
write GGUF files for llama.cpp, Ollama and transformers' GGUF loader.
"""

from tuneforge.export.errors import ExportError
from tuneforge.export.run import FORMATS, export_run

__all__ = ["FORMATS", "ExportError", "export_run"]
