"""`tuneforge curve`: the power-law fit on known curves, and nested subsets on a tiny llama."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from eval_helpers import write_splits

from tuneforge.cli import main
from tuneforge.experiments.curve import PowerLaw, assess, fit_power_law, run_curve

SIZES = [40, 80, 160, 320, 640, 1280]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("a, b, c, increasing", [(0.92, 0.8, 0.45, True), (1.2, 3.0, 0.3, False),
                                                 (0.6, 5.0, 1.1, True)])
def test_power_law_fit_recovers_known_parameters(a, b, c, increasing):
    sign = -1 if increasing else 1
    n = np.array(SIZES, dtype=float)
    exact = a + sign * b * n ** -c
    law = fit_power_law(SIZES, exact.tolist(), increasing=increasing)
    assert (law.a, law.b, law.c) == pytest.approx((a, b, c), rel=1e-3)
    assert law.rmse < 1e-6
    # with a little seeded noise the fit still lands close
    noisy = exact + np.random.default_rng(0).normal(0, 0.002, len(n))
    law = fit_power_law(SIZES, noisy.tolist(), increasing=increasing)
    assert law.a == pytest.approx(a, abs=0.03) and law.c == pytest.approx(c, rel=0.25)


def test_examples_for_a_target_inverts_the_curve_and_a_plateau_is_said_so():
    law = PowerLaw(a=0.9, b=0.8, c=0.5, sign=-1, rmse=0.0)
    needed = law.examples_for(0.85)
    assert needed == pytest.approx((0.8 / 0.05) ** 2) and law(needed) == pytest.approx(0.85)
    assert law.examples_for(0.95) is None  # beyond the plateau
    out = assess(law, 256, 0.95, tolerance=0.005)
    assert out["examples_for_target"] is None and "short of the target" in out["verdict"]
    assert "examples are needed to reach 0.85" in assess(law, 100, 0.85, 0.005)["verdict"]
    flat = assess(PowerLaw(a=0.9, b=0.8, c=2.0, sign=-1, rmse=0.0), 1000, None, tolerance=0.005)
    assert flat["flattened"] and "has flattened" in flat["verdict"]
    loss = PowerLaw(a=1.0, b=2.0, c=0.5, sign=1, rmse=0.0)  # a falling metric
    assert loss(loss.examples_for(1.1)) == pytest.approx(1.1) and loss.examples_for(0.9) is None


def test_a_flat_or_backwards_series_fits_a_flat_line_not_a_wrong_way_curve():
    law = fit_power_law([10, 20, 40, 80], [0.5, 0.4, 0.45, 0.3], increasing=True)
    assert law.b == 0 and law.a == pytest.approx(0.4125)


def curve_config(tmp: Path, **data) -> Path:
    files = write_splits(tmp / "data", sizes=(16, 6, 3))
    config = {"output_dir": str(tmp / "unused"), "model": {"name": "tiny:llama"},
              "adapter": {"method": "lora", "r": 2, "alpha": 4},
              "data": {"train": str(files["train"]), "validation": str(files["validation"]),
                       "template": {"user": "Ticket: {text}", "assistant": "Team: {label}"}, **data},
              "train": {"batch_size": 4, "epochs": 1, "lr": 1e-2, "bf16": "false", "eval_every": 0,
                        "save_every": 0, "warmup_steps": 0, "progress": False}}
    path = tmp / "curve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_learning_curve_trains_nested_subsets_on_one_held_out_set(tmp_path):
    out = tmp_path / "curve"
    result = run_curve(curve_config(tmp_path), [0.25, 0.5, 0.75, 1.0], repeats=2,
                       metric="val_loss", target=1.0, output_dir=out)
    points = result["points"]
    assert [(p["examples"], p["repeat"]) for p in points] == [
        (n, r) for r in (0, 1) for n in (4, 8, 12, 16)]
    for repeat in (0, 1):  # each smaller subset is the start of the larger one
        subsets = [lines(out / "data" / f"repeat-{repeat}" / f"train-{n}.jsonl") for n in (4, 8, 12, 16)]
        for small, large in zip(subsets, subsets[1:]):
            assert large[: len(small)] == small
    assert subsets[-1] != lines(out / "data" / "repeat-0" / "train-16.jsonl")  # a new draw
    held_out = {yaml.safe_load((Path(p["run_dir"]) / "config.yaml").read_text())["data"]["validation"]
                for p in points}
    assert held_out == {str(tmp_path / "data" / "val.jsonl")}
    for p in points:  # every point is an ordinary run folder, judged by the curve's metric
        summary = json.loads((Path(p["run_dir"]) / "summary.json").read_text())
        assert summary["train_examples"] == p["examples"] and summary["best_metric"] == p["value"]
    assert set(result["fit"]) >= {"a", "b", "c", "rmse", "formula"} and result["verdict"]
    assert (out / "curve.png").stat().st_size > 1000
    assert json.loads((out / "curve.json").read_text())["points"] == points
    # a second call keeps the finished runs instead of training them again
    written = [(Path(p["run_dir"]) / "summary.json").stat().st_mtime_ns for p in points]
    again = run_curve(curve_config(tmp_path), [0.25, 0.5, 0.75, 1.0], repeats=2,
                      metric="val_loss", output_dir=out)
    assert [(Path(p["run_dir"]) / "summary.json").stat().st_mtime_ns for p in points] == written
    assert again["points"] == points


def test_curve_holds_out_a_validation_fraction_once_for_every_point(tmp_path):
    config = curve_config(tmp_path, validation=None, validation_fraction=0.25)
    result = run_curve(config, [0.34, 0.67, 1.0], metric="val_loss", output_dir=tmp_path / "c")
    held_out = lines(Path(result["held_out"]))
    assert len(held_out) == 4 and result["train_pool"] == 12
    pool = set(lines(tmp_path / "c" / "data" / "repeat-0" / "train-12.jsonl"))
    assert not pool & set(held_out)


def test_curve_argument_errors_exit_2_without_a_traceback(tmp_path, capsys):
    config = str(curve_config(tmp_path))
    for argv, message in [
        (["--fractions", "0.5,abc"], "--fractions: comma-separated numbers"),
        (["--fractions", "0.5,1"], "at least 3 distinct values"),
        (["--fractions", "0.2,0.5,1.5"], "in (0, 1]"),
        (["--repeats", "0"], "--repeats: must be >= 1"),
        (["--metric", "accuracy"], "--metric: a validation metric"),
        (["--set", "data.validation=null"], "needs a held-out set"),
    ]:
        assert main(["curve", config, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
