"""The FastAPI app: the JSON API (/health, /api/v1/…), the page (/), and its safety rails.

Every refused input is a 4xx JSON `{"error": "one line"}`; anything else that goes wrong is a
500 `{"error": "internal error"}` with the traceback in the server log only. Compute runs in two
bounded queues (predict; attack + certify): past their caps a request gets 429 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from histoshield.errors import HistoshieldError
from histoshield.serve.jobs import Busy, Cancelled, Job, JobQueue
from histoshield.serve.service import Limits, Loaded, Service
from histoshield.serve.uploads import UploadError, decode_upload

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("histoshield.serve")


class ApiError(Exception):
    """An error answered with `status` and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is parsed (by
    Content-Length, and by counting for chunked bodies), so no upload is spooled to disk."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0
        started = answered = False

        async def counted() -> dict:
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # answer now, and tell the app the client left: it stops reading, and
                    # whatever it answers to that is dropped (FastAPI turns a failed form
                    # parse into its own 400, so raising here would not reach the client)
                    if not started and not answered:
                        answered = True
                        await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            if answered:
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        await self.app(scope, counted, tracked)


async def _too_large(send: Any, limit: int) -> None:
    resp = JSONResponse({"error": f"request body over the {limit:,}-byte limit"}, status_code=413)
    await resp({"type": "http"}, None, send)


def create_app(models: list[Loaded], limits: Limits | None = None) -> FastAPI:
    """The web app for these loaded models (`service.load_models`) and limits."""
    limits = limits or Limits()
    service = Service(models, limits)
    service.examples()  # rendered once at startup (about 2 s), not on the first page view
    fast = JobQueue("predict", workers=limits.predict_workers, max_pending=limits.max_predicts)
    slow = JobQueue("attack", workers=limits.attack_workers, max_pending=limits.max_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        fast.shutdown()
        slow.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="histoshield",
        version=_version(),
        description=(
            "Predict, attack and certify breast-cancer histopathology tiles with the loaded "
            "histoshield models. Images are uploaded as multipart `file` (PNG, JPEG or TIFF) "
            "and returned as base64 PNG. Errors are JSON `{\"error\": \"...\"}`: 4xx for bad "
            "input, 429 when the queue is full."
        ),
    )
    app.state.service, app.state.queues = service, (fast, slow)
    # the multipart body may carry form fields around the file: a little room over the file cap
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes + 64_000)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HistoshieldError)
    async def _bad_input(request: Request, e: HistoshieldError) -> JSONResponse:
        status = getattr(e, "status", 400)
        return JSONResponse({"error": " ".join(str(e).split())}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_line(e)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal error (the server log has the details)"}, status_code=500
        )

    async def run(queue: JobQueue, kind: str, fn: Any, *, wait: bool = True) -> Any:
        try:
            job = queue.submit(kind, fn, deadline_s=limits.job_seconds)
        except Busy as e:
            raise ApiError(429, str(e)) from None
        if not wait:
            return JSONResponse(job.to_dict(), status_code=202)
        try:
            return await asyncio.wrap_future(job.future)
        except Cancelled as e:
            raise ApiError(409, str(e)) from None

    async def tile_of(file: UploadFile) -> Any:
        data = await file.read(limits.max_upload_bytes + 1)
        decode = lambda job: decode_upload(  # noqa: E731
            data, file.filename, max_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_pixels, size=limits.tile_size,
        )  # fmt: skip
        try:
            return await run(fast, "decode", decode)
        except UploadError as e:
            raise ApiError(e.status, " ".join(str(e).split())) from None

    # ---- the page --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/app.js", include_in_schema=False)
    async def script() -> FileResponse:
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    # ---- API -------------------------------------------------------------------------------
    @app.get("/health", summary="Liveness: models loaded, queue load")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(service.models),
            "queues": {q.name: {"pending": q.pending, "max": q.max_pending} for q in (fast, slow)},
        }

    @app.get("/api/v1/models", summary="The loaded models, the attacks on offer and the limits")
    async def list_models() -> dict[str, Any]:
        return {
            "models": [m.info() for m in service.models.values()],
            "attacks": service.attacks(),
            "limits": limits.to_dict(),
        }

    @app.get("/api/v1/examples", summary="Bundled synthetic example tiles")
    async def examples() -> dict[str, Any]:
        ex = await run(fast, "examples", lambda job: service.examples())
        return {"examples": [{"id": e["id"], "label": e["label"],
                              "url": f"/api/v1/examples/{e['id']}.png"} for e in ex]}  # fmt: skip

    @app.get("/api/v1/examples/{index}.png", summary="One example tile as PNG")
    async def example_png(index: int) -> Response:
        ex = await run(fast, "examples", lambda job: service.examples())
        if not 0 <= index < len(ex):
            raise ApiError(404, f"no example {index}: there are {len(ex)} (0 to {len(ex) - 1})")
        return Response(ex[index]["png"], media_type="image/png")

    @app.post("/api/v1/predict", summary="Each model's class and p(malignant) for one tile")
    async def predict(file: UploadFile = File(..., description="PNG, JPEG or TIFF tile")) -> Any:
        tile = await tile_of(file)
        return await run(fast, "predict", lambda job: service.predict(tile))

    @app.post("/api/v1/attack", summary="Attack one tile; every model scores the result")
    async def attack(
        file: UploadFile = File(..., description="PNG, JPEG or TIFF tile"),
        attack: str = Form(..., description="registry name or spec, e.g. fgsm, pgd:loss=ce"),
        eps: str = Form(..., description="radius in pixel units, e.g. 2/255"),
        steps: int | None = Form(None, description="iterations (iterative attacks)"),
        seed: int | None = Form(None, description="seed of random starts (default 0)"),
        model: str | None = Form(None, description="model to attack (default: the first)"),
        wait: bool = Form(True, description="false: answer 202 with a job to poll"),
        gradcam: bool = Form(True, description="false: skip the two Grad-CAM maps"),
    ) -> Any:
        req = service.parse_attack(attack, eps, steps, seed, model)  # 4xx before any compute
        req["gradcam"] = gradcam
        tile = await tile_of(file)
        return await run(slow, "attack", lambda job: service.attack(tile, req, job), wait=wait)

    @app.post("/api/v1/certify", summary="Randomized-smoothing prediction and certified radius")
    async def certify(
        file: UploadFile = File(..., description="PNG, JPEG or TIFF tile"),
        sigma: float | None = Form(None, description="noise std (default: the model's)"),
        n: int = Form(1000, description="Monte-Carlo samples for the bound"),
        n0: int = Form(64, description="samples to pick the class"),
        alpha: float = Form(0.001, description="failure probability"),
        model: str | None = Form(None, description="default: the Gaussian-noise model"),
        wait: bool = Form(True, description="false: answer 202 with a job to poll"),
    ) -> Any:
        req = service.parse_certify(sigma, n, n0, alpha, model)
        tile = await tile_of(file)
        return await run(slow, "certify", lambda job: service.certify(tile, req, job), wait=wait)

    @app.get("/api/v1/jobs/{job_id}", summary="A job's status, progress and (when done) result")
    async def job_status(job_id: str) -> dict[str, Any]:
        return _job(slow, job_id).to_dict()

    @app.post("/api/v1/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
    async def cancel(job_id: str) -> dict[str, Any]:
        job = _job(slow, job_id)
        if job.status in ("queued", "running"):
            job.cancel_event.set()
        return job.to_dict(with_result=False)

    return app


def _job(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while only)")
    return job


def _validation_line(e: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: 'missing form field file'."""
    parts = []
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "request"
        if err.get("type") == "missing":
            parts.append(f"missing field {where!r}")
        else:
            parts.append(f"bad field {where!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _version() -> str:
    from histoshield import __version__

    return __version__
