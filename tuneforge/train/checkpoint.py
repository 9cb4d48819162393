"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder ``checkpoints/step-000120/`` holds, all in safetensors or JSON:

- ``trainable.safetensors``: the trainable weights only (the adapter, or the unfrozen layers);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments and param groups;
- ``rng-rank{R}.safetensors``: each process's torch RNG state (dropout draws continue as if
  never interrupted);
- ``state.json``: step, scheduler position, early-stopping bookkeeping, python/numpy RNG.

It is written into a hidden temporary folder and renamed into place, so a crash (even SIGKILL)
leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEP_PREFIX = "step-"


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> full tensor of every trainable parameter (tied weights once).

    Goes through torch.distributed.checkpoint's state-dict API, which gathers sharded (FSDP)
    parameters and is a plain ``state_dict`` for unsharded models.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    full = get_model_state_dict(model, options=_FULL)  # empty on ranks other than 0
    return {n: full[n].contiguous() for n in names if n in full}


def optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state as safetensors-compatible tensors keyed ``param_name/key``, plus JSON.

    Keyed by parameter name rather than position, so it survives re-sharding.
    """
    sd = get_optimizer_state_dict(model, _inner(optimizer), options=_FULL)
    tensors, scalars = {}, {}
    if not sd:  # with cpu_offload, only rank 0 receives the gathered state
        return tensors, {}
    for name, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{key}"] = value.item() if torch.is_tensor(value) else value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    for flat, value in meta["scalars"].items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = torch.tensor(value, dtype=torch.float32)
    set_optimizer_state_dict(model, _inner(optimizer),
                             {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename onto it: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rank: int = 0,
    barrier=lambda: None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; returns its folder.

    Every rank writes its RNG file into the temporary folder; rank 0 writes the rest and
    renames the folder once all ranks are done.
    """
    final = root / f"{STEP_PREFIX}{step:06d}"
    tmp = root / f".tmp-{STEP_PREFIX}{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file({"torch": torch.random.get_rng_state()}, tmp / f"rng-rank{rank}.safetensors")
    # gathering sharded state is collective: every rank takes part, rank 0 writes
    weights = trainable_state(model)
    tensors, meta = optimizer_tensors(model, optimizer)
    if rank == 0:
        save_file(weights, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        py_state = random.getstate()
        np_state = np.random.get_state()
        full_state = {
            **state,
            "step": step,
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    barrier()
    return final


def load_checkpoint(
    folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, rank: int = 0
) -> dict:
    """Restore weights, optimizer and RNG from ``folder``; returns its ``state.json``."""
    load_trainable(folder, model)
    if optimizer is not None:
        meta = json.loads((folder / "optimizer.json").read_text())
        load_optimizer(model, optimizer, load_file(folder / "optimizer.safetensors"), meta)
    state = json.loads((folder / "state.json").read_text())
    rng_file = folder / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        torch.random.set_rng_state(load_file(rng_file)["torch"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state


def load_trainable(folder: Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trainable weights into ``model`` (sharding-aware, strict on names)."""
    weights = load_file(folder / "trainable.safetensors")
    params = {n for n, _ in model.named_parameters()}
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"{folder}: checkpoint has weights the model lacks: {missing[:3]}")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(root: Path) -> Path | None:
    found = [p for p in list_checkpoints(root) if (p / "state.json").is_file()]
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those named in ``keep``."""
    found = list_checkpoints(root)
    for old in found[: max(0, len(found) - keep_last)]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
