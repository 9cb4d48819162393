"""The search-space file of `tuneforge sweep`: what to vary, what to optimise, how to search.

    objective: val_accuracy          # any val_* metric the runs log at validation
    direction: maximize              # default: minimize for loss-like names, else maximize
    sampler: tpe                     # grid | random | tpe | gp
    pruner: median                   # none | median | halving, or {type: median, startup_trials: 2}
    trials: 8                        # trial budget (grid: default the whole grid)
    timeout: 3600                    # seconds of wall-clock for one `tuneforge sweep` call
    params:                          # dotted config keys, as in --set
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      train.epochs: {low: 1, high: 3}            # two ints: an integer range
      adapter.r: [4, 8, 16]                       # a list: categorical choices
      adapter.dropout: {low: 0.0, high: 0.2, step: 0.05}

Every problem is reported at once with its line, and each parameter is checked against the run
config's schema (key and every choice or bound) before any trial runs.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config import load_config, lower_is_better
from tuneforge.errors import ConfigError

SAMPLERS = ("grid", "random", "tpe", "gp")
PRUNERS = {"none": {}, "median": {"startup_trials": 2, "warmup_steps": 0},
           "halving": {"min_resource": "auto", "reduction_factor": 3}}
TOP_KEYS = ("objective", "direction", "sampler", "pruner", "trials", "timeout", "seed", "params")
RANGE_KEYS = ("low", "high", "log", "step", "type")
SCALARS = (str, int, float, bool, type(None))


@dataclass
class Param:
    """One searched config key: a float or int range, or categorical choices."""

    key: str
    kind: str
    """float, int or categorical."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    line: int | None = None

    @property
    def labels(self) -> list:
        """Optuna's categorical choices: the values, or JSON text for lists and mappings."""
        if all(isinstance(c, SCALARS) for c in self.choices):
            return list(self.choices)
        return [json.dumps(c, sort_keys=True) for c in self.choices]

    def suggest(self, trial) -> Any:
        """Draw this parameter's config value in an Optuna trial."""
        if self.kind == "categorical":
            label = trial.suggest_categorical(self.key, self.labels)
            return self.choices[self.labels.index(label)]
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any] | None:
        """Every value of the grid along this key (Optuna labels), or None if it is continuous."""
        if self.kind == "categorical":
            return self.labels
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def probes(self) -> list[Any]:
        """Values that together exercise the schema check: every choice, or both bounds."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass
class SweepSpace:
    """A parsed search-space file."""

    params: list[Param]
    objective: str = "val_loss"
    direction: str = "minimize"
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    trials: int | None = None
    timeout: float | None = None
    seed: int = 0
    source: str = ""

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid, as Optuna parameter dicts, in a fixed order."""
        points: list[dict[str, Any]] = [{}]
        for p in self.params:
            points = [{**pt, p.key: v} for pt in points for v in p.grid() or []]
        return points

    def describe(self) -> dict[str, Any]:
        """What defines the study (stored with it, so a resumed sweep can check it matches)."""
        return {"objective": self.objective, "direction": self.direction,
                "params": {p.key: {"kind": p.kind, "low": p.low, "high": p.high, "log": p.log,
                                   "step": p.step, "choices": p.labels} for p in self.params}}


def load_space(path: str | Path, **settings: Any) -> SweepSpace:
    """Read and check a search-space file; ``settings`` (from the command line) replace its keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (objective, sampler, params, ...)")
    settings = {k: v for k, v in settings.items() if v is not None}
    if "objective" in settings and "direction" not in settings:
        raw.pop("direction", None)  # the file's direction was for its own objective
    raw.update(settings)
    errors: list[str] = []

    def where(*keys: str) -> str:
        line = lines.get(tuple(keys))
        return f"{path}:{line}: {'.'.join(keys)}" if line else f"{path}: {'.'.join(keys)}"

    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(TOP_KEYS)}"
            errors.append(f"{where(str(key))}: unknown key{hint}")
    space = SweepSpace(params=[], source=str(path))
    space.objective = str(raw.get("objective", "val_loss"))
    if not space.objective.startswith("val_"):
        errors.append(f"{where('objective')}: must name a validation metric such as val_loss, "
                      f"val_accuracy or val_macro_f1 (got {space.objective!r})")
    default_direction = "minimize" if lower_is_better(space.objective) else "maximize"
    space.direction = str(raw.get("direction", default_direction))
    if space.direction not in ("minimize", "maximize"):
        errors.append(f"{where('direction')}: minimize or maximize (got {space.direction!r})")
    space.sampler = str(raw.get("sampler", "tpe"))
    if space.sampler not in SAMPLERS:
        errors.append(f"{where('sampler')}: one of {', '.join(SAMPLERS)} (got {space.sampler!r})")
    errors += _read_pruner(raw.get("pruner", "median"), space, where("pruner"))
    for key, minimum in (("trials", 1), ("timeout", 1), ("seed", 0)):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < minimum or (key != "timeout" and value != int(value))):
            errors.append(f"{where(key)}: expected {'a number' if key == 'timeout' else 'an integer'}"
                          f" >= {minimum} (got {value!r})")
        elif value is not None:
            setattr(space, key, int(value) if key != "timeout" else float(value))
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        errors.append(f"{where('params')}: required: a mapping of config keys to ranges or choices")
        params = {}
    for key, spec in params.items():
        param, problems = _read_param(str(key), spec)
        errors += [f"{where('params', str(key))}: {p}" for p in problems]
        if param is not None:
            param.line = lines.get(("params", str(key)))
            space.params.append(param)
    if space.sampler == "grid":
        errors += [f"{where('params', p.key)}: the grid sampler needs a list of values or a step"
                   for p in space.params if p.grid() is None]
    if errors:
        raise ConfigError(f"{len(errors)} problem(s) in search space {path}:\n"
                          + "\n".join(f"  - {e}" for e in errors))
    return space


def check_space_against_config(space: SweepSpace, config: str | Path | None,
                               overrides: list[str] = ()) -> None:
    """Refuse keys the run config does not have and values its schema rejects, before any trial."""
    base = load_config(config, list(overrides))  # the base config itself must be valid
    errors = []
    for p in space.params:
        for value in p.probes():
            try:
                load_config(config, [*overrides, f"{p.key}={json.dumps(value)}"])
            except ConfigError as err:
                lines = [ln.strip(" -") for ln in str(err).splitlines()[1:]] or [str(err)]
                where = f"{space.source}:{p.line}" if p.line else space.source
                errors += [f"{where}: params.{p.key} = {value!r}: {ln}" for ln in lines]
                break
    d = base.data
    if not (d.validation or d.validation_fraction or any(t.validation for t in d.tasks)):
        errors.append("the sweep objective is a validation metric, but the config has no "
                      "validation data: set data.validation or data.validation_fraction")
    if errors:
        raise ConfigError(f"{len(errors)} problem(s) in search space {space.source}:\n"
                          + "\n".join(f"  - {e}" for e in errors))


def _read_param(key: str, spec: Any) -> tuple[Param | None, list[str]]:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        return None, [f"expected a list of choices or a mapping with low/high (got {spec!r})"]
    if "choices" in spec or "values" in spec:
        choices = spec.get("choices", spec.get("values"))
        extra = sorted(set(spec) - {"choices", "values", "type"})
        if not isinstance(choices, list) or not choices:
            return None, ["choices: expected a non-empty list"]
        if extra:
            return None, [f"{', '.join(extra)}: not used with choices"]
        if len({json.dumps(c, sort_keys=True) for c in choices}) < len(choices):
            return None, ["choices: a value is listed twice"]
        return Param(key, "categorical", choices=choices), []
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        return None, [f"unknown field(s) {', '.join(unknown)}; a range has low, high, log, step"]
    spec = {k: _number(v) if k in ("low", "high", "step") else v for k, v in spec.items()}
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if low is None or high is None:
        return None, ["needs low and high (or a list of choices)"]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        return None, [f"low, high and step must be numbers (got {spec!r})"]
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in numbers) else "float")
    log = spec.get("log", False)
    problems = []
    if kind not in ("int", "float"):
        problems.append(f"type: int or float for a range (got {kind!r})")
    if not isinstance(log, bool):
        problems.append(f"log: true or false (got {log!r})")
    if low >= high:
        problems.append(f"low must be below high (got {low} and {high})")
    if log and low <= 0:
        problems.append(f"log: needs low > 0 (got {low})")
    if log and step is not None and kind == "float":
        problems.append("log and step: give one, not both")
    if step is not None and step <= 0:
        problems.append(f"step: must be > 0 (got {step})")
    if problems:
        return None, problems
    return Param(key, kind, low=low, high=high, log=log, step=step), []


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as text: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_pruner(value: Any, space: SweepSpace, where: str) -> list[str]:
    if isinstance(value, str) or value is None:
        value = {"type": value or "none"}
    if not isinstance(value, dict):
        return [f"{where}: a name ({', '.join(PRUNERS)}) or a mapping with type"]
    kind = value.get("type", "median")
    if kind not in PRUNERS:
        return [f"{where}.type: one of {', '.join(PRUNERS)} (got {kind!r})"]
    options = {k: v for k, v in value.items() if k != "type"}
    unknown = sorted(set(options) - set(PRUNERS[kind]))
    if unknown:
        known = ", ".join(PRUNERS[kind]) or "none"
        return [f"{where}: {', '.join(unknown)}: not an option of the {kind} pruner (its options: {known})"]
    space.pruner, space.pruner_options = kind, {**PRUNERS[kind], **options}
    return []


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers of the top-level keys and of each key under params."""
    node = yaml.compose(text)
    lines: dict[tuple[str, ...], int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        lines[(str(key.value),)] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub, _ in value.value:
                lines[(str(key.value), str(sub.value))] = sub.start_mark.line + 1
    return lines
