"""The FastAPI app of `maisi serve`: the MAISI NIM's endpoints (docs.nvidia.com/nim/medical/maisi/latest/
api-reference.html) and asynchronous jobs, over one worker thread and the SQLite job store under --data.

GET / is a web page (page.html: plain HTML and a little JavaScript) over the job endpoints.
NIM endpoints: GET /v1/health/live, GET /v1/health/ready (200 {"status": "ready"} once the networks are loaded,
503 before), GET /v1/license, GET /v1/maisi/info, POST /v1/maisi/run (synchronous: a ZIP of the generated files,
or, with local_working_dir, a JSON message naming the files written there). Jobs: POST /v1/jobs (the same
payload) → 202 {"id", ...}; GET /v1/jobs/{id}; GET /v1/jobs/{id}/files/{name}; DELETE /v1/jobs/{id} (cancel).

Every refusal is a JSON {"detail": ...}; a bad field answers 422 with FastAPI's shape, {"detail": [{"loc": ["body",
FIELD], "msg": ..., "type": "value_error"}]}.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import stat
import uuid
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from maisi_cli.errors import MaisiError, OutputError, UsageError
from maisi_cli.serve.jobs import FINISHED, JobStore, QueueFull
from maisi_cli.serve.nim import PayloadError, ServeSettings, generate_request, parse_payload, payload_error
from maisi_cli.serve.worker import Worker

DB_NAME = "maisi-serve.db"
JOBS_FOLDER = "jobs"
DEFAULT_MAX_BODY = 64 * 1024  # a NIM payload is a few hundred bytes
DEFAULT_MAX_QUEUE = 64
SYNC_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings beyond the generation's: where it keeps its data and who may call it."""
    data: Path
    token: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = DEFAULT_MAX_BODY
    # Host names a request may name (None: any). `maisi serve` without a token sets the loopback names, so a web page
    # elsewhere cannot reach the server through a name it re-resolves to 127.0.0.1 (DNS rebinding).
    allowed_hosts: tuple[str, ...] | None = None


def field_error(field: str, message: str, status: int = 422) -> JSONResponse:
    if status == 422:
        return JSONResponse({"detail": [{"loc": ["body", field], "msg": f"{field}: {message}",
                                         "type": "value_error"}]}, status_code=422)
    return JSONResponse({"detail": f"{field}: {message}"}, status_code=status)


class Guard:
    """ASGI middleware: the bearer token (401 without it) and the body-size limit (413), before any endpoint."""

    def __init__(self, app, token: str | None, max_body: int, allowed_hosts: tuple[str, ...] | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.split(":")[0]
            if name not in self.allowed_hosts:
                response = JSONResponse({"detail": f"Host: '{host}' is not this server's name; use "
                                         f"{sorted(self.allowed_hosts)[0]} (or give maisi serve --token)"},
                                        status_code=421)
                return await response(scope, receive, send)
        if self.token is not None and not self._authorised(headers.get(b"authorization", b"")):
            # The page asks the browser for the token (HTTP Basic, any user name): a browser then sends it with
            # every request of the page, its images and downloads included; API clients send a bearer token.
            challenge = 'Basic realm="maisi serve"' if scope.get("path") == "/" else "Bearer"
            response = JSONResponse({"detail": "Authorization: this server needs 'Authorization: Bearer TOKEN' "
                                     "(the token given to maisi serve)"}, status_code=401,
                                    headers={"WWW-Authenticate": challenge})
            return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        received = 0
        refused = False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True
                    raise _BodyTooLarge()
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)
        except Exception:
            if refused and not started:  # the endpoint wrapped our refusal
                await self._too_large(scope, receive, send)
            else:
                raise

    def _authorised(self, given: bytes) -> bool:
        scheme, _, value = given.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                value = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value.strip(), self.token)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"body: larger than this server's limit of {self.max_body} bytes "
                                 "(--max-body); a /v1/maisi/run payload is a few hundred bytes"}, status_code=413)
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def confined_folder(data: Path, value: str) -> Path:
    """`local_working_dir` as a folder inside `data` (relative to it, or absolute within it); PayloadError 403 for
    one outside it, through '..' or a link, or on the server's own files."""
    field = "local_working_dir"
    path = Path(value)
    if ".." in path.parts:
        raise PayloadError(field, f"'{value}' contains '..'; give a folder inside the server's --data folder", 403)
    target = path if path.is_absolute() else data / path
    try:
        relative = target.relative_to(data)
    except ValueError:
        raise PayloadError(field, f"'{value}' is outside the server's --data folder; give a folder inside it",
                           403) from None
    if not relative.parts or relative.parts[0] in (JOBS_FOLDER,) or relative.parts[0].startswith(DB_NAME):
        raise PayloadError(field, f"'{value}' is the server's own data; give another folder inside --data", 403)
    walked = data
    for part in relative.parts:  # a link anywhere on the way could lead out of --data
        walked = walked / part
        try:
            mode = os.lstat(walked).st_mode
        except FileNotFoundError:
            break
        if stat.S_ISLNK(mode):
            raise PayloadError(field, f"'{value}' goes through a link ({walked.name}); give a plain folder inside "
                               "--data", 403)
        if not stat.S_ISDIR(mode):
            raise PayloadError(field, f"'{value}': {walked.name} is not a folder", 422)
    return target


def job_member(folder: Path, name: str) -> Path | None:
    """The regular file `name` inside the job's `folder`, or None: '..', an absolute name, a link on the way, or
    anything but a regular file is never served."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name or "\x00" in name:
        return None
    path = folder
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            return None
    return path if stat.S_ISREG(mode) else None


def job_files(folder: Path) -> list[str]:
    """The regular files of a job folder (no links, no hidden files such as sample locks), relative, sorted."""
    found: list[str] = []
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(root, d))]
        for name in files:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def job_document(job: dict[str, Any]) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} answers it: state, progress, its files and the samples' sidecars."""
    folder = Path(job["out"])
    files = job_files(folder)
    sidecars = {}
    for name in files:
        if name.startswith("sample_") and name.endswith(".json") and "/" not in name:
            try:
                sidecars[name] = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue  # being written: the next poll has it
    return {"id": job["id"], "state": job["state"], "created": job["created"], "started": job["started"],
            "finished": job["finished"], "starts": job["starts"], "cancel_requested": job["cancel_requested"],
            "progress": job["progress"], "request": job["payload"], "result": job["result"], "error": job["error"],
            "files": files, "sidecars": sidecars}


def create_app(settings: ServeSettings, config: ServeConfig, generator: Any = None,
               start_worker: bool = True) -> FastAPI:
    """The app. `generator`: a maisi_cli.api.Generator (default: one for `settings`); `start_worker`: False leaves
    the queue unserved (tests of the queue itself)."""
    from maisi_cli import __version__
    from maisi_cli.labels import label_dictionary_of

    if generator is None:
        from maisi_cli.api import Generator

        generator = Generator(model=settings.model, profile=settings.profile, device=settings.device,
                              weights_dir=settings.weights_dir)
    data = Path(os.path.realpath(config.data))
    data.mkdir(parents=True, exist_ok=True)
    (data / JOBS_FOLDER).mkdir(exist_ok=True)
    store = JobStore(data / DB_NAME)
    worker = Worker(store, generator, settings)
    spec = generator.spec

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.recover()
        if start_worker:
            worker.start()
        try:
            yield
        finally:
            if start_worker:
                await run_in_threadpool(worker.stop)
            store.close()

    app = FastAPI(title="maisi serve", version=__version__, lifespan=lifespan,
                  description="The MAISI NIM's API, served by maisi, plus asynchronous jobs.")
    app.state.store = store
    app.state.worker = worker
    app.state.data = data
    app.add_middleware(Guard, token=config.token, max_body=config.max_body, allowed_hosts=config.allowed_hosts)

    @app.exception_handler(PayloadError)
    async def refused(request: Request, failure: PayloadError):
        return field_error(failure.field, failure.message, failure.status)

    page = (Path(__file__).parent / "page.html").read_bytes()

    @app.get("/", include_in_schema=False)
    def index():
        return Response(page, media_type="text/html; charset=utf-8")

    # --- the NIM's endpoints ------------------------------------------------------------------------------------
    @app.get("/v1/health/live")
    def live():
        return {"status": "live"}

    @app.get("/v1/health/ready")
    def ready():
        if worker.ready.is_set():
            return {"status": "ready"}
        detail = {"status": "not ready"}
        if worker.load_error:
            detail["error"] = worker.load_error
        return JSONResponse(detail, status_code=503)

    @app.get("/v1/license")
    def licence():
        return {"name": "maisi", "license": "Apache-2.0",
                "model": {"name": spec.name, "license": spec.licence or "see the model's repository"
                          + (f" ({spec.hf_repo})" if spec.hf_repo else "")}}

    @app.get("/v1/maisi/info")
    def info():
        return {"name": "maisi", "version": __version__, "model": spec.name, "description": spec.description,
                "modality": spec.modality, "default_size": list(spec.default_size),
                "default_steps": settings.steps or spec.default_steps,
                "labels": label_dictionary_of(getattr(spec, "label_dictionary", None), spec.name)}

    def accept(body: Any) -> str:
        """Check the payload, plan it (the model's size and spacing rules, the folder's earlier run) and queue it."""
        payload = parse_payload(body)
        if worker.load_error:  # nothing would ever run it
            raise PayloadError("model", f"the server could not load its networks ({worker.load_error}); fix "
                               "that and restart it", 503)
        job_id = uuid.uuid4().hex
        out = (confined_folder(data, payload.local_working_dir) if payload.local_working_dir is not None
               else data / JOBS_FOLDER / job_id)
        request = generate_request(payload, settings, spec.uses_body_region, out)
        try:
            from maisi_cli.engine.qc import QCOptions

            generator.plan_run(request, QCOptions(enabled=settings.qc, max_attempts=settings.max_attempts))
        except UsageError as failure:
            raise payload_error(failure, payload) from None
        except OutputError as failure:
            raise PayloadError("local_working_dir", str(failure), 409) from None
        except MaisiError as failure:
            raise payload_error(failure, payload) from None
        try:
            store.create(body, out, config.max_queue, job_id)
        except QueueFull as full:
            raise PayloadError("queue", f"full ({full}); retry later", 429) from None
        worker.wake()
        return job_id

    async def json_body(request: Request) -> Any:
        # JSON only: a page on another site can send a form or text/plain body without asking, not JSON
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise PayloadError("Content-Type", f"'{kind or 'none'}'; send the payload as application/json", 415)
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError:
            raise PayloadError("body", "is not JSON; send a JSON object with Content-Type: application/json") \
                from None

    @app.post("/v1/maisi/run")
    async def run(request: Request):
        body = await json_body(request)
        job_id = await run_in_threadpool(accept, body)
        job = await run_in_threadpool(worker.wait_finished, job_id, SYNC_TIMEOUT_S)
        if job is None or job["state"] != "done":
            state = job["state"] if job else "running"
            error = (job or {}).get("error") or state
            return JSONResponse({"detail": f"generation {state}: {error}", "job": job_id},
                                status_code=409 if state == "cancelled" else 500)
        folder = Path(job["out"])
        files = job_files(folder)
        if (job["payload"] or {}).get("local_working_dir") is not None:
            return {"message": f"{len(job['result']['written'])} sample(s) written, "
                               f"{len(job['result']['skipped'])} already complete, in local_working_dir",
                    "local_working_dir": job["payload"]["local_working_dir"], "files": files, "job": job_id}
        archive = await run_in_threadpool(zipped, folder, files, data / JOBS_FOLDER / f".{job_id}.zip")
        return FileResponse(archive, media_type="application/zip", filename=f"maisi-{job_id}.zip",
                            background=BackgroundTask(archive.unlink, missing_ok=True))

    # --- jobs ---------------------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request):
        body = await json_body(request)
        job_id = await run_in_threadpool(accept, body)
        return {"id": job_id, "state": "queued", "url": f"/v1/jobs/{job_id}"}

    def found(job_id: str) -> dict[str, Any]:
        job = store.get(job_id)
        if job is None:
            raise PayloadError("id", f"no job '{job_id}'", 404)
        return job

    @app.get("/v1/jobs")
    def jobs():
        return {"jobs": [{"id": j["id"], "state": j["state"], "progress": j["progress"], "request": j["payload"],
                          "created": j["created"], "finished": j["finished"]} for j in store.list()],
                "counts": store.counts()}

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        return job_document(found(job_id))

    @app.get("/v1/jobs/{job_id}/files/{name:path}")
    def job_file(job_id: str, name: str):
        folder = Path(found(job_id)["out"])
        path = job_member(folder, name)
        if path is None:
            raise PayloadError("name", f"'{name}' is not a file of job {job_id}; GET /v1/jobs/{job_id} lists them",
                               404 if ".." not in Path(name).parts and not Path(name).is_absolute() else 403)
        return FileResponse(path, filename=Path(name).name)

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        job = found(job_id)
        if job["state"] in FINISHED:
            raise PayloadError("id", f"job {job_id} is already {job['state']}", 409)
        worker.cancel(job_id)
        return job_document(store.request_cancel(job_id))

    return app


def zipped(folder: Path, files: list[str], path: Path) -> Path:
    """The job's files in one ZIP at `path`, on disk rather than in memory (a 512^3 run's files are large);
    stored, since NIfTI .gz does not compress further. The answer streams it, then removes it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in files:
            archive.write(folder / name, name)
    return path
