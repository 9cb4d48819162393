"""The models a server answers for: one base model and any number of LoRA (PEFT) adapters on
it, each under its own model id, sharing the base weights.

``tuneforge serve RUN`` serves the run's adapter under the run folder's name and the base model
under its spec; ``--adapters name=path`` adds more (run folders or PEFT adapter folders). A
batch runs one model id at a time: in fp32 the adapter is switched on the one PeftModel before
the batch (a flag flip), in bf16 each id gets its own inference copy once, at start-up.

With a ``source`` of fine-tuned adapters (the jobs API's finished jobs), a model id the server
was not started with is looked up there, per API key, and its adapter is loaded on its first
request, in the batcher's thread between batches: a job's model is served as soon as the job
succeeds, without a restart, and only to the key that owns it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tuneforge.errors import ConfigError, ModelLoadError
from tuneforge.generation import PRECISIONS, inference_model
from tuneforge.models.loading import load_model
from tuneforge.models.runs import find_run_output

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$")


class AdapterSource(Protocol):
    """Adapters served on demand, each visible to one API key (see the jobs API)."""

    def adapter_for(self, model_id: str, key_id: str | None) -> Path | None:
        """The adapter folder of ``model_id`` if ``key_id`` may use it, else None."""

    def model_ids(self, key_id: str | None) -> list[str]:
        """The model ids ``key_id`` may use."""


@dataclass
class ServedModels:
    """The loaded model (a PeftModel when adapters are served), its tokenizer and model ids."""

    model: object
    tokenizer: object
    base_id: str
    ids: list[str]  # every model id, in the order /v1/models lists them (a run's own first)
    precision: str = "fp32"
    description: str = ""
    source: AdapterSource | None = None
    _copies: dict[str, tuple[object, bool]] = field(default_factory=dict, repr=False)
    _pending: dict[str, Path] = field(default_factory=dict, repr=False)
    _loaded: list[str] = field(default_factory=list, repr=False)  # ids loaded from ``source``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def adapter_ids(self) -> list[str]:
        return [i for i in self.ids if i != self.base_id] + self._loaded

    def visible_ids(self, key_id: str | None) -> list[str]:
        """The ids ``key_id`` may call: the server's own, then its fine-tuned models."""
        extra = self.source.model_ids(key_id) if self.source is not None else []
        return self.ids + [i for i in extra if i not in self.ids]

    def knows(self, model_id: str, key_id: str | None) -> bool:
        """Whether ``key_id`` may call ``model_id``; a fine-tuned one not loaded yet is queued
        for loading at its first batch."""
        if model_id in self.ids:
            return True
        folder = self.source.adapter_for(model_id, key_id) if self.source is not None else None
        if folder is None:
            return False
        with self._lock:
            if model_id not in self._loaded:
                self._pending.setdefault(model_id, folder)
        return True

    def _load_pending(self, model_id: str) -> None:
        """Attach a fine-tuned adapter looked up by :meth:`knows` (batcher thread only)."""
        with self._lock:
            folder = self._pending.get(model_id)
        if folder is None:
            return
        folder = _adapter_folder(folder, model_id, self.base_id)
        self.model = _attach(self.model, folder, model_id,
                             first=not hasattr(self.model, "peft_config"))
        self.model.eval()
        with self._lock:
            self._loaded.append(model_id)
            del self._pending[model_id]
        if self.precision != "fp32":
            with self._activated(model_id):
                run_model, autocast = inference_model(self.model, self.precision)
            if run_model is not self.model:
                self._copies[model_id] = (run_model, autocast)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.stop_token_ids or [0])[0]

    def prepare(self, say: Callable[[str], None] = lambda _: None) -> None:
        """Make the inference copies (bf16: one per model id) so that no request waits for one."""
        self.model.eval()
        if self.precision == "fp32":
            return
        for model_id in self.ids:
            say(f"preparing {model_id} for {self.precision} inference")
            with self._activated(model_id):
                run_model, autocast = inference_model(self.model, self.precision)
            if run_model is not self.model:  # a separate copy with this adapter baked in
                self._copies[model_id] = (run_model, autocast)

    @contextmanager
    def runner(self, model_id: str) -> Iterator[tuple[object, bool]]:
        """(model to run, under bf16 autocast?) for ``model_id``, its adapter active meanwhile.

        Only the batcher's worker thread calls this: adapters are switched on shared modules.
        """
        if model_id in self._pending:
            self._load_pending(model_id)
        if model_id in self._copies:
            yield self._copies[model_id]
            return
        with self._activated(model_id):
            yield self.model, self.precision == "autocast"

    @contextmanager
    def _activated(self, model_id: str) -> Iterator[None]:
        if not self.adapter_ids:
            yield
        elif model_id == self.base_id:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(model_id)
            yield


def parse_adapter_args(items: list[str]) -> list[tuple[str, str]]:
    """``["name=path", ...]`` -> [(name, path)]; ConfigError for a malformed item."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapters {item!r}: expected NAME=PATH (a run or adapter folder)")
        out.append((name.strip(), path.strip()))
    return out


def load_served_models(spec: str, adapters: list[tuple[str, str]] = (), *,
                       precision: str = "fp32",
                       say: Callable[[str], None] = lambda _: None) -> ServedModels:
    """Load ``spec`` (a base model spec or a run folder) and ``adapters`` onto it, and make the
    inference copies, in a thread of their own (:func:`in_own_thread`)."""
    return in_own_thread(_load_served_models, spec, adapters, precision=precision, say=say)


def in_own_thread(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a new thread and waited for: its result, or its exception.

    Torch's parallel work gives the calling thread an OpenMP (libgomp) thread team that lasts as
    long as that thread does. Once a process holds more team threads than it has cores, libgomp
    stops spin-waiting between parallel regions in every team, and a decode step (hundreds of
    small parallel regions) in the server's generation thread runs at less than half its speed
    when the main thread has made the inference copy (measured: bench/README.md). A thread that
    has ended leaves no team behind.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = err

    thread = threading.Thread(target=run, name="tuneforge-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _load_served_models(spec: str, adapters: list[tuple[str, str]], *, precision: str,
                        say: Callable[[str], None]) -> ServedModels:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    base_spec, base_id, run_adapters, description = _resolve_base(spec)
    entries = run_adapters + [(name, Path(path)) for name, path in adapters]
    _check_ids(base_id, [name for name, _ in entries])
    say(f"loading {base_spec}")
    model, tokenizer = load_model(base_spec)
    for i, (name, path) in enumerate(entries):
        folder = _adapter_folder(path, name, base_spec)
        say(f"loading adapter {name} from {folder}")
        model = _attach(model, folder, name, first=i == 0)
    ids = [name for name, _ in run_adapters] + [base_id] + [name for name, _ in adapters]
    served = ServedModels(model, tokenizer, base_id, ids, precision=precision,
                          description=description)
    served.prepare(say)
    return served


def _resolve_base(spec: str) -> tuple[str, str, list[tuple[str, Path]], str]:
    """(spec to load, base model id, the run's own adapter, description) for ``spec``."""
    path = Path(spec)
    output = find_run_output(path) if path.is_dir() else None
    if output is None:
        return spec, spec, [], spec
    meta = _read_meta(output)
    run_dir = output.parent if output.name in ("adapter", "model") else output
    name = run_dir.resolve().name
    if output.name == "model" or meta.get("method") in ("full", "freeze"):
        return str(output), name, [], f"{spec} (fine-tuned {meta.get('base_model')})"
    base = meta.get("base_model")
    if not base:
        raise ModelLoadError(f"{output / 'tuneforge.json'}: no base_model recorded")
    return base, base, [(name, output)], f"{spec} ({meta.get('method')} adapter on {base})"


def _read_meta(output: Path) -> dict:
    try:
        return json.loads((output / "tuneforge.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{output / 'tuneforge.json'}: unreadable ({err})") from err


def _check_ids(base_id: str, names: list[str]) -> None:
    problems = [f"model id {n!r}: use letters, digits and _.:/@- (at most 128)"
                for n in [base_id, *names] if not _ID.match(n)]
    seen = {base_id}
    for n in names:
        if n in seen:
            problems.append(f"model id {n!r} is used twice (the base model is {base_id!r}); "
                            "give each adapter its own name")
        seen.add(n)
    if problems:
        raise ConfigError("\n".join(problems))


def _adapter_folder(path: Path, name: str, base_spec: str) -> Path:
    """The PEFT folder of adapter ``name`` (a run folder, its adapter/, or a PEFT folder),
    refused if the run says it was trained on another base model."""
    if not path.is_dir():
        raise ModelLoadError(f"adapter {name}: {path} is not a folder")
    output = find_run_output(path)
    if output is not None:
        meta = _read_meta(output)
        if output.name == "model" or meta.get("method") in ("full", "freeze"):
            raise ModelLoadError(f"adapter {name}: {path} holds a whole model, not an adapter; "
                                 "serve it on its own")
        trained_on = meta.get("base_model")
        if trained_on and trained_on != base_spec:
            raise ModelLoadError(f"adapter {name}: {path} was trained on {trained_on}, but the "
                                 f"server's base model is {base_spec}")
        path = output
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {name}: {path} has no adapter_config.json (expected a "
                             "run folder or a PEFT adapter folder)")
    return path


def _attach(model, folder: Path, name: str, *, first: bool):
    from peft import PeftModel

    try:
        if first:
            return PeftModel.from_pretrained(model, folder, adapter_name=name)
        model.load_adapter(folder, adapter_name=name)
        return model
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"adapter {name}: could not load {folder}: {err}") from err
