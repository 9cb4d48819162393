"""The studio: web pages for runs, comparisons, data, jobs and a playground, on the serve app.

:func:`create_studio_app` builds the same FastAPI app as ``tuneforge jobs serve`` (inference,
files, fine-tuning jobs, one set of keys and limits) and adds the studio's routers under
``/studio``. The studio is a client: pages read run folders (:mod:`.runs`), the jobs database
(read only) and the data tools' reports; everything that changes state goes through the API
(the page scripts call ``/v1/files``, ``/v1/fine_tuning/jobs`` and ``/v1/chat/completions``).

Keys: with ``keys=None`` (loopback only, see the CLI) every page is open. Otherwise a page
needs a signed-in browser: /studio/login takes one of the server's API keys, checks it, and
keeps it in an HttpOnly cookie; the page scripts send it as the bearer key of their API calls
(kept in the tab's sessionStorage). The feedback pages (:mod:`.feedback`, when present) are
mounted behind the same check (``feedback_router(feedback_db)``); the studio's settings are in
``app.state.studio`` (:class:`StudioContext`) and the viewer's key id comes from :func:`viewer`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool

from tuneforge.errors import TuneforgeError
from tuneforge.jobs.api import HYPERPARAMETERS, FineTunedModels, jobs_router, run_folder
from tuneforge.jobs.files import FileStore
from tuneforge.jobs.store import JobStore
from tuneforge.models.runs import find_run_output
from tuneforge.serve.auth import ANONYMOUS
from tuneforge.serve.protocol import APIError
from tuneforge.studio import pages
from tuneforge.studio.layout import page
from tuneforge.studio.runs import Roots, curve_info, read_json, read_metrics, run_info, sweep_info

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "tuneforge_studio_key"
RUN_PREFIX = "run:"
"""Playground model ids of runs in the runs folder: ``run:runs/NAME``."""
STREAM_POLL_S = 0.5  # how often a run's live curves look for new metrics lines
STREAM_PING_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
ADAPTER_CHOICES = ("lora", "full")
PLAYGROUND_MAX_TOKENS = 64


@dataclass
class StudioContext:
    """What the studio's pages share (``app.state.studio``)."""

    roots: Roots
    store: JobStore
    jobs_dir: Path
    base_id: str
    base_models: list[str]
    feedback_db: Path | None = None
    worker: Any = None  # a Worker running in this process (``--worker``), if any
    extra: dict = field(default_factory=dict)

    def visible(self, ident: str, owner: str) -> bool:
        """Whether ``owner`` may see the folder ``ident``: every folder of the runs folder;
        of the jobs' run folders, only those of its own jobs."""
        root, _, rest = ident.partition("/")
        if root != "jobs":
            return True
        job_id = rest.partition("/")[0]
        return bool(job_id) and self.store.get_job(job_id, owner) is not None


class LoginNeeded(Exception):
    """A studio request without a valid key while the server has keys."""


def viewer(request: Request) -> str:
    """The key id of the signed-in viewer (``anonymous`` when the server has no keys); raises
    :class:`LoginNeeded` when keys are on and the request carries no valid one."""
    keys = request.app.state.server.keys
    if keys is None:
        return ANONYMOUS
    key = request.cookies.get(COOKIE)
    owner = keys.identify(key) if key else None
    if owner is None:
        raise LoginNeeded
    return owner


def _studio(request: Request) -> StudioContext:
    return request.app.state.studio


class StudioModels:
    """The playground's adapters: the runs folder's LoRA runs on the served base model (as
    ``run:runs/NAME``, for every key) and the key's succeeded jobs (as ``ft:...``)."""

    def __init__(self, jobs: FineTunedModels, roots: Roots, base_id: str) -> None:
        self.jobs, self.roots, self.base_id = jobs, roots, base_id

    def adapter_for(self, model_id: str, key_id: str | None) -> Path | None:
        if model_id.startswith(RUN_PREFIX):
            ident = model_id[len(RUN_PREFIX):]
            folder = self.roots.resolve(ident) if ident.startswith("runs/") else None
            return folder if folder is not None and servable(folder, self.base_id) else None
        return self.jobs.adapter_for(model_id, key_id)

    def model_ids(self, key_id: str | None) -> list[str]:
        runs, _, _ = self.roots.walk()
        own = [f"{RUN_PREFIX}{self.roots.ident(r)}" for r in runs
               if self.roots.ident(r).startswith("runs/") and servable(r, self.base_id)]
        return self.jobs.model_ids(key_id) + own


def servable(folder: Path, base_id: str) -> bool:
    """Whether a run folder holds a finished adapter on ``base_id`` (servable beside it)."""
    output = find_run_output(folder)
    if output is None or output.name != "adapter":
        return False
    meta = read_json(output / "tuneforge.json") or {}
    return (meta.get("base_model") == base_id and meta.get("method") not in ("full", "freeze")
            and (output / "adapter_config.json").is_file())


def create_studio_app(models, store: JobStore, jobs_dir: str | Path, runs_dir: str | Path,
                      settings=None, keys=None, *, base_models: list[str] | None = None,
                      feedback_db: str | Path | None = None) -> FastAPI:
    """The serve app for ``models`` with the jobs API and the studio's pages.

    ``runs_dir`` is the folder of run, sweep and learning-curve folders the pages show; jobs
    keep their files and run folders in ``jobs_dir`` (``store`` is its database)."""
    from tuneforge.serve.app import create_app

    jobs_dir = Path(jobs_dir)
    roots = Roots({"runs": Path(runs_dir), "jobs": jobs_dir / "runs"})
    models.source = StudioModels(FineTunedModels(store, jobs_dir, models.base_id), roots,
                                 models.base_id)
    allowed = [models.base_id, *[m for m in base_models or [] if m != models.base_id]]
    app = create_app(models, settings, keys, routers=[jobs_router(store, jobs_dir, allowed)])
    app.state.studio = StudioContext(roots, store, jobs_dir, models.base_id, allowed,
                                     Path(feedback_db) if feedback_db else None)
    app.include_router(public_router())
    signed_in = [Depends(viewer)]
    app.include_router(studio_router(), dependencies=signed_in)
    try:
        from tuneforge.studio.feedback import feedback_router
    except ModuleNotFoundError as err:
        if err.name != "tuneforge.studio.feedback":
            raise
    else:
        app.include_router(feedback_router(feedback_db), dependencies=signed_in)

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, _err: LoginNeeded):
        if request.method == "GET" and not request.url.path.startswith("/studio/api/"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/studio/login?next={quote(target)}", status_code=303)
        err = APIError(401, "Sign in to the studio first (/studio/login) with one of the "
                       "server's API keys", code="invalid_api_key")
        return JSONResponse(err.body(), status_code=401)

    return app


def html(title: str, body: str, *, status: int = 200, scripts: tuple[str, ...] = ()):
    return HTMLResponse(page(title, body, scripts=scripts), status_code=status)


def not_found(what: str) -> HTMLResponse:
    return html("Not found", pages.error_body(what, '<p><a href="/studio/runs">Runs</a></p>'),
                status=404)


# ----------------------------------------------------------------------------- public


def public_router() -> APIRouter:
    """Sign-in and the static files: reachable without a key."""
    router = APIRouter()

    @router.get("/studio")
    @router.get("/studio/")
    def home():
        return RedirectResponse("/studio/runs", status_code=303)

    @router.get("/studio/static/{name}")
    def static(name: str):
        if name == "plotly.min.js":
            path = Path(str(package_files("plotly") / "package_data" / "plotly.min.js"))
        else:
            known = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
            if name not in known:
                raise APIError(404, f"no static file {name!r}", code="not_found")
            path = STATIC_DIR / name
        kind = {".js": "text/javascript", ".css": "text/css"}.get(path.suffix)
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "max-age=300"})

    @router.get("/studio/login")
    def login_form(next: str = "/studio/runs"):
        return html("Sign in", pages.login_page(_safe_next(next)), scripts=("login.js",))

    @router.post("/studio/login")
    async def login(request: Request):
        server = request.app.state.server
        form = await request.form(max_files=0, max_fields=4)
        key, target = str(form.get("key") or ""), _safe_next(str(form.get("next") or ""))
        if server.keys is None:
            return RedirectResponse(target, status_code=303)
        address = request.client.host if request.client else "unknown"
        wait = server.auth_failures.wait(address)
        if wait > 0:
            return html("Sign in", pages.login_page(target, f"Too many failed keys from "
                                                            f"{address}; wait {wait:.0f} s"),
                        status=429, scripts=("login.js",))
        if not key or server.keys.identify(key) is None:
            server.auth_failures.acquire(address)
            return html("Sign in", pages.login_page(target, "That key is not one of this "
                                                            "server's API keys"),
                        status=401, scripts=("login.js",))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @router.get("/studio/logout")
    def logout():
        response = RedirectResponse("/studio/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    return router


def _safe_next(target: str) -> str:
    """Only a studio path: never another site after signing in."""
    return target if target.startswith("/studio/") and not target.startswith("//") else \
        "/studio/runs"


# ----------------------------------------------------------------------------- pages


def studio_router() -> APIRouter:
    router = APIRouter()

    def find_run(request: Request, ident: str) -> Path | None:
        ctx = _studio(request)
        folder = ctx.roots.resolve(ident)
        if folder is None or not ctx.visible(ident, viewer(request)):
            return None
        return folder

    # ------------------------------------------------------------------------- runs

    @router.get("/studio/runs")
    def runs_page(request: Request):
        ctx, owner = _studio(request), viewer(request)
        runs, sweeps, curves = ctx.roots.walk()
        runs_rows = [run_info(r, ctx.roots) for r in runs]
        runs_rows = [r for r in runs_rows if ctx.visible(r["id"], owner)]
        body = pages.runs_list(runs_rows, [sweep_info(s, ctx.roots) for s in sweeps],
                               [curve_info(c, ctx.roots) for c in curves],
                               {k: str(v) for k, v in ctx.roots.folders.items()})
        return html("Runs", body)

    @router.get("/studio/runs/{ident:path}")
    def run_detail(ident: str, request: Request):
        folder = find_run(request, ident)
        if folder is None:
            return not_found(f"No run {ident!r} in the studio's folders")
        info = run_info(folder, _studio(request).roots, with_records=True)
        body = pages.run_page(info, servable(folder, _studio(request).base_id))
        return html(f"Run {ident}", body, scripts=("plotly.min.js", "studio.js", "run.js"))

    @router.get("/studio/api/runs/{ident:path}/stream")
    async def run_stream(ident: str, request: Request):
        folder = find_run(request, ident)
        if folder is None:
            raise APIError(404, f"No run {ident!r} in the studio's folders", code="not_found")
        return StreamingResponse(_follow(folder, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/studio/files/{ident:path}")
    def run_file(ident: str, request: Request):
        ctx = _studio(request)
        path = ctx.roots.file(ident)
        if path is None or not ctx.visible(ident, viewer(request)):
            raise APIError(404, f"No file {ident!r} the studio shows (images, reports, JSON, "
                           "CSV, YAML, text under its folders)", code="not_found")
        headers = {"Content-Security-Policy": "sandbox"} if path.suffix == ".html" else {}
        return FileResponse(path, headers=headers)

    @router.get("/studio/compare")
    def compare(request: Request):
        ctx = _studio(request)
        wanted = list(dict.fromkeys(request.query_params.getlist("run")))
        if len(wanted) < 2:
            return html("Compare", pages.error_body(
                "Pick two or more runs to compare (tick them on the Runs page).",
                '<p><a href="/studio/runs">Runs</a></p>'), status=400)
        infos, configs = [], []
        for ident in wanted:
            folder = find_run(request, ident)
            if folder is None:
                return not_found(f"No run {ident!r} in the studio's folders")
            infos.append(run_info(folder, ctx.roots, with_records=True))
            configs.append(_config_of(folder))
        return html("Compare runs", pages.compare_page(infos, configs),
                    scripts=("plotly.min.js", "studio.js", "compare.js"))

    @router.get("/studio/sweeps/{ident:path}")
    def sweep(ident: str, request: Request):
        folder = find_run(request, ident)
        if folder is None or not ((folder / "sweep.json").is_file()
                                  or (folder / "results.csv").is_file()):
            return not_found(f"No sweep {ident!r} in the studio's folders")
        return html(f"Sweep {ident}", pages.sweep_page(sweep_info(folder, _studio(request).roots)))

    @router.get("/studio/curves/{ident:path}")
    def curve(ident: str, request: Request):
        folder = find_run(request, ident)
        if folder is None or not ((folder / "curve.json").is_file()
                                  or (folder / "curve.csv").is_file()):
            return not_found(f"No learning curve {ident!r} in the studio's folders")
        return html(f"Learning curve {ident}",
                    pages.curve_page(curve_info(folder, _studio(request).roots)))

    # ------------------------------------------------------------------------- data

    @router.get("/studio/data")
    def data(request: Request):
        ctx = _studio(request)
        rows, _ = ctx.store.list_files(viewer(request), limit=200)
        return html("Data", pages.data_page(rows), scripts=("studio.js", "data.js"))

    async def uploaded(request: Request, file_id: str, title: str, build):
        """``build(ctx, row)`` in a worker thread for one of the viewer's uploads: its result,
        or the response to send instead (404 for another's or no file, 422 for bad data)."""
        ctx = _studio(request)
        row = ctx.store.get_file(file_id, viewer(request))
        if row is None:
            return None, not_found(f"No uploaded file {file_id!r}")
        try:
            return (row, await run_in_threadpool(build, ctx, row)), None
        except TuneforgeError as err:
            return None, html(f"{title}: {row['filename']}", pages.error_body(str(err)),
                              status=422)

    @router.get("/studio/data/{file_id}")
    async def data_check(file_id: str, request: Request):
        done, answer = await uploaded(request, file_id, "Data", _check_upload)
        if answer is not None:
            return answer
        row, report = done
        return html(f"Data: {row['filename']}", pages.check_page(row, report))

    @router.get("/studio/data/{file_id}/report")
    async def data_report(file_id: str, request: Request):
        done, answer = await uploaded(request, file_id, "Data report", _quality_report)
        if answer is not None:
            return answer
        _, path = done
        return FileResponse(path, media_type="text/html",
                            headers={"Content-Security-Policy": "sandbox"})

    # ------------------------------------------------------------------------- jobs

    @router.get("/studio/jobs")
    def jobs(request: Request):
        rows, _ = _studio(request).store.list_jobs(viewer(request), limit=100)
        return html("Jobs", pages.jobs_page(rows))

    @router.get("/studio/jobs/new")
    def new_job(request: Request, training_file: str | None = None):
        ctx = _studio(request)
        files, _ = ctx.store.list_files(viewer(request), purpose="fine-tune", limit=200)
        note = ("A worker in this studio runs the jobs." if ctx.worker is not None else
                "Jobs run when a worker is up: <code>tuneforge jobs worker --jobs-dir "
                f"{pages.esc(ctx.jobs_dir)}</code> (or start the studio with --worker).")
        body = pages.new_job_page(ctx.base_models, files, training_file, HYPERPARAMETERS,
                                  ADAPTER_CHOICES, note)
        return html("New fine-tuning job", body, scripts=("studio.js", "job_form.js"))

    @router.get("/studio/jobs/{job_id}")
    def job(job_id: str, request: Request):
        ctx = _studio(request)
        if ctx.store.get_job(job_id, viewer(request)) is None:
            return not_found(f"No fine-tuning job {job_id!r}")
        has_run = run_folder(ctx.jobs_dir, job_id).is_dir()
        body = pages.job_page(job_id, f"jobs/{job_id}/run" if has_run else None)
        return html(f"Job {job_id}", body, scripts=("studio.js", "job.js"))

    # ------------------------------------------------------------------------- playground

    @router.get("/studio/playground")
    def playground(request: Request):
        ctx, server = _studio(request), request.app.state.server
        ids = [m for m in server.models.visible_ids(viewer(request)) if m != ctx.base_id]
        chosen = [m for m in request.query_params.getlist("model") if m in ids][:3]
        max_tokens = min(PLAYGROUND_MAX_TOKENS, server.settings.max_tokens)
        return html("Playground", pages.playground_page(ctx.base_id, ids, chosen, max_tokens),
                    scripts=("studio.js", "playground.js"))

    return router



async def _follow(folder: Path, request: Request):
    """Server-sent events of a run's metrics: ``reset`` then every record so far, then new
    records as the run writes them, ``status`` when it changes, ``done`` once summary.json
    exists (the browser then closes the stream)."""
    metrics = folder / "metrics.jsonl"
    offset, status, quiet, polls = 0, None, 0.0, 0
    yield "event: reset\ndata: {}\n\n"
    while True:
        try:
            size = metrics.stat().st_size
        except OSError:
            size = 0
        if size < offset:  # the run was restarted (or resumed and truncated): start over
            offset = 0
            yield "event: reset\ndata: {}\n\n"
        records, offset = await asyncio.to_thread(read_metrics, metrics, offset)
        if records:
            quiet = 0.0
            yield f"event: records\ndata: {json.dumps(records)}\n\n"
        finished = (folder / "summary.json").is_file()
        polls += 1
        if records or finished or polls % 4 == 1:  # the facts read the whole metrics file
            info = await asyncio.to_thread(_run_facts, folder, _studio(request).roots)
            if (info["status"], info["checkpoints_html"]) != status:
                status = (info["status"], info["checkpoints_html"])
                yield f"event: status\ndata: {json.dumps(info, default=str)}\n\n"
        if finished:
            yield "event: done\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(STREAM_POLL_S)
        quiet += STREAM_POLL_S
        if quiet >= STREAM_PING_S:
            quiet = 0.0
            yield ": ping\n\n"


def _run_facts(folder: Path, roots: Roots) -> dict:
    """What a run's page updates when its status or checkpoints change: the facts, and the
    checkpoints and summary tables as HTML (rendered here, escaped, like the page itself)."""
    info = run_info(folder, roots, with_records=True)
    return {"status": info["status"], "steps": pages.fmt(info["steps"]),
            "best": pages.best_metric(info), "duration": pages.duration(info["duration_s"]),
            "checkpoints_html": pages.checkpoints_table(info["checkpoints"]),
            "summary_html": pages.summary_table(info["summary"])}


def _config_of(folder: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _linked_upload(ctx: StudioContext, row: dict, folder: Path) -> Path:
    """The uploaded blob under its own file name in ``folder``: the data readers go by the
    extension, and problems are reported as ``NAME:LINE``."""
    blob = FileStore(ctx.jobs_dir).path(row["sha256"])
    if not blob.is_file():
        raise TuneforgeError(f"the content of {row['filename']} ({row['id']}) is missing from "
                             f"{blob.parent}")
    link = folder / Path(row["filename"]).name
    os.symlink(blob, link)
    return link


def _check_upload(ctx: StudioContext, row: dict) -> dict:
    """``tuneforge data check`` of an uploaded file, as a dict (problems named by file:line)."""
    from tuneforge.data.validate import check_data

    with tempfile.TemporaryDirectory(prefix="tuneforge-studio-") as tmp:
        report = check_data(_linked_upload(ctx, row, Path(tmp)))
        data = json.loads(report.to_json())
    for problem in data["problems"]:
        problem["source"] = Path(problem["source"]).name
    return data


_report_lock = threading.Lock()


def _quality_report(ctx: StudioContext, row: dict) -> Path:
    """The data quality report (tuneforge/data/report.py) of an upload, built once per content
    under JOBS_DIR/studio/reports/SHA256/ (written aside, then renamed into place)."""
    from tuneforge.data.report import write_report

    final = ctx.jobs_dir / "studio" / "reports" / row["sha256"]
    if (final / "report.html").is_file():
        return final / "report.html"
    final.parent.mkdir(parents=True, exist_ok=True)
    with _report_lock, tempfile.TemporaryDirectory(prefix="tuneforge-studio-") as tmp:
        if (final / "report.html").is_file():
            return final / "report.html"
        out = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
        try:
            write_report(_linked_upload(ctx, row, Path(tmp)), out, title=row["filename"])
            os.replace(out, final)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return final / "report.html"
