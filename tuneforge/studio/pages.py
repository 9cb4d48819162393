"""The studio's pages as HTML: each function takes what a route gathered and returns the body
that :func:`~tuneforge.studio.layout.page` wraps.

Every value that came from a file, a form or the database goes through :func:`esc`; data for
the page scripts travels as JSON in a ``<script type="application/json">`` block (see
:func:`json_block`), read by the scripts under static/.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

from tuneforge.studio.layout import esc

HIDDEN_TRIAL_COLUMNS = ("run_dir", "host")


def json_block(element_id: str, data: Any) -> str:
    """``data`` as JSON inside the page, safe from ``</script>`` in any string."""
    text = json.dumps(data, ensure_ascii=False, default=str).replace("</", "<\\/")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def fmt(value: Any) -> str:
    """A table cell: numbers to 4-5 significant digits, missing as a dash."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.5g}"
    return str(value)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run_href(ident: str) -> str:
    return f"/studio/runs/{quote(ident)}"


def file_href(ident: str, name: str) -> str:
    return f"/studio/files/{quote(ident)}/{quote(name)}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, table_id: str = "",
          empty: str = "nothing yet") -> str:
    """A table from already-escaped cells."""
    rows = list(rows)
    if not rows:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def badge(status: str, element_id: str = "") -> str:
    attr = f' id="{esc(element_id)}"' if element_id else ""
    cls = status.replace(" ", "-")
    return f'<span class="badge {esc(cls)}"{attr} data-status="{esc(status)}">{esc(status)}</span>'


def error_body(message: str, hint_html: str = "") -> str:
    return f'<p class="error" id="page-error">{esc(message)}</p>{hint_html}'


# ----------------------------------------------------------------------------- runs


def runs_list(runs: list[dict], sweeps: list[dict], curves: list[dict], roots: dict) -> str:
    where = ", ".join(f"{esc(name)}: <code>{esc(path)}</code>" for name, path in roots.items())
    rows = [[f'<input type="checkbox" name="run" value="{esc(r["id"])}" '
             f'aria-label="compare {esc(r["name"])}">',
             f'<a href="{run_href(r["id"])}">{esc(r["id"])}</a>', badge(r["status"]),
             esc(f'{r["recipe"]} / {r["method"] or "?"}'), esc(r["base_model"]),
             esc(fmt(r["steps"])),
             esc(f'{r["metric_name"]} {fmt(r["best_metric"])}' if r["metric_name"] else "–"),
             esc(duration(r["duration_s"]))] for r in runs]
    parts = [f'<p class="muted">Runs found under {where}. A run shows up as soon as '
             "<code>tuneforge train</code> (or a job) starts writing its folder.</p>",
             '<form method="get" action="/studio/compare" id="compare-form">',
             table(["", "run", "status", "recipe / method", "base model", "steps", "best metric",
                    "duration"], rows, table_id="runs-table",
                   empty="No runs yet: train one with `tuneforge train CONFIG` or submit a job."),
             '<p><button type="submit">Compare selected runs</button></p></form>']
    if sweeps:
        parts.append("<h2>Sweeps</h2>")
        parts.append(table(["sweep", "trials", "objective", "best"], [[
            f'<a href="/studio/sweeps/{quote(s["id"])}">{esc(s["id"])}</a>',
            esc(len(s["trials"])), esc(s["summary"].get("objective", "–")),
            esc(fmt((s["summary"].get("best") or {}).get("value")))] for s in sweeps],
            table_id="sweeps-table"))
    if curves:
        parts.append("<h2>Learning curves</h2>")
        parts.append(table(["curve", "points", "plot"], [[
            f'<a href="/studio/curves/{quote(c["id"])}">{esc(c["id"])}</a>',
            esc(len(c["points"])), "yes" if c["plot"] else "–"] for c in curves],
            table_id="curves-table"))
    return "\n".join(parts)


def run_page(info: dict, servable: bool) -> str:
    ident = info["id"]
    facts = [("status", badge(info["status"], "run-status")),
             ("recipe / method", esc(f'{info["recipe"]} / {info["method"] or "?"}')),
             ("base model", esc(info["base_model"])),
             ("steps", f'<span id="run-steps">{esc(fmt(info["steps"]))}</span>'),
             ("best metric", f'<span id="run-best">{esc(best_metric(info))}</span>'),
             ("duration", f'<span id="run-duration">{esc(duration(info["duration_s"]))}</span>'),
             ("folder", f'<code>{esc(info["path"])}</code>')]
    parts = ['<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
             + "</dl>"]
    if servable:
        parts.append(f'<p><a href="/studio/playground?model={quote("run:" + ident)}">Try it in '
                     "the playground</a></p>")
    if info.get("error"):
        parts.append(f'<h2>Error</h2><pre class="error">{esc(info["error"])}</pre>')
    parts.append(
        "<h2>Curves</h2>"
        '<p class="muted"><span id="curve-state">Live: new points appear while the run '
        'trains</span> (<span id="point-count">0</span> points)</p>'
        f'<div class="plots" id="run-curves" data-run="{esc(ident)}">'
        '<div class="plot" id="plot-loss"></div><div class="plot" id="plot-val"></div>'
        '<div class="plot" id="plot-speed"></div></div>')
    parts.append('<h2>Checkpoints</h2><div id="checkpoints-box">' + checkpoints_table(
        info["checkpoints"]) + "</div>")
    parts.append('<div id="summary-box">' + summary_table(info.get("summary")) + "</div>")
    if info.get("output"):
        parts.append(f'<p>Final weights: <code>{esc(info["output"])}/</code></p>')
    parts.append("<h2>Evaluation</h2>" + eval_section(info))
    if info.get("plots"):
        parts.append("<h2>Plots written by the run</h2>" + "".join(
            f'<img class="png" alt="{esc(p)}" src="{file_href(ident, p)}">' for p in info["plots"]))
    parts.append(f'<h2>Config</h2><pre id="run-config">{esc(info.get("config_text") or "")}'
                 "</pre>")
    return "\n".join(parts)


def best_metric(info: dict) -> str:
    return f'{info["metric_name"]} {fmt(info["best_metric"])}' if info["metric_name"] else "–"


def checkpoints_table(checkpoints: list[dict]) -> str:
    return table(["checkpoint", "step"], [[esc(c["name"]), esc(fmt(c["step"]))]
                                          for c in checkpoints],
                 table_id="checkpoints-table", empty="no checkpoints (yet)")


def summary_table(summary: dict | None) -> str:
    if not summary:
        return ""
    return "<h2>Summary</h2>" + table(
        ["field", "value"], [[esc(k), esc(fmt(v))] for k, v in summary.items()
                             if not isinstance(v, (dict, list))], table_id="summary-table")


def eval_section(info: dict) -> str:
    result = info.get("eval")
    if not result:
        return ('<p class="muted">Not evaluated yet: <code>tuneforge eval '
                f'{esc(info["path"])} --data TEST.jsonl</code> writes eval/eval.json and its '
                "report.</p>")
    rows = [[esc(k), esc(fmt(v))] for k, v in flatten(result.get("metrics", result)).items()]
    link = (f'<p><a href="{file_href(info["id"], "eval/report.html")}">The full evaluation '
            "report</a> (samples, plots)</p>" if info.get("eval_report") else "")
    return table(["metric", "value"], rows[:60], table_id="eval-table") + link


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys with scalar values (lists left out)."""
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return {prefix or "value": data}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif not isinstance(value, list):
            out[name] = value
    return out


COMPARE_FIELDS = (
    ("status", lambda r: r["status"]), ("recipe", lambda r: r["recipe"]),
    ("method", lambda r: r["method"]), ("base model", lambda r: r["base_model"]),
    ("steps", lambda r: r["steps"]),
    ("best metric", lambda r: f'{r["metric_name"]} {fmt(r["best_metric"])}'
     if r["metric_name"] else None),
    ("final train loss", lambda r: (r.get("summary") or {}).get("final_train_loss")),
    ("best val loss", lambda r: (r.get("summary") or {}).get("best_val_loss")),
    ("tokens/s", lambda r: (r.get("summary") or {}).get("tokens_per_s")),
    ("duration", lambda r: duration(r["duration_s"])),
)


def compare_page(runs: list[dict], configs: list[dict]) -> str:
    headers = ["", *[r["id"] for r in runs]]
    rows = [[esc(name), *[esc(fmt(get(r))) for r in runs]] for name, get in COMPARE_FIELDS]
    for key in ("lr", "batch_size", "epochs", "max_steps"):
        values = [(c.get("train") or {}).get(key) for c in configs]
        rows.append([esc(f"train.{key}"), *[esc(fmt(v)) for v in values]])
    rows.append([esc("adapter.r"), *[esc(fmt((c.get("adapter") or {}).get("r")))
                                     for c in configs]])
    curves = [{"id": r["id"], "records": r["records"]} for r in runs]
    return "\n".join([
        table(headers, rows, table_id="compare-table"),
        '<h2>Curves</h2><div class="plots" id="compare-curves">'
        '<div class="plot" id="compare-loss"></div><div class="plot" id="compare-val"></div>'
        "</div>", json_block("compare-data", curves),
        "<p>" + " · ".join(f'<a href="{run_href(r["id"])}">{esc(r["id"])}</a>' for r in runs)
        + "</p>"])


def sweep_page(sweep: dict) -> str:
    summary = sweep["summary"]
    best = summary.get("best") or {}
    facts = [("objective", summary.get("objective")), ("direction", summary.get("direction")),
             ("trials", summary.get("trials")), ("best value", best.get("value")),
             ("best trial", best.get("number")), ("best params", best.get("params"))]
    parts = ['<dl class="facts">' + "".join(
        f"<dt>{esc(k)}</dt><dd>{esc(json.dumps(v) if isinstance(v, (dict, list)) else fmt(v))}"
        "</dd>" for k, v in facts if v is not None) + "</dl>"]
    trials = sweep["trials"]
    columns = [k for k in (trials[0] if trials else {}) if k not in HIDDEN_TRIAL_COLUMNS
               and k != "run_id"]
    rows = []
    for t in trials:
        cells = []
        for k in columns:
            cell = esc(t.get(k))
            if k == "number" and t.get("run_id"):
                cell = f'<a href="{run_href(t["run_id"])}">{cell}</a>'
            cells.append(cell)
        rows.append(cells)
    parts.append("<h2>Trials</h2>" + table(columns, rows, table_id="trials-table",
                                           empty="no trials yet"))
    done = [t["run_id"] for t in trials if t.get("run_id")]
    if len(done) >= 2:
        query = "&".join(f"run={quote(i)}" for i in done[:6])
        parts.append(f'<p><a href="/studio/compare?{query}">Compare these trials\' curves</a></p>')
    if sweep["plots"]:
        parts.append("<h2>Plots</h2>" + "".join(
            f'<figure><img class="png" alt="{esc(p)}" src="{file_href(sweep["id"], p + ".png")}">'
            f"<figcaption>{esc(p)}</figcaption></figure>" for p in sweep["plots"]))
    else:
        parts.append('<p class="muted">The sweep draws its plots (history, importance) when it '
                     "ends.</p>")
    return "\n".join(parts)


def curve_page(curve: dict) -> str:
    result = {k: v for k, v in flatten(curve["result"]).items() if k != "plot"}
    parts = [table(["field", "value"], [[esc(k), esc(fmt(v))] for k, v in result.items()],
                   table_id="curve-fit", empty="no fit yet (curve.json is written at the end)")]
    points = curve["points"]
    if points:
        columns = list(points[0])
        parts.append("<h2>Points</h2>" + table(columns, [[esc(p.get(k)) for k in columns]
                                                         for p in points],
                                                table_id="curve-points"))
    if curve["plot"]:
        parts.append(f'<img class="png" alt="learning curve" '
                     f'src="{file_href(curve["id"], "curve.png")}">')
    return "\n".join(parts)


# ----------------------------------------------------------------------------- data


def data_page(files: list[dict]) -> str:
    rows = [[f'<a href="/studio/data/{quote(f["id"])}">{esc(f["filename"])}</a>',
             esc(f["id"]), esc(fmt(f["bytes"])), esc(f.get("format") or "?"),
             f'<a href="/studio/jobs/new?training_file={quote(f["id"])}">train on it</a>']
            for f in files]
    return "\n".join([
        '<form id="upload-form"><label for="upload-file">A data file (.jsonl, .json, .csv, '
        '.tsv, .parquet)</label> <input type="file" id="upload-file" name="file"> '
        '<button type="submit" id="upload-button">Upload and check</button></form>',
        '<p class="error" id="upload-error" hidden></p>',
        '<p class="muted">Uploads go to the jobs API\'s file store (<code>POST /v1/files</code>):'
        " the same files a job trains on.</p>",
        "<h2>Uploaded files</h2>",
        table(["file", "id", "bytes", "format", ""], rows, table_id="files-table",
              empty="no files uploaded yet")])


def check_page(row: dict, report: dict) -> str:
    problems = report["problems"]
    errors = [p for p in problems if p["severity"] == "error"]
    warnings = [p for p in problems if p["severity"] == "warning"]
    verdict = (f'<p class="verdict {"ok" if not errors else "failed"}" id="check-verdict">'
               f'{"OK" if not errors else "FAILED"}: {len(errors)} error(s), '
               f"{len(warnings)} warning(s)</p>")
    rows = [[esc(p["severity"]), esc(p["source"]), esc(fmt(p["line"])), esc(p["field"]),
             esc(p["message"])] for p in problems[:500]]
    more = (f'<p class="muted">... and {len(problems) - 500} more</p>'
            if len(problems) > 500 else "")
    stats = report["stats"]
    return "\n".join([
        f'<p>File <b>{esc(row["filename"])}</b> ({esc(row["id"])}, {esc(fmt(row["bytes"]))} '
        f'bytes, format {esc(row.get("format") or "not recognised")}), checked as '
        "<code>tuneforge data check</code> checks it.</p>", verdict,
        "<h2>Problems by line</h2>",
        table(["severity", "file", "line", "field", "problem"], rows, table_id="problems",
              empty="no problems found") + more,
        f'<p><a href="/studio/data/{quote(row["id"])}/report" id="quality-link">The data quality '
        "report</a> (lengths, duplicates, leakage, PII; built on first view) · "
        f'<a href="/studio/jobs/new?training_file={quote(row["id"])}">Train on this file</a></p>',
        "<h2>Statistics</h2>",
        table(["statistic", "value"], [[esc(k), esc(fmt(v))] for k, v in flatten(stats).items()],
              table_id="stats-table", empty="no statistics: fix the errors first")])


# ----------------------------------------------------------------------------- jobs


def jobs_page(jobs: list[dict]) -> str:
    rows = [[f'<a href="/studio/jobs/{quote(j["id"])}">{esc(j["id"])}</a>', badge(j["status"]),
             esc(j["model"]), esc(j["method"]["type"]), esc(j["training_file"]),
             esc(j.get("fine_tuned_model") or "–")] for j in jobs]
    return ('<p><a href="/studio/jobs/new">New job</a></p>'
            + table(["job", "status", "base model", "method", "training file",
                     "fine-tuned model"], rows, table_id="jobs-table", empty="no jobs yet"))


def new_job_page(base_models: list[str], files: list[dict], chosen_file: str | None,
                 hyperparameters: dict, adapters: Sequence[str], worker_note: str) -> str:
    if not files:
        return ('<p id="no-files">Upload a data file first: <a href="/studio/data">Data</a>.'
                "</p>")

    def options(pairs, selected=None):
        return "".join(f'<option value="{esc(v)}"{" selected" if v == selected else ""}>'
                       f"{esc(label)}</option>" for v, label in pairs)

    def field(name, label, control, help_text):
        return (f'<div class="field" data-field="{esc(name)}"><label for="f-{esc(name)}">'
                f"{esc(label)}</label>{control}<small>{help_text}</small>"
                f'<span class="field-error" id="err-{esc(name)}" hidden></span></div>')

    file_pairs = [(f["id"], f'{f["filename"]} ({f["id"]}, {f.get("format") or "?"})')
                  for f in files]
    hp = []
    for name, (kind, low, high, low_ok, auto) in hyperparameters.items():
        bound = "[" if low_ok else "("
        hp.append(field(name, name, f'<input id="f-{name}" name="{name}" placeholder="auto">',
                        f"auto = {esc(auto)}; {'an integer' if kind is int else 'a number'} in "
                        f"{bound}{low:g}, {high:g}]" + (" (DPO only)" if name == "beta" else "")))
    controls = [
        field("model", "Base model", f'<select id="f-model" name="model">'
              f"{options([(m, m) for m in base_models])}</select>",
              "the model the job fine-tunes (the studio's base model, or --fine-tune-models)"),
        field("training_file", "Training data", f'<select id="f-training_file" '
              f'name="training_file">{options(file_pairs, chosen_file)}</select>',
              'uploaded on the <a href="/studio/data">Data</a> page; checked again by the worker'),
        field("validation_file", "Validation data", f'<select id="f-validation_file" '
              f'name="validation_file"><option value="">(none)</option>'
              f"{options(file_pairs)}</select>",
              "optional: validation loss is logged and the best step kept"),
        field("method", "Method", '<select id="f-method" name="method">'
              '<option value="supervised">SFT (supervised fine-tuning)</option>'
              '<option value="dpo">DPO (preference pairs)</option></select>',
              "SFT trains on prompt/completion, chat, alpaca or classification records; DPO on "
              "preference pairs"),
        field("adapter", "What is trained", f'<select id="f-adapter" name="adapter">'
              f"{options([(a, a) for a in adapters], 'lora')}</select>",
              "lora (default): small adapter matrices; full: every weight"),
        field("r", "LoRA rank r", '<input id="f-r" name="r" placeholder="16">',
              "LoRA only; default 16"),
        field("alpha", "LoRA alpha", '<input id="f-alpha" name="alpha" placeholder="32">',
              "LoRA only; default 32 (scaling = alpha / r)"),
        *hp,
        field("suffix", "Suffix", '<input id="f-suffix" name="suffix" placeholder="(none)">',
              "part of the fine-tuned model's name: ft:BASE:SUFFIX:JOB"),
        field("seed", "Seed", '<input id="f-seed" name="seed" placeholder="random">',
              "an integer; the same seed and data train the same model"),
    ]
    return "\n".join([
        '<form id="job-form" novalidate>', *controls,
        '<p><button type="submit" id="job-submit">Start fine-tuning</button></p></form>',
        '<p class="error" id="job-error" hidden></p>',
        f'<p class="muted">{worker_note} Reward models, KTO, GRPO and PPO still need a run '
        "config and <code>tuneforge train</code>.</p>"])


def job_page(job_id: str, run_ident: str | None) -> str:
    run_link = (f'<a href="{run_href(run_ident)}" id="job-run-link">the run\'s live curves</a>'
                if run_ident else '<span class="muted">(the run folder appears when it starts)'
                                  "</span>")
    return "\n".join([
        f'<div id="job" data-job="{esc(job_id)}">',
        '<dl class="facts"><dt>status</dt><dd><span class="badge" id="job-status" '
        'data-status="">…</span></dd><dt>base model</dt><dd id="job-model"></dd>'
        '<dt>fine-tuned model</dt><dd id="job-ft-model">–</dd><dt>trained tokens</dt>'
        f'<dd id="job-tokens">–</dd><dt>run</dt><dd>{run_link}</dd></dl>',
        '<p><button type="button" id="job-cancel" hidden>Cancel job</button> '
        '<a id="job-try" hidden>Try it in the playground</a></p>',
        '<p class="error" id="job-error" hidden></p>',
        '<h2>Events</h2><ol id="job-events" class="events"></ol></div>'])


# ----------------------------------------------------------------------------- playground


def playground_page(base_id: str, models: list[str], chosen: list[str], max_tokens: int) -> str:
    def select(i):
        pick = chosen[i - 1] if i - 1 < len(chosen) else ""
        opts = '<option value="">(none)</option>' + "".join(
            f'<option value="{esc(m)}"{" selected" if m == pick else ""}>{esc(m)}</option>'
            for m in models)
        return f'<select id="pane-{i}-model" aria-label="model of pane {i}">{opts}</select>'

    panes = [f'<div class="pane" id="pane-0"><div class="pane-head"><b>{esc(base_id)}</b> '
             f'(base)<input type="hidden" id="pane-0-model" value="{esc(base_id)}"></div>'
             '<div class="pane-text" id="pane-0-text" data-state="idle"></div></div>']
    panes += [f'<div class="pane" id="pane-{i}"><div class="pane-head">{select(i)}</div>'
              f'<div class="pane-text" id="pane-{i}-text" data-state="idle"></div></div>'
              for i in (1, 2, 3)]
    return "\n".join([
        '<form id="play-form"><label for="prompt">Prompt</label>'
        '<textarea id="prompt" rows="3" placeholder="Ask something..."></textarea>'
        '<div class="row"><label>max tokens <input id="max-tokens" value="'
        f'{max_tokens}" size="5"></label> <label>temperature <input id="temperature" '
        'value="0" size="5"></label> <button type="submit" id="play-run">Run</button></div>'
        "</form>", '<p class="error" id="play-error" hidden></p>',
        f'<div class="panes">{"".join(panes)}</div>',
        '<p class="muted">Runs in the runs folder with a LoRA adapter on this base model are '
        "listed as run:NAME; your succeeded jobs as ft:...; each is loaded on first use. "
        "Replies stream from <code>/v1/chat/completions</code>.</p>"])


def login_page(next_path: str, message: str = "") -> str:
    note = f'<p class="error" id="login-error">{esc(message)}</p>' if message else ""
    return (f'{note}<form method="post" action="/studio/login" id="login-form">'
            f'<input type="hidden" name="next" value="{esc(next_path)}">'
            '<label for="key">API key</label> <input type="password" id="key" name="key" '
            'autocomplete="current-password"> <button type="submit">Sign in</button></form>'
            '<p class="muted">This studio is reachable from other machines, so it asks for one '
            "of the server's API keys (the --api-keys file).</p>")
