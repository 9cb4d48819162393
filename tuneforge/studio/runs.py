"""What the studio knows about run folders, sweeps and learning curves: read from disk, never
written.

A run folder is whatever ``tuneforge train`` writes (config.yaml, metrics.jsonl, checkpoints/,
adapter/ or model/, summary.json last); a sweep folder holds sweep.json or results.csv and its
trials under trials/; a learning-curve folder holds curve.json or curve.csv and its runs under
runs/. The studio finds them under a few roots (``--runs-dir``, the jobs folder's runs) and
names each by ``ROOT/RELATIVE/PATH`` so that a name maps back to one folder and never outside
its root.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.train.checkpoint import list_checkpoints

RUNNING_WITHIN_S = 120.0
"""A run without summary.json whose metrics changed this recently is shown as running."""
MAX_DEPTH = 4  # how deep under a root runs are looked for (SWEEP/trials/trial-0001 is 3)
SHOWN_FILES = {".png", ".html", ".json", ".jsonl", ".csv", ".md", ".yaml", ".txt"}
"""The files of a folder the studio serves (no weights, no optimizer state)."""


@dataclass
class Roots:
    """The folders runs are found in, by the name that starts a run's id."""

    folders: dict[str, Path] = field(default_factory=dict)

    def resolve(self, ident: str) -> Path | None:
        """The folder named by ``ident`` (``ROOT/REL/PATH``), or None if it names nothing
        inside a root (``..`` and links out of the root included)."""
        path = self._inside(ident)
        return path if path is not None and path.is_dir() else None

    def _inside(self, ident: str) -> Path | None:
        """``ROOT/REL/PATH`` as a resolved path inside its root, or None."""
        root_name, _, rel = ident.partition("/")
        root = self.folders.get(root_name)
        if root is None or not rel:
            return None
        base = root.resolve()
        try:
            path = (base / rel).resolve()
            path.relative_to(base)
        except (ValueError, OSError):
            return None
        return path

    def file(self, ident: str) -> Path | None:
        """A servable file ``ROOT/REL/PATH/NAME`` inside a root, or None."""
        path = self._inside(ident)
        if path is None:
            return None
        if path.suffix.lower() not in SHOWN_FILES or not path.is_file():
            return None
        return path

    def ident(self, folder: Path) -> str | None:
        for name, root in self.folders.items():
            try:
                return f"{name}/{folder.resolve().relative_to(root.resolve()).as_posix()}"
            except ValueError:
                continue
        return None

    def walk(self) -> tuple[list[Path], list[Path], list[Path]]:
        """(run folders, sweep folders, curve folders) under every root, sorted by name."""
        runs, sweeps, curves = [], [], []
        for root in self.folders.values():
            if not root.is_dir():
                continue
            stack = [(root, 0)]
            while stack:
                folder, depth = stack.pop()
                kind = folder_kind(folder)
                if kind == "run":
                    runs.append(folder)
                    continue  # a run's own subfolders (checkpoints, eval) hold no runs
                if kind == "sweep":
                    sweeps.append(folder)
                elif kind == "curve":
                    curves.append(folder)
                if depth < MAX_DEPTH:
                    try:
                        children = [c for c in folder.iterdir()
                                    if c.is_dir() and not c.name.startswith(".")]
                    except OSError:
                        continue
                    stack.extend((c, depth + 1) for c in children)
        return sorted(runs), sorted(sweeps), sorted(curves)


def folder_kind(folder: Path) -> str | None:
    """"run", "sweep", "curve" or None for an ordinary folder."""
    if (folder / "metrics.jsonl").is_file() or (folder / "config.yaml").is_file() and (
            (folder / "checkpoints").is_dir() or (folder / "summary.json").is_file()):
        return "run"
    if (folder / "sweep.json").is_file() or (folder / "results.csv").is_file():
        return "sweep"
    if (folder / "curve.json").is_file() or (folder / "curve.csv").is_file():
        return "curve"
    return None


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines of metrics.jsonl from byte ``offset`` on, and the offset after
    the last complete line (a line still being written is left for the next read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(_finite(record))
    return records, offset + end


def _finite(record: dict) -> dict:
    """NaN and infinities (a diverged loss) as None: JSON for the browser has no NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def run_info(folder: Path, roots: Roots, *, with_records: bool = False) -> dict[str, Any]:
    """What the runs table and a run's page show: status, recipe, method, base model, best
    metric, duration, and with ``with_records`` the metrics themselves."""
    config = _read_yaml(folder / "config.yaml") or {}
    summary = read_json(folder / "summary.json")
    records, _ = read_metrics(folder / "metrics.jsonl")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    adapter = config.get("adapter") if isinstance(config.get("adapter"), dict) else {}
    info: dict[str, Any] = {
        "id": roots.ident(folder), "name": folder.name, "path": str(folder),
        "status": run_status(folder, summary),
        "recipe": (summary or {}).get("recipe") or config.get("recipe") or "sft",
        "method": (summary or {}).get("method") or adapter.get("method") or "",
        "base_model": (summary or {}).get("model") or model.get("name") or "",
        "steps": (summary or {}).get("steps") or max((r["step"] for r in records), default=0),
        "metric_name": None, "best_metric": None, "duration_s": None,
    }
    if summary:
        info["metric_name"] = summary.get("metric_for_best")
        info["best_metric"] = summary.get("best_metric")
        info["duration_s"] = summary.get("seconds")
    else:
        vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
        if vals:
            info["metric_name"], info["best_metric"] = "val_loss", min(vals)
        elapsed = [r["elapsed_s"] for r in records if isinstance(r.get("elapsed_s"), (int, float))]
        info["duration_s"] = elapsed[-1] if elapsed else None
    if with_records:
        info["records"] = records
        info["summary"] = summary
        info["config_text"] = _read_text(folder / "config.yaml")
        info["checkpoints"] = [{"name": c.name, "step": _step_of(c.name)}
                               for c in list_checkpoints(folder / "checkpoints")]
        info["output"] = next((n for n in ("adapter", "model") if (folder / n).is_dir()), None)
        info["eval"] = read_json(folder / "eval" / "eval.json")
        info["eval_report"] = (folder / "eval" / "report.html").is_file()
        info["error"] = _read_text(folder / "error.txt")
        info["plots"] = [p.name for p in sorted(folder.glob("*.png"))]
    return info


def run_status(folder: Path, summary: dict | None) -> str:
    """done, stopped early, failed, running (metrics changed lately) or stopped."""
    if summary is not None:
        return "stopped early" if summary.get("stopped_early") else "done"
    if (folder / "error.txt").is_file():
        return "failed"
    try:
        changed = (folder / "metrics.jsonl").stat().st_mtime
    except OSError:
        changed = 0.0
    return "running" if time.time() - changed < RUNNING_WITHIN_S else "stopped"


def sweep_info(folder: Path, roots: Roots) -> dict[str, Any]:
    """A sweep's summary (sweep.json), trials (results.csv) and which plots it drew."""
    summary = read_json(folder / "sweep.json") or {}
    rows = _read_csv(folder / "results.csv")
    for row in rows:
        run_dir = row.get("run_dir")
        row["run_id"] = roots.ident(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else None
    plots = [n for n in ("history", "importance", "slice", "intermediate")
             if (folder / f"{n}.png").is_file()]
    return {"id": roots.ident(folder), "name": folder.name, "summary": summary, "trials": rows,
            "plots": plots}


def curve_info(folder: Path, roots: Roots) -> dict[str, Any]:
    """A learning curve: its fit (curve.json), its points (curve.csv), its plot."""
    return {"id": roots.ident(folder), "name": folder.name,
            "result": read_json(folder / "curve.json") or {},
            "points": _read_csv(folder / "curve.csv"),
            "plot": (folder / "curve.png").is_file()}


def _read_yaml(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return []


def _step_of(name: str) -> int | None:
    digits = name.rpartition("-")[2]
    return int(digits) if digits.isdigit() else None
