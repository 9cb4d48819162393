"""``tuneforge monitor LOG``: what a deployment has been doing, from its JSONL request log.

Volume, error rate (4xx and 5xx apart), latency and time-to-first-token percentiles, token
totals, by model, by key and by endpoint, and the same per time bucket. Output-length drift
compares, per generation endpoint, the completion lengths of the first quarter of its successful
requests (the baseline) with the last quarter: the change of the mean, of the share cut off by
max_tokens, and a two-sample Kolmogorov-Smirnov test (drift is flagged when D exceeds its 1%
critical value). A plot shows the buckets: requests and errors, error rate, latency, output
length.

Latency and output length are generation figures: they come from the generation endpoints
(:data:`GENERATION_ENDPOINTS`) only. A ``/v1/models`` call answers in a millisecond with no
output; mixed in, a burst of them reads as faster replies and shorter outputs (or hides real
growth), and so do chat requests mixed with completions, whose default lengths differ.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tuneforge.errors import DataError

NICE_BUCKETS = (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 6 * 3600, 86400, 7 * 86400)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_DRIFT_SAMPLE = 8  # successful requests per side before drift is judged
KS_C_1PCT = 1.628  # c(alpha) of the two-sample KS test at alpha = 0.01
GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def read_log(path: str | Path) -> tuple[list[dict], list[str]]:
    """(records sorted by time, ``file:line: problem`` for each line skipped).

    A line being written while we read (the last one, unterminated) is skipped like a broken
    one; a log with no readable request at all is a DataError.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            record["ts"] = float(record["ts"])
            record["status"] = int(record["status"])
        except (ValueError, KeyError, TypeError) as err:
            skipped.append(f"{path}:{number}: {err}")
            continue
        records.append(record)
    if not records:
        detail = f" ({len(skipped)} unreadable lines, first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: no requests logged{detail}")
    records.sort(key=lambda r: r["ts"])
    return records, skipped


def parse_bucket(text: str, span_s: float) -> float:
    """Seconds per bucket: ``auto`` (about 20 buckets, a round size) or ``30s``/``5m``/``1h``."""
    if text == "auto":
        target = max(span_s, 1.0) / 20
        return float(next((b for b in NICE_BUCKETS if b >= target), NICE_BUCKETS[-1]))
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise DataError(f"--bucket {text!r}: give auto or a duration such as 30s, 5m, 1h, 1d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _percentiles(values: list[float], qs=(50, 90, 99)) -> dict | None:
    if not values:
        return None
    out = {f"p{q}": float(np.percentile(values, q)) for q in qs}
    out["max"] = float(max(values))
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _truncated(record: dict) -> bool:
    finish = record.get("finish_reason")
    return finish == "length" or (isinstance(finish, list) and "length" in finish)


def _generated(records: list[dict]) -> list[dict]:
    """The successful generation requests of ``records``."""
    return [r for r in records if r["status"] == 200 and r.get("endpoint") in GENERATION_ENDPOINTS]


def summarise(records: list[dict], *, bucket: str = "auto") -> dict:
    """The summary of time-sorted log records (see the module docstring).

    ``drift`` is the verdict to alert on: the first generation endpoint that drifted, else the
    busiest one (``drift["endpoint"]`` says which); ``by_endpoint`` has each one's.
    """
    start, end = records[0]["ts"], records[-1]["ts"]
    span = end - start
    ok = [r for r in records if r["status"] == 200]
    generated = _generated(records)
    by_endpoint = _by_endpoint(records)
    client = sum(400 <= r["status"] < 500 for r in records)
    server = sum(r["status"] >= 500 for r in records)
    bucket_s = parse_bucket(bucket, span)
    return {
        "requests": len(records), "start": _iso(start), "end": _iso(end), "span_s": span,
        "requests_per_min": len(records) / (span / 60) if span > 0 else None,
        "ok": len(ok), "errors_4xx": client, "errors_5xx": server,
        "error_rate": (client + server) / len(records),
        "by_status": dict(sorted(Counter(str(r["status"]) for r in records).items())),
        "latency_s": _percentiles([float(r["latency_s"]) for r in generated]),
        "ttft_s": _percentiles([float(r["ttft_s"]) for r in generated
                                if r.get("ttft_s") is not None]),
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in ok),
        "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in ok),
        "by_model": dict(Counter(str(r.get("model")) for r in records).most_common()),
        "by_key": dict(Counter(str(r.get("key")) for r in records).most_common()),
        "by_endpoint": by_endpoint,
        "bucket_s": bucket_s,
        "buckets": _buckets(records, start, bucket_s),
        "drift": _headline_drift(by_endpoint),
    }


def _by_endpoint(records: list[dict]) -> dict:
    """Requests, errors and latency per endpoint; output-length drift per generation one."""
    out = {}
    for endpoint, _ in Counter(str(r.get("endpoint")) for r in records).most_common():
        mine = [r for r in records if str(r.get("endpoint")) == endpoint]
        ok = [r for r in mine if r["status"] == 200]
        entry = {"requests": len(mine), "ok": len(ok),
                 "errors": sum(r["status"] >= 400 for r in mine),
                 "latency_s": _percentiles([float(r["latency_s"]) for r in ok])}
        if endpoint in GENERATION_ENDPOINTS:
            entry["ttft_s"] = _percentiles([float(r["ttft_s"]) for r in ok
                                            if r.get("ttft_s") is not None])
            entry["drift"] = output_length_drift(ok)
        out[endpoint] = entry
    return out


def _headline_drift(by_endpoint: dict) -> dict:
    judged = {e: v["drift"] for e, v in by_endpoint.items() if "drift" in v and v["ok"]}
    if not judged:
        return {"judged": False, "note": "no successful generation requests"}
    drifted = [e for e, d in judged.items() if d.get("drifted")]
    endpoint = drifted[0] if drifted else max(judged, key=lambda e: by_endpoint[e]["ok"])
    return {"endpoint": endpoint, **judged[endpoint]}


def _buckets(records: list[dict], start: float, bucket_s: float) -> list[dict]:
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(int((r["ts"] - start) // bucket_s), []).append(r)
    out = []
    for index in range(max(groups) + 1):
        group = groups.get(index, [])
        ok = _generated(group)
        lengths = [int(r.get("completion_tokens") or 0) for r in ok]
        latency = _percentiles([float(r["latency_s"]) for r in ok]) or {}
        out.append({
            "start": _iso(start + index * bucket_s), "t": start + index * bucket_s,
            "requests": len(group), "errors": sum(r["status"] >= 400 for r in group),
            "error_rate": (sum(r["status"] >= 400 for r in group) / len(group)) if group else None,
            "latency_p50": latency.get("p50"), "latency_p99": latency.get("p99"),
            "completion_tokens_mean": float(np.mean(lengths)) if lengths else None,
            "completion_tokens_p90": float(np.percentile(lengths, 90)) if lengths else None,
            "truncated_rate": (sum(map(_truncated, ok)) / len(ok)) if ok else None,
        })
    return out


def output_length_drift(ok: list[dict]) -> dict:
    """Completion lengths of the first quarter of ``ok`` (successful requests of one generation
    endpoint, by time) against the last quarter."""
    lengths = [int(r.get("completion_tokens") or 0) for r in ok]
    quarter = len(lengths) // 4
    if quarter < MIN_DRIFT_SAMPLE:
        return {"judged": False,
                "note": f"needs at least {4 * MIN_DRIFT_SAMPLE} successful requests, "
                        f"has {len(lengths)}"}
    sides = {"baseline": (lengths[:quarter], ok[:quarter]),
             "recent": (lengths[-quarter:], ok[-quarter:])}
    out: dict = {"judged": True}
    for name, (values, recs) in sides.items():
        out[name] = {"n": len(values), "mean": float(np.mean(values)),
                     "p50": float(np.percentile(values, 50)),
                     "p90": float(np.percentile(values, 90)),
                     "truncated_rate": sum(map(_truncated, recs)) / len(recs),
                     "from": _iso(recs[0]["ts"]), "to": _iso(recs[-1]["ts"])}
    base, recent = out["baseline"]["mean"], out["recent"]["mean"]
    out["mean_change_pct"] = 100 * (recent - base) / base if base else None
    d = ks_statistic(sides["baseline"][0], sides["recent"][0])
    critical = KS_C_1PCT * math.sqrt(2 / quarter)  # n = m = quarter
    out.update(ks_d=d, ks_critical_1pct=critical, drifted=d > critical)
    return out


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    a_sorted, b_sorted = np.sort(a), np.sort(b)
    points = np.concatenate([a_sorted, b_sorted])
    cdf_a = np.searchsorted(a_sorted, points, side="right") / len(a_sorted)
    cdf_b = np.searchsorted(b_sorted, points, side="right") / len(b_sorted)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _fmt(stats: dict | None, unit: str = "s") -> str:
    if not stats:
        return "-"
    return "  ".join(f"{k} {v:.3f}{unit}" for k, v in stats.items())


def render_summary(s: dict) -> str:
    """The summary as text for the terminal."""
    rate = f"{s['requests_per_min']:.1f}/min" if s["requests_per_min"] else "-"
    lines = [
        f"requests     {s['requests']} from {s['start']} to {s['end']} ({rate})",
        f"errors       {100 * s['error_rate']:.1f}%  (4xx {s['errors_4xx']}, "
        f"5xx {s['errors_5xx']}; by status {s['by_status']})",
        f"latency      {_fmt(s['latency_s'])}   (successful generation requests)",
        f"first token  {_fmt(s['ttft_s'])}",
        f"tokens       prompt {s['prompt_tokens']}, completion {s['completion_tokens']}",
        f"by model     {s['by_model']}",
        f"by key       {s['by_key']}",
    ]
    for endpoint, e in s["by_endpoint"].items():
        lines.append(f"endpoint     {endpoint}: {e['requests']} requests, {e['errors']} errors, "
                     f"latency {_fmt(e['latency_s'])}")
    drifts = {e: v["drift"] for e, v in s["by_endpoint"].items() if "drift" in v}
    if not drifts:
        lines.append(f"drift        not judged: {s['drift']['note']}")
    for endpoint, drift in drifts.items():
        lines.append(f"drift        {endpoint}: {_drift_text(drift)}")
    lines.append(f"\nper {s['bucket_s']:g} s:")
    lines.append(f"{'start':<26}{'requests':>9}{'errors':>8}{'p50 s':>9}{'p99 s':>9}"
                 f"{'out tok':>9}")
    for b in s["buckets"]:
        if not b["requests"]:
            continue
        cells = [b["latency_p50"], b["latency_p99"], b["completion_tokens_mean"]]
        p50, p99, out = ("-" if v is None else f"{v:.3f}" if i < 2 else f"{v:.1f}"
                         for i, v in enumerate(cells))
        lines.append(f"{b['start']:<26}{b['requests']:>9}{b['errors']:>8}{p50:>9}{p99:>9}"
                     f"{out:>9}")
    if s.get("skipped_lines"):
        lines.append(f"\nskipped {len(s['skipped_lines'])} unreadable lines, first: "
                     f"{s['skipped_lines'][0]}")
    if s.get("plot"):
        lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)


def _drift_text(drift: dict) -> str:
    if not drift["judged"]:
        return f"not judged: {drift['note']}"
    b, r = drift["baseline"], drift["recent"]
    verdict = "DRIFTED" if drift["drifted"] else "no significant drift"
    change = drift["mean_change_pct"]
    return (f"output length {verdict}: mean {b['mean']:.1f} -> {r['mean']:.1f} tokens "
            f"({'-' if change is None else f'{change:+.0f}%'}), cut by max_tokens "
            f"{100 * b['truncated_rate']:.0f}% -> {100 * r['truncated_rate']:.0f}%, KS D "
            f"{drift['ks_d']:.2f} vs {drift['ks_critical_1pct']:.2f} at 1% "
            f"(first {b['n']} vs last {r['n']} requests)")


def plot_summary(s: dict, path: Path) -> Path:
    """Four panels over time: requests and errors, error rate, latency, output length (the
    last two of generation requests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = s["buckets"]
    times = [datetime.fromtimestamp(b["t"], timezone.utc) for b in buckets]
    width = s["bucket_s"] / 86400 * 0.9  # bar width in days (matplotlib's date unit)

    def series(key):
        return [np.nan if b[key] is None else b[key] for b in buckets]

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), dpi=110, sharex=True)
    axes[0].bar(times, [b["requests"] for b in buckets], width=width, color="#8fb3d9",
                label="requests", align="edge")
    axes[0].bar(times, [b["errors"] for b in buckets], width=width, color="#c0392b",
                label="errors (4xx+5xx)", align="edge")
    axes[0].set_ylabel(f"per {s['bucket_s']:g} s")
    axes[1].plot(times, [100 * v for v in series("error_rate")], "o-", color="#c0392b")
    axes[1].set_ylabel("error rate %")
    axes[2].plot(times, series("latency_p50"), "o-", color="#1f4e79", label="p50")
    axes[2].plot(times, series("latency_p99"), "o--", color="#e67e22", label="p99")
    axes[2].set_ylabel("latency s")
    axes[3].plot(times, series("completion_tokens_mean"), "o-", color="#27ae60", label="mean")
    axes[3].plot(times, series("completion_tokens_p90"), "o--", color="#7f8c8d", label="p90")
    drift = s["drift"]
    if drift["judged"]:
        axes[3].axhline(drift["baseline"]["mean"], color="#27ae60", alpha=0.4, lw=1,
                        label=f"baseline mean, {drift['endpoint']}")
    axes[3].set_ylabel("completion tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
    verdict = "" if not drift["judged"] else (
        "  -  output length DRIFTED" if drift["drifted"] else "  -  no output-length drift")
    axes[0].set_title(f"{s['requests']} requests, {100 * s['error_rate']:.1f}% errors{verdict}")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
