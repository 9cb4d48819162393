"""The files and fine-tuning jobs endpoints, in OpenAI's shapes, as a router on the serve app.

``/v1/files`` (upload with ``purpose=fine-tune``, list, retrieve, delete, content) and
``/v1/fine_tuning/jobs`` (create, list, retrieve, cancel, pause, resume, events, checkpoints).
The app's API keys, rate limits and body limits apply (uploads have their own size limit, 413
past it); every file, job and fine-tuned model belongs to the key that made it, and another
key asking for it gets 404, as if it did not exist. What can be known when a job is created is
checked then (400 in OpenAI's error shape): the base model, the file ids, the hyperparameters'
ranges, the method against the file's format. The files' content is checked by a worker, as
``tuneforge data check`` checks it (status ``validating_files``).

Beyond OpenAI's fields, a job may carry ``adapter`` (e.g. ``extra_body={"adapter": {"method":
"lora", "r": 16}}`` with the openai client): what is trained, as in a run config's ``adapter``
section (lora by default).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tuneforge.config import METHODS, TrainConfig, load_config
from tuneforge.errors import ConfigError, DataError
from tuneforge.jobs.files import FileStore, TooLarge, check_filename, sniff_format
from tuneforge.jobs.store import ACTIVE, JobStore
from tuneforge.serve.protocol import APIError

PURPOSE = "fine-tune"
SFT_FORMATS = ("prompt_completion", "chat", "alpaca", "classification")
METHOD_FORMATS = {"supervised": SFT_FORMATS, "dpo": ("preference",)}
"""The data formats each method trains on (tuneforge/data/formats.py names)."""
RECIPES = {"supervised": "sft", "dpo": "dpo"}
DEFAULT_LR = TrainConfig.lr
"""The learning rate that ``learning_rate_multiplier`` scales (the recipes' default)."""
# name: (type, lowest, highest, whether the lowest is allowed, the value of "auto")
HYPERPARAMETERS = {
    "n_epochs": (int, 1, 50, True, 3),
    "batch_size": (int, 1, 256, True, 8),
    "learning_rate_multiplier": (float, 0.0, 10.0, False, 1.0),
    "beta": (float, 0.0, 2.0, False, 0.1),
}
METHOD_HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                          "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
DEFAULT_ADAPTER = {"method": "lora", "r": 16, "alpha": 32}
CREATE_FIELDS = {"model", "training_file", "validation_file", "suffix", "seed", "method",
                 "hyperparameters", "integrations", "metadata", "adapter"}
SUFFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def fine_tuned_name(job: dict) -> str:
    """``ft:<base>:<suffix>:<job id>``, the name a succeeded job's model is served under."""
    return f"ft:{job['model']}:{job['suffix'] or ''}:{job['id']}"


class FineTunedModels:
    """The serve app's source of fine-tuned adapters: the key's succeeded jobs on the server's
    base model (see :class:`tuneforge.serve.engine.AdapterSource`)."""

    def __init__(self, store: JobStore, jobs_dir: Path, base_id: str) -> None:
        self.store, self.jobs_dir, self.base_id = store, Path(jobs_dir), base_id

    def adapter_for(self, model_id: str, key_id: str | None) -> Path | None:
        if not model_id.startswith("ft:"):
            return None
        job = self.store.succeeded_job_for_model(model_id)
        if job is None or job["owner"] != key_id or job["model"] != self.base_id:
            return None
        return run_folder(self.jobs_dir, job["id"])

    def model_ids(self, key_id: str | None) -> list[str]:
        return [j["fine_tuned_model"] for j in self.store.models_of(key_id or "")
                if j["model"] == self.base_id]


def job_folder(jobs_dir: Path, job_id: str) -> Path:
    return Path(jobs_dir) / "runs" / job_id


def run_folder(jobs_dir: Path, job_id: str) -> Path:
    """The job's run folder (its ``tuneforge train`` output_dir)."""
    return job_folder(jobs_dir, job_id) / "run"


# ----------------------------------------------------------------------------- bodies


def file_body(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None}


def job_body(job: dict) -> dict:
    kind = job["method"]["type"]
    hyper = job["hyperparameters"]
    return {
        "object": "fine_tuning.job", "id": job["id"], "model": job["model"],
        "created_at": job["created_at"], "finished_at": job["finished_at"],
        "fine_tuned_model": job["fine_tuned_model"], "organization_id": job["owner"],
        "result_files": job["result_files"], "status": job["status"],
        "validation_file": job["validation_file"], "training_file": job["training_file"],
        "hyperparameters": {k: hyper[k] for k in METHOD_HYPERPARAMETERS["supervised"]},
        "trained_tokens": job["trained_tokens"], "error": job["error"], "seed": job["seed"],
        "estimated_finish": None, "integrations": [], "metadata": None,
        "method": {"type": kind, kind: {"hyperparameters": hyper}},
        "user_provided_suffix": job["suffix"], "adapter": job["adapter"],
    }


def event_body(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"] or {},
            "type": row["type"]}


def checkpoint_body(row: dict) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"],
            "created_at": row["created_at"], "fine_tuned_model_checkpoint": row["model"],
            "fine_tuning_job_id": row["job_id"], "metrics": row["metrics"],
            "step_number": row["step"]}


def page(rows: list[dict], more: bool, body) -> dict:
    data = [body(r) for r in rows]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# ----------------------------------------------------------------------------- checks


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _not_found(kind: str, ident: str, param: str) -> APIError:
    return APIError(404, f"No {kind} found with id {ident!r}", param=param, code="not_found")


def _limit(value: str | None, default: int, highest: int = 100) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= highest:
        raise _bad(f"limit must be an integer within 1..{highest} (got {value!r})", "limit")
    return int(value)


def resolve_hyperparameters(kind: str, given: Any) -> dict:
    """The method's hyperparameters with "auto" (or absent) resolved; 400 for anything else
    than a number in range."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise _bad("hyperparameters must be an object", f"method.{kind}.hyperparameters")
    allowed = METHOD_HYPERPARAMETERS[kind]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise _bad(f"unknown hyperparameter(s) for a {kind} job: {', '.join(unknown)}; known: "
                   f"{', '.join(allowed)}", f"method.{kind}.hyperparameters.{unknown[0]}")
    out = {}
    for name in allowed:
        kind_of, low, high, low_ok, auto = HYPERPARAMETERS[name]
        value = given.get(name, "auto")
        param = f"method.{kind}.hyperparameters.{name}"
        if value == "auto" or value is None:
            out[name] = auto
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind_of is int and value != int(value)):
            raise _bad(f"{name} must be {'an integer' if kind_of is int else 'a number'} or "
                       f"'auto' (got {value!r})", param)
        in_range = (low <= value if low_ok else low < value) and value <= high
        if not in_range:
            bound = "[" if low_ok else "("
            raise _bad(f"{name} must be within {bound}{low:g}, {high:g}] (got {value!r})", param)
        out[name] = kind_of(value)
    return out


def check_adapter(adapter: Any, recipe: str, model: str) -> dict:
    """The ``adapter`` section, checked by the run config's own rules (400 naming the key)."""
    if adapter is None:
        return dict(DEFAULT_ADAPTER)
    if not isinstance(adapter, dict):
        raise _bad(f"adapter must be an object such as {json.dumps(DEFAULT_ADAPTER)}", "adapter")
    merged = {**DEFAULT_ADAPTER, **adapter} if adapter.get("method", "lora") == "lora" else adapter
    if merged.get("method") not in METHODS:
        raise _bad(f"adapter.method must be one of {', '.join(METHODS)} (got "
                   f"{merged.get('method')!r})", "adapter.method")
    try:
        load_config(None, base={"recipe": recipe, "model": {"name": model}, "adapter": merged,
                                "data": {"train": "train.jsonl"}})
    except ConfigError as err:
        raise _bad(str(err), "adapter") from None
    return merged


# ----------------------------------------------------------------------------- the router


def jobs_router(store: JobStore, jobs_dir: str | Path, base_models: list[str]) -> APIRouter:
    """The ``/v1/files`` and ``/v1/fine_tuning/jobs`` endpoints; jobs may fine-tune the models
    in ``base_models``."""
    jobs_dir = Path(jobs_dir)
    files = FileStore(jobs_dir)
    router = APIRouter()

    def caller(request: Request, endpoint: str) -> str:
        """Authorize the request (as every /v1 endpoint does); the caller's key id."""
        record = request.scope["state"]["record"]
        record.endpoint = endpoint
        request.app.state.server.authorize(request, record)
        return record.key

    def own_file(file_id: str, owner: str, param: str = "file_id") -> dict:
        row = store.get_file(file_id, owner)
        if row is None:
            raise _not_found("file", file_id, param)
        return row

    def own_job(job_id: str, owner: str) -> dict:
        job = store.get_job(job_id, owner)
        if job is None:
            raise _not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return job

    # ------------------------------------------------------------------------- files

    @router.post("/v1/files")
    async def upload_file(request: Request) -> dict:
        owner = caller(request, "/v1/files")
        limit = request.app.state.server.settings.max_upload_bytes
        try:
            form = await request.form(max_files=1, max_fields=4)
        except (AssertionError, ValueError) as err:  # starlette's MultiPartException is a ValueError
            raise _bad(f"expected a multipart/form-data body with 'file' and 'purpose': {err}",
                       "file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose != PURPOSE:
                raise _bad(f"purpose must be {PURPOSE!r} (got {purpose!r})", "purpose")
            if not isinstance(upload, UploadFile):
                raise _bad("file: expected an uploaded file (multipart field 'file')", "file")
            try:
                filename = check_filename(upload.filename or "")
            except DataError as err:
                raise _bad(str(err), "file") from None
            row = await run_in_threadpool(_store_upload, store, files, upload, owner, filename,
                                          limit)
        finally:
            await form.close()
        return file_body(row)

    @router.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                   limit: str | None = None, order: str = "desc") -> dict:
        owner = caller(request, "/v1/files")
        if order not in ("asc", "desc"):
            raise _bad(f"order must be 'asc' or 'desc' (got {order!r})", "order")
        rows, more = store.list_files(owner, purpose=purpose, after=after,
                                      limit=_limit(limit, 100, 10_000), order=order)
        return page(rows, more, file_body)

    @router.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, request: Request) -> dict:
        return file_body(own_file(file_id, caller(request, "/v1/files/{id}")))

    @router.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request) -> dict:
        owner = caller(request, "/v1/files/{id}")
        with files.locked():
            row = store.delete_file(file_id, owner)
            if row is None:
                raise _not_found("file", file_id, "file_id")
            files.remove_if_unused(row["sha256"], store.blob_in_use(row["sha256"]))
        return {"id": file_id, "object": "file", "deleted": True}

    @router.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, request: Request):
        row = own_file(file_id, caller(request, "/v1/files/{id}/content"))
        return FileResponse(files.path(row["sha256"]), media_type="application/octet-stream",
                            filename=row["filename"])

    # ------------------------------------------------------------------------- jobs

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict:
        owner = caller(request, "/v1/fine_tuning/jobs")
        body = await request.app.state.server.read_json(request)
        fields = await run_in_threadpool(_job_fields, body, owner, store, base_models)
        job = await run_in_threadpool(lambda: store.create_job(owner, **fields))
        await run_in_threadpool(store.add_event, job["id"],
                                f"Created fine-tuning job: {job['id']}")
        return job_body(job)

    @router.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: str | None = None) -> dict:
        owner = caller(request, "/v1/fine_tuning/jobs")
        rows, more = store.list_jobs(owner, after=after, limit=_limit(limit, 20))
        return page(rows, more, job_body)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str, request: Request) -> dict:
        return job_body(own_job(job_id, caller(request, "/v1/fine_tuning/jobs/{id}")))

    def change(request: Request, job_id: str, action: str, new: str, only_from: tuple[str, ...],
               message: str, **values) -> dict:
        owner = caller(request, f"/v1/fine_tuning/jobs/{{id}}/{action}")
        job = store.set_status(job_id, new, only_from=only_from, owner=owner, **values)
        if job is None:
            current = own_job(job_id, owner)
            raise _bad(f"cannot {action} job {job_id}: it is {current['status']} (only a job "
                       f"that is {' or '.join(only_from)} can be)", "fine_tuning_job_id",
                       code="invalid_state")
        store.add_event(job_id, message)
        return job_body(job)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, request: Request) -> dict:
        return change(request, job_id, "cancel", "cancelled", ACTIVE, "Job cancelled",
                      finished_at=int(time.time()))

    @router.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, request: Request) -> dict:
        return change(request, job_id, "pause", "paused", ("queued", "running"),
                      "Job paused; its checkpoints are kept")

    @router.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, request: Request) -> dict:
        return change(request, job_id, "resume", "queued", ("paused",),
                      "Job resumed; queued to continue from its last checkpoint")

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, request: Request, after: str | None = None,
                    limit: str | None = None) -> dict:
        own_job(job_id, caller(request, "/v1/fine_tuning/jobs/{id}/events"))
        rows, more = store.list_events(job_id, after=after, limit=_limit(limit, 20, 1000))
        return page(rows, more, event_body)

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                         limit: str | None = None) -> dict:
        own_job(job_id, caller(request, "/v1/fine_tuning/jobs/{id}/checkpoints"))
        rows, more = store.list_checkpoints(job_id, after=after, limit=_limit(limit, 10))
        return page(rows, more, checkpoint_body)

    return router


def _store_upload(store: JobStore, files: FileStore, upload: UploadFile, owner: str,
                  filename: str, limit: int) -> dict:
    """Copy the parsed upload into the content-addressed store and record it."""
    out = files.begin()
    try:
        upload.file.seek(0)
        while chunk := upload.file.read(1 << 20):
            out.write(chunk, limit)
        with files.locked():
            digest, path = out.commit()
            fmt = sniff_format(path, filename)
            return store.add_file(owner, filename, PURPOSE, out.size, digest, fmt)
    except TooLarge:
        raise APIError(413, f"The file is over {limit} bytes, this server's upload limit",
                       param="file", code="file_too_large") from None
    finally:
        out.discard()


def _job_fields(body: Any, owner: str, store: JobStore, base_models: list[str]) -> dict:
    """The create request checked and resolved into the job's columns (400s otherwise)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise _bad(f"unknown parameter(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or model not in base_models:
        raise _bad(f"model {model!r} cannot be fine-tuned on this server; it fine-tunes "
                   f"{', '.join(base_models)}", "model", "model_not_available")
    method = body.get("method") or {"type": "supervised"}
    kind = method.get("type") if isinstance(method, dict) else None
    if kind not in METHOD_FORMATS:
        raise _bad(f"method.type must be one of {', '.join(METHOD_FORMATS)} (got {kind!r})",
                   "method.type")
    section = method.get(kind) or {}
    given = section.get("hyperparameters") if isinstance(section, dict) else None
    if given is None and kind == "supervised":
        given = body.get("hyperparameters")  # OpenAI's older place for them
    hyper = resolve_hyperparameters(kind, given)
    if body.get("integrations"):
        raise _bad("integrations are not supported; give the adapter as 'adapter'",
                   "integrations")
    adapter = check_adapter(body.get("adapter"), RECIPES[kind], model)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not 1 <= len(suffix) <= 40
                               or set(suffix) - SUFFIX_CHARS):
        raise _bad("suffix must be 1 to 40 letters, digits and -_. characters", "suffix")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise _bad(f"seed must be an integer within 0..2147483647 (got {seed!r})", "seed")
    for param in ("training_file", "validation_file"):
        file_id = body.get(param)
        if file_id is None and param == "validation_file":
            continue
        if not isinstance(file_id, str):
            raise _bad(f"{param} must be a file id", param)
        row = store.get_file(file_id, owner)
        if row is None:
            raise _bad(f"{param}: no file with id {file_id!r} (upload it with purpose "
                       f"'{PURPOSE}' first)", param, "invalid_file_id")
        wanted = METHOD_FORMATS[kind]
        if row["format"] is not None and row["format"] not in wanted:
            raise _bad(f"{param} {file_id} ({row['filename']}) holds {row['format']} records, "
                       f"which cannot train a {kind} job; it needs {' or '.join(wanted)} "
                       "records", param, "invalid_file_format")
    return {"model": model, "training_file": body["training_file"],
            "validation_file": body.get("validation_file"), "suffix": suffix, "seed": seed,
            "method": {"type": kind}, "hyperparameters": hyper, "adapter": adapter}


def create_jobs_app(models, store: JobStore, jobs_dir: str | Path, settings=None, keys=None,
                    base_models: list[str] | None = None):
    """The serve app for ``models`` with the jobs router; a succeeded job's model is served by
    it from then on. Jobs may fine-tune the served base model and ``base_models``."""
    from tuneforge.serve.app import create_app

    models.source = FineTunedModels(store, jobs_dir, models.base_id)
    allowed = [models.base_id, *[m for m in base_models or [] if m != models.base_id]]
    return create_app(models, settings, keys, routers=[jobs_router(store, jobs_dir, allowed)])
