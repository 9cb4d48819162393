"""Programmatic reward functions for PPO and GRPO, and loading a user's own by name.

Every reward function has one signature::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

``columns`` are the prompt file's other keys, one list per key aligned with ``prompts`` (an
``answer`` column of arithmetic problems, say), as TRL passes them. A function uses the
columns it needs, ignores the rest, and returns one finite number per completion.

Built in (:data:`REWARD_FUNCTIONS`): ``answer_format``, ``arithmetic``, ``length``, ``json`` and
``support_reply``. A config names one of those, or its own function as ``"module:function"``
(importable) or ``"path/to/file.py:function"``; :func:`load_reward_fn` resolves either, and
:func:`call_reward` calls one and checks what it returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError

RewardFn = Callable[..., list[float]]

# A number as people write it in an answer: -12, 3.5, $1,299.00
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_LINE = re.compile(rf"Answer:\s*({_NUMBER})\s*\.?", re.IGNORECASE)
LENGTH_BAND = (8, 40)  # words; the default band of the length reward
SUPPORT_DEPARTMENTS = (
    "Billing",
    "Technical Support",
    "Shipping",
    "Returns",
    "Account Security",
    "Sales",
)
_SUPPORT_REPLY = re.compile(
    r"Department:[ \t]*(?P<dept>[^\n]+?)[ \t]*\nReply:[ \t]*(?P<reply>\S.*)", re.S
)


def to_number(text: str) -> float | None:
    """``"$1,299.50"`` -> 1299.5; None when it is not a number."""
    try:
        return float(str(text).replace("$", "").replace(",", "").strip())
    except ValueError:
        return None


def _column(columns: dict[str, list], name: str, reward: str, example: str) -> list:
    if name not in columns:
        raise ConfigError(
            f"reward {reward!r} needs a column {name!r} in the prompt data, e.g. {example}"
        )
    return columns[name]


# --------------------------------------------------------------------------------- rewards


def answer_format(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion ends with a line ``Answer: <number>``; 0.5 when that line is
    there but not last (half credit gives a policy that is close something to climb); else 0."""
    scores = []
    for completion in completions:
        lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
        if lines and _ANSWER_LINE.fullmatch(lines[-1]):
            scores.append(1.0)
        elif any(_ANSWER_LINE.fullmatch(line) for line in lines):
            scores.append(0.5)
        else:
            scores.append(0.0)
    return scores


def final_number(completion: str) -> float | None:
    """The number after the last ``Answer:``, or else the last number in the text."""
    found = _ANSWER_LINE.findall(completion) or re.findall(_NUMBER, completion)
    return to_number(found[-1]) if found else None


def arithmetic(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion's answer (:func:`final_number`) equals the record's ``answer``
    column (to 1e-6, relative), else 0.0."""
    answers = _column(columns, "answer", "arithmetic", '{"prompt": "2 + 3 = ?", "answer": 5}')
    scores = []
    for completion, answer in zip(completions, answers, strict=True):
        expected, given = to_number(answer), final_number(completion)
        if expected is None:
            raise ConfigError(
                f"reward 'arithmetic': the answer column holds {answer!r}, not a number"
            )
        close = given is not None and abs(given - expected) <= 1e-6 * max(1.0, abs(expected))
        scores.append(1.0 if close else 0.0)
    return scores


def length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1.0 for a word count inside the band, falling linearly to 0 at no words and at twice
    the upper bound. The band is ``min_words``/``max_words`` columns when the data has them,
    else :data:`LENGTH_BAND`."""
    n = len(completions)
    lows = columns.get("min_words", [LENGTH_BAND[0]] * n)
    highs = columns.get("max_words", [LENGTH_BAND[1]] * n)
    scores = []
    for completion, low, high in zip(completions, lows, highs, strict=True):
        words, low, high = len(completion.split()), int(low), int(high)
        if words < low:
            scores.append(words / low)
        elif words > high:
            scores.append(max(0.0, 1.0 - (words - high) / high))
        else:
            scores.append(1.0)
    return scores


def json_object(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1.0 for a completion that is one JSON object (a ```json fence around it is fine) with
    every key of the record's ``json_keys`` column (a list, or comma-separated text) when
    given; 0.5 for a JSON object missing some of them; 0.0 for anything else."""
    wanted = columns.get("json_keys", [[]] * len(completions))
    scores = []
    for completion, keys in zip(completions, wanted, strict=True):
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", completion.strip())
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            scores.append(0.0)
            continue
        if isinstance(keys, str):
            keys = [k.strip() for k in keys.split(",") if k.strip()]
        if not isinstance(value, dict):
            scores.append(0.0)
        else:
            scores.append(1.0 if all(k in value for k in keys) else 0.5)
    return scores


def support_reply(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """The Northwind Home support format: ``Department: <one of the six>`` then ``Reply:
    <text>``. 0.5 for the format, 0.5 more for the record's ``department`` column when the data
    has one (the format alone scores 1.0 without it)."""
    departments = columns.get("department")
    scores = []
    for i, completion in enumerate(completions):
        match = _SUPPORT_REPLY.match(completion.strip())
        if not match or match["dept"] not in SUPPORT_DEPARTMENTS:
            scores.append(0.0)
        elif departments is None:
            scores.append(1.0)
        else:
            scores.append(1.0 if match["dept"] == departments[i] else 0.5)
    return scores


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "answer_format": answer_format,
    "arithmetic": arithmetic,
    "length": length,
    "json": json_object,
    "support_reply": support_reply,
}


# ------------------------------------------------------------------------ loading, calling


def load_reward_fn(ref: str) -> RewardFn:
    """A built-in reward by name, or ``"module:function"`` / ``"path/to/file.py:function"``."""
    if ref in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[ref]
    if ":" not in ref:
        known = ", ".join(REWARD_FUNCTIONS)
        raise ConfigError(
            f"reward {ref!r} unknown; use one of {known}, or your own as "
            "'module:function' or 'path/to/file.py:function'"
        )
    where, name = ref.rsplit(":", 1)
    module = _load_module(where, ref)
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v))
        raise ConfigError(
            f"reward {ref!r}: {where} has no {name!r} (functions: {', '.join(found) or 'none'})"
        )
    if not callable(fn):
        raise ConfigError(f"reward {ref!r}: {name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind_partial([], [])
    except TypeError as err:
        raise ConfigError(
            f"reward {ref!r} must take (prompts, completions, **columns): {err}"
        ) from err
    except ValueError:
        pass  # builtins without a signature: trust them
    return fn


def _load_module(where: str, ref: str) -> Any:
    try:
        if where.endswith(".py") or "/" in where:
            return _module_from_file(Path(where).expanduser(), ref)
        return importlib.import_module(where)
    except ConfigError:
        raise
    except ModuleNotFoundError as err:
        raise ConfigError(f"reward {ref!r}: cannot import {where}: {err}") from err
    except Exception as err:  # the user's module failed while loading: say where
        message = f"reward {ref!r}: loading {where} failed: {type(err).__name__}: {err}"
        raise ConfigError(message) from err


def _module_from_file(path: Path, ref: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"reward {ref!r}: no such file {path}")
    spec = importlib.util.spec_from_file_location(f"tuneforge_reward_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"reward {ref!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_reward(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
) -> list[float]:
    """``fn``'s rewards, checked: one finite number per completion."""
    name = getattr(fn, "__name__", repr(fn))
    values = fn(prompts, completions, **(columns or {}))
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = (
            f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        )
        raise ConfigError(
            f"reward function {name} returned {got} for {len(completions)} completions"
        )
    for i, value in enumerate(values):
        # numbers.Real takes numpy scalars too; bool is a Real, but not a reward.
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(
                f"reward function {name} returned {value!r} for completion {i}; rewards are finite numbers"
            )
    return [float(v) for v in values]
