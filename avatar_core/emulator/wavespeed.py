"""WaveSpeed AI's protocol (PROVIDERS.md, "WaveSpeed AI"), served by the emulator core.

- ``Authorization: Bearer <key>``; every answer is the envelope
  ``{"code", "message", "data"}``.
- ``POST /api/v3/{model}`` submits (optionally ``enable_sync_mode`` and ``?webhook=``);
  ``GET /api/v3/predictions/{id}/result`` polls.
- Uploads: ``POST /api/v3/media/upload/binary`` (multipart ``file``) and the two-step
  ``POST /api/v3/media/uploads`` + presigned ``PUT``.

Unconfirmed points, kept here in one place:

- the 4xx body shape (:func:`error_body`): ``{"code": <http status>, "message": ...}``;
- an unknown or expired prediction id: HTTP 404 with that body;
- a sync-mode timeout (:data:`SYNC_TIMEOUT_CODE`): HTTP 200, envelope ``code`` 5004,
  ``data`` as for a poll with ``status: "processing"``;
- ``data.type`` of an upload: the MIME major type (``"image"``, ``"audio"``, ...).
- The webhook URL is recorded on the job (``job.webhook``) but not called.
"""

from __future__ import annotations

import secrets
from typing import Any

from .server import (
    COMPLETED,
    EXPIRED,
    FAILED,
    PROCESSING,
    QUEUED,
    Context,
    Job,
    Protocol,
    Response,
    guess_type,
    json_response,
    upload_limit,
)

MODELS = {
    "kwaivgi/kling-v1-ai-avatar-standard": "standard",
    "kwaivgi/kling-v1-ai-avatar-pro": "pro",
    "kwaivgi/kling-v2-ai-avatar-standard": "standard",
    "kwaivgi/kling-v2-ai-avatar-pro": "pro",
}

STATUS_WORDS = {QUEUED: "created", PROCESSING: "processing", COMPLETED: "completed", FAILED: "failed"}

# The code WaveSpeed puts in the envelope when a sync-mode request outlives its wait.
SYNC_TIMEOUT_CODE = 5004


def error_body(status: int, message: str) -> dict[str, Any]:
    """WaveSpeed's error body (shape *unconfirmed*; kept in this one place)."""
    return {"code": status, "message": message}


class WaveSpeedProtocol(Protocol):
    name = "wavespeed"
    prefixes = ("/api/v3/",)

    def routes(self):
        return [
            ("POST", r"/api/v3/media/upload/binary", self.upload_binary),
            ("POST", r"/api/v3/media/uploads", self.upload_presigned),
            ("GET", r"/api/v3/predictions/(?P<id>[^/]+)/result", self.result),
            ("POST", r"/api/v3/(?P<model>[^/]+/[^/]+)", self.submit),
        ]

    def error(self, status: int, message: str) -> Response:
        return json_response(status, error_body(status, message))

    def app_error(self, message: str) -> Response:
        # HTTP 200 whose envelope says 500: the client must read "code", not the HTTP status.
        return json_response(200, {"code": 500, "message": message})

    def env_lines(self, base_url: str) -> list[str]:
        return [f"WAVESPEED_BASE_URL={base_url}", "WAVESPEED_API_KEY=emulator-key"]

    # -- helpers ----------------------------------------------------------------------

    def _authorized(self, ctx: Context) -> bool:
        value = ctx.request.header("authorization") or ""
        scheme, _sp, key = value.partition(" ")
        return scheme.lower() == "bearer" and self.emu.check_key(self.name, key.strip())

    def _ok(self, data: dict[str, Any]) -> Response:
        return json_response(200, {"code": 200, "message": "success", "data": data})

    def job_data(self, job: Job, phase: str) -> dict[str, Any]:
        done = phase == COMPLETED
        return {
            "id": job.id,
            "model": job.model,
            "outputs": [self.emu.video_url(job)] if done else [],
            "urls": {"get": f"{self.emu.url}/api/v3/predictions/{job.id}/result"},
            "has_nsfw_contents": [False] if done else [],
            "status": job.plan.status_value or STATUS_WORDS[phase],
            "created_at": job.created_at_iso,
            "error": (job.failure or "") if phase == FAILED else "",
            "timings": {"inference": round(job.inference_s * 1000) if done else 0},
        }

    # -- jobs -------------------------------------------------------------------------

    def submit(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Unauthorized")
        model = ctx.match["model"]
        tier = MODELS.get(model)
        if tier is None:
            return self.error(404, f"Model {model} not found")
        body = ctx.request.json
        missing = self.missing_fields(body, ("image", "audio"))
        if missing is None:
            return self.error(400, "The request body must be a JSON object")
        if missing:
            return self.error(400, f"Missing required field(s): {', '.join(missing)}")
        job = self.emu.create_job(
            self.name,
            model,
            tier,
            {"image": body["image"], "audio": body["audio"]},
            webhook=ctx.request.param("webhook"),
        )
        job.extra["prompt"] = body.get("prompt")
        if body.get("enable_sync_mode"):
            phase = self.emu.wait_for_job(job, self.emu.sync_timeout_s)
            if phase in (QUEUED, PROCESSING):
                data = self.job_data(job, PROCESSING)
                return json_response(
                    200,
                    {"code": SYNC_TIMEOUT_CODE, "message": "Sync mode timed out; poll urls.get", "data": data},
                )
            return self._ok(self.job_data(job, phase))
        return self._ok(self.job_data(job, QUEUED))

    def result(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Unauthorized")
        job = self.emu.jobs.get(ctx.match["id"])
        if job is None or job.protocol != self.name:
            return self.error(404, "Prediction not found")
        phase = job.phase(self.emu.now(), self.emu.retention_s)
        if phase == EXPIRED:
            return self.error(404, "Prediction not found")
        return self._ok(self.job_data(job, phase))

    # -- uploads ----------------------------------------------------------------------

    def _check_size(self, size: int, content_type: str) -> Response | None:
        limit = upload_limit(content_type)
        if size > limit:
            kind = "images" if content_type.startswith("image/") else "files"
            return self.error(400, f"File too large: {size} bytes; the limit for {kind} is {limit // 2**20} MB")
        return None

    def _upload_data(self, file) -> dict[str, Any]:
        return {
            "type": file.content_type.split("/")[0],
            "download_url": self.emu.file_url(file),
            "filename": file.filename,
            "size": len(file.data) if file.data is not None else file.declared_size,
        }

    def upload_binary(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Unauthorized")
        part = next((p for p in ctx.request.form if p.name == "file"), None)
        if part is None:
            return self.error(400, "Missing multipart field 'file'")
        content_type = guess_type(part.filename, part.content_type)
        too_big = self._check_size(part.size, content_type)
        if too_big:
            return too_big
        file = self.emu.store_file(part.data, part.filename or "file", content_type)
        return self._ok(self._upload_data(file))

    def upload_presigned(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Unauthorized")
        body = ctx.request.json
        if not isinstance(body, dict) or not body.get("filename"):
            return self.error(400, "Send JSON with filename, size and content_type")
        filename = str(body["filename"])
        content_type = guess_type(filename, body.get("content_type"))
        try:
            size = int(body.get("size") or 0)
        except (TypeError, ValueError):
            return self.error(400, "size must be a number of bytes")
        too_big = self._check_size(size, content_type)
        if too_big:
            return too_big
        token = secrets.token_hex(8)
        file = self.emu.store_file(None, filename, content_type, declared_size=size, put_token=token)
        data = self._upload_data(file)
        data["upload"] = {
            "method": "PUT",
            "url": f"{self.emu.url}/emulator/uploads/{file.id}?token={token}",
            "headers": {"Content-Type": content_type},
        }
        return self._ok(data)
