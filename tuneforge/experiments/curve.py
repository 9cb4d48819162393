"""`tuneforge curve`: how the metric grows with training data, and how much data a target needs.

For each repeat, the training examples are shuffled once (seed + repeat) and each fraction
takes a prefix of that order, so the subsets are nested (the 25% subset holds the 10% one).
Every subset trains with the same config into its own run folder and is judged on the same
held-out set (data.validation, or the data.validation_fraction split made once for all).
A power law is fitted to all points:

    increasing metrics (accuracy, F1):  y(n) = a - b * n^(-c)
    decreasing metrics (loss):          y(n) = a + b * n^(-c)

``a`` is where the curve levels off; the fit gives the examples needed for a target, or says
that the target lies beyond the plateau, or that the curve has already flattened.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config import load_config, lower_is_better
from tuneforge.errors import ConfigError, DataError


@dataclass
class PowerLaw:
    """``y(n) = a + sign * b * n^(-c)`` with ``b, c >= 0``; sign -1 for rising metrics."""

    a: float
    b: float
    c: float
    sign: int
    rmse: float

    def __call__(self, n: Any) -> Any:
        return self.a + self.sign * self.b * np.power(np.asarray(n, dtype=float), -self.c)

    def examples_for(self, target: float) -> float | None:
        """Examples at which the curve reaches ``target``; None if it levels off short of it."""
        gap = (self.a - target) * -self.sign  # > 0 while the plateau lies beyond the target
        if self.b <= 0 or self.c <= 0 or gap <= 0:
            return None
        return float((self.b / gap) ** (1 / self.c))


def fit_power_law(examples: list[float], values: list[float], *, increasing: bool) -> PowerLaw:
    """Least-squares fit of a saturating power law to (examples, value) points.

    For a fixed exponent ``c`` the model is linear in ``a`` and ``b``, solved exactly; ``c`` is
    searched on a log grid and refined by golden-section search (no SciPy needed).
    """
    n = np.asarray(examples, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(set(n.tolist())) < 3:
        raise ConfigError("a power-law fit needs at least 3 distinct training-set sizes")
    sign = -1 if increasing else 1

    def solve(c: float) -> tuple[float, float, float]:
        x = sign * np.power(n, -c)
        design = np.stack([np.ones_like(x), x], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        if b < 0:  # the data run the wrong way: the best monotone fit is flat
            a, b = float(y.mean()), 0.0
        sse = float(np.sum((a + b * x - y) ** 2))
        return sse, float(a), float(b)

    grid = np.logspace(-3, math.log10(5), 200)
    best = int(np.argmin([solve(c)[0] for c in grid]))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if solve(m1)[0] <= solve(m2)[0]:
            hi = m2
        else:
            lo = m1
    c = (lo + hi) / 2
    sse, a, b = solve(c)
    return PowerLaw(a=a, b=b, c=float(c) if b > 0 else 0.0, sign=sign,
                    rmse=math.sqrt(sse / len(y)))


def assess(law: PowerLaw, largest: int, target: float | None, tolerance: float) -> dict:
    """What the fit says: the plateau, the gain from doubling the data, the target's cost."""
    gain = float(abs(law(2 * largest) - law(largest)))
    out: dict[str, Any] = {"plateau": law.a, "gain_from_doubling": gain,
                           "flattened": gain < tolerance}
    if target is not None:
        needed = law.examples_for(target)
        out["target"] = target
        out["examples_for_target"] = needed
        if needed is None:
            out["verdict"] = (f"the curve levels off at about {law.a:.4g}, short of the target "
                              f"{target:g}: more data of this kind is unlikely to reach it")
        elif needed <= largest:
            out["verdict"] = f"the target {target:g} is reached at about {needed:,.0f} examples"
        else:
            out["verdict"] = (f"about {needed:,.0f} examples are needed to reach {target:g} "
                              f"({needed / largest:.1f}x the {largest:,} used)")
    elif gain < tolerance:
        out["verdict"] = (f"the curve has flattened: doubling the {largest:,} examples would "
                          f"change the metric by {gain:.4g} (< {tolerance:g})")
    else:
        out["verdict"] = (f"still rising: doubling the {largest:,} examples would change the "
                          f"metric by about {gain:.4g}; plateau near {law.a:.4g}")
    return out


def run_curve(config: str | Path | None, fractions: list[float], *, repeats: int = 1,
              overrides: list[str] = (), metric: str | None = None,
              target: float | None = None, output_dir: str | Path | None = None,
              tolerance: float = 0.005) -> dict:
    """Train on nested subsets, fit the curve, write curve.json/.csv/.png; returns curve.json."""
    from tuneforge.recipes import run_recipe

    base = load_config(config, list(overrides))
    fractions = _check_arguments(base, fractions, repeats, metric)
    metric = metric or base.train.metric_for_best
    name = Path(config).stem if config else "curve"
    curve_dir = Path(output_dir or f"runs/curve-{name}")
    pool, held_out = _split(base, curve_dir / "data")
    points = []
    for repeat in range(repeats):
        order = list(range(len(pool)))
        random.Random(base.train.seed + 1000 * repeat).shuffle(order)
        for fraction in fractions:
            n = max(1, round(fraction * len(pool)))
            run_dir = curve_dir / "runs" / f"n{n:06d}-r{repeat}"
            summary_file = run_dir / "summary.json"
            if summary_file.is_file():  # done by an earlier, interrupted call: keep it
                say(f"{n} examples, repeat {repeat}: kept from an earlier call ({run_dir})")
            else:
                subset = _write_jsonl(curve_dir / "data" / f"repeat-{repeat}" / f"train-{n}.jsonl",
                                      [pool[i] for i in order[:n]])
                say(f"{n} examples ({fraction:g} of {len(pool)}), repeat {repeat} -> {run_dir}")
                sets = [f"data.train={subset}", f"data.validation={held_out}",
                        "data.validation_fraction=0", f"output_dir={run_dir}",
                        f"train.metric_for_best={metric}"]
                run_recipe(load_config(config, [*overrides, *sets]), overwrite=True)
            value = metric_at_best(run_dir, metric)
            points.append({"fraction": fraction, "examples": n, "repeat": repeat,
                           "value": value, "run_dir": str(run_dir)})
    increasing = not lower_is_better(metric)
    law = fit_power_law([p["examples"] for p in points], [p["value"] for p in points],
                        increasing=increasing)
    largest = max(p["examples"] for p in points)
    result = {"metric": metric, "held_out": str(held_out), "held_out_examples": _count(held_out),
              "train_pool": len(pool), "repeats": repeats, "points": points,
              "fit": asdict(law) | {"formula": f"y = a {'-' if increasing else '+'} b * n^-c"},
              **assess(law, largest, target, tolerance)}
    _write_csv(curve_dir / "curve.csv", points)
    plot_curve(points, law, result, curve_dir / "curve.png")
    result["plot"] = str(curve_dir / "curve.png")
    (curve_dir / "curve.json").write_text(json.dumps(result, indent=2))
    return result


def metric_at_best(run_dir: Path, metric: str) -> float:
    """The metric at the run's best step (the checkpoint the run keeps; the curve's runs pick
    it by this metric)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("metric_for_best") == metric and summary.get("best_metric") is not None:
        return float(summary["best_metric"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in records if metric in r]
    if not evals:
        raise ConfigError(f"{run_dir}: the run logged no {metric} (it logs "
                          f"{', '.join(sorted({k for r in records for k in r if k.startswith('val_')}))})")
    at_best = [r for r in evals if r["step"] == summary.get("best_step")]
    return float((at_best or evals)[-1][metric])


def _check_arguments(base, fractions: list[float], repeats: int, metric: str | None) -> list[float]:
    problems = []
    if base.data.tasks:
        problems.append("data.tasks: a learning curve takes one training file (data.train)")
    if not (base.data.validation or base.data.validation_fraction):
        problems.append("the curve needs a held-out set: set data.validation or "
                        "data.validation_fraction")
    if len(set(fractions)) < 3 or any(not 0 < f <= 1 for f in fractions):
        problems.append(f"--fractions: at least 3 distinct values in (0, 1] (got {fractions})")
    if repeats < 1:
        problems.append(f"--repeats: must be >= 1 (got {repeats})")
    if metric is not None and not metric.startswith("val_"):
        problems.append(f"--metric: a validation metric such as val_loss or val_accuracy (got {metric!r})")
    if problems:
        raise ConfigError("\n".join(problems))
    return sorted(set(fractions))


def _split(config, folder: Path) -> tuple[list[dict], Path]:
    """(training records to draw from, the held-out file every point is judged on)."""
    from tuneforge.data.formats import read_records

    records = read_records(config.data.train)
    bad = [(line, r) for line, r in records if isinstance(r, Exception)]
    if bad:
        raise DataError(f"{config.data.train}:{bad[0][0]}: {bad[0][1]} (run `tuneforge data "
                        f"check {config.data.train}` for the full report)")
    pool = [r for _, r in records]
    if config.data.validation:
        return pool, Path(config.data.validation)
    shuffled = pool[:]
    random.Random(config.train.seed).shuffle(shuffled)  # as the recipes split it
    n_val = max(1, round(len(shuffled) * config.data.validation_fraction))
    return shuffled[n_val:], _write_jsonl(folder / "validation.jsonl", shuffled[:n_val])


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _count(path: Path) -> int:
    from tuneforge.data.formats import read_records

    return len(read_records(path))


def _write_csv(path: Path, points: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)


def plot_curve(points: list[dict], law: PowerLaw, result: dict, path: Path) -> None:
    """Metric vs examples (log scale): each repeat, the mean with its min-max band, the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p["examples"] for p in points})
    by_size = {n: [p["value"] for p in points if p["examples"] == n] for n in sizes}
    mean = [float(np.mean(by_size[n])) for n in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([p["examples"] for p in points], [p["value"] for p in points], s=14,
               color="#9ab", label="runs", zorder=3)
    if len(points) > len(sizes):
        ax.fill_between(sizes, [min(by_size[n]) for n in sizes], [max(by_size[n]) for n in sizes],
                        color="#1f4e79", alpha=0.15, label="min-max over repeats")
    ax.plot(sizes, mean, "o-", color="#1f4e79", label="mean")
    target = result.get("examples_for_target")
    right = max(sizes[-1] * 4, min(target or 0, sizes[-1] * 50))
    xs = np.geomspace(sizes[0], right, 200)
    ax.plot(xs, law(xs), "--", color="#c0392b",
            label=f"fit: a={law.a:.3g}, b={law.b:.3g}, c={law.c:.3g}")
    if result.get("target") is not None:
        ax.axhline(result["target"], color="#555", lw=0.8, ls=":", label=f"target {result['target']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"{result['metric']} on the held-out set")
    ax.set_title("Learning curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def say(message: str) -> None:
    print(f"tuneforge curve: {message}", file=sys.stderr, flush=True)
