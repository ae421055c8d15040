"""fal.ai's queue protocol (PROVIDERS.md, "fal.ai"), served by the emulator core.

- ``Authorization: Key <FAL_KEY>``; errors ``{"detail": ...}`` (plus ``error_type`` and
  the ``x-fal-error-type`` header where fal's side failed).
- ``POST /{endpoint}`` (the four Kling avatar endpoints) with ``{"image_url", "audio_url",
  "prompt"}`` -> ``{"request_id", "response_url", "status_url", "cancel_url"}``, whose URLs
  **drop the endpoint's sub-path**: ``/{owner}/{app}/requests/{id}``.
- ``GET .../requests/{id}/status[?logs=1]`` -> ``IN_QUEUE`` (``queue_position``) |
  ``IN_PROGRESS`` (``logs``) | ``COMPLETED`` (``logs``, ``metrics``, and ``error`` /
  ``error_type`` for a failed request); ``GET .../status/stream`` sends the same as
  server-sent events until COMPLETED.
- ``GET .../requests/{id}`` -> ``{"video": {url, content_type, file_name, file_size}, "duration"}``.
- ``PUT .../requests/{id}/cancel`` -> 202 ``CANCELLATION_REQUESTED``, 400 ``ALREADY_COMPLETED``,
  404 ``NOT_FOUND``.

Unconfirmed points, kept here in one place:

- the output shape (above) and :data:`FAILED_ERROR_TYPE`, the ``error_type`` of a request
  the model failed; a cancelled request reads as COMPLETED with ``error_type``
  :data:`CANCELLED_ERROR_TYPE`;
- the result of an unfinished request: HTTP 400 ``{"detail": "Request is still in progress"}``;
  of a failed one: HTTP 422 with ``detail``, ``error_type`` and the header;
- 5xx answers carry ``x-fal-error-type`` (:data:`SERVER_ERROR_TYPES`);
- log lines: one per progress step, ``{"timestamp", "level": "INFO", "message"}``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, UTC
from typing import Any
from collections.abc import Iterator

from .server import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    PROCESSING,
    QUEUED,
    Context,
    Job,
    Protocol,
    Response,
    json_response,
)

ENDPOINTS = {
    "fal-ai/kling-video/v1/standard/ai-avatar": "standard",
    "fal-ai/kling-video/v1/pro/ai-avatar": "pro",
    "fal-ai/kling-video/ai-avatar/v2/standard": "standard",
    "fal-ai/kling-video/ai-avatar/v2/pro": "pro",
}

STATUS_WORDS = {QUEUED: "IN_QUEUE", PROCESSING: "IN_PROGRESS", COMPLETED: "COMPLETED", FAILED: "COMPLETED",
                CANCELLED: "COMPLETED"}
FAILED_ERROR_TYPE = "runner_server_error"
CANCELLED_ERROR_TYPE = "request_cancelled"
SERVER_ERROR_TYPES = {504: "request_timeout"}
DEFAULT_SERVER_ERROR_TYPE = "internal_error"

# fal's playground sends "." when the prompt is left empty; the emulator records what came.
# Processing logs: one line per this fraction of the run.
LOG_STEP = 0.25
# How often the SSE stream looks for a change (real seconds), and how long it stays open
# at most when nothing ends the job (a fake clock that never moves).
STREAM_TICK_S = 0.05


def app_of(endpoint: str) -> str:
    """``owner/app``: the first two path segments, where the queue keeps requests."""
    return "/".join(endpoint.split("/")[:2])


class FalProtocol(Protocol):
    name = "fal"
    prefixes = ("/fal-ai/",)

    def routes(self):
        req = r"/(?P<app>fal-ai/[^/]+)/requests/(?P<id>[^/]+)"
        return [
            ("GET", req + r"/status", self.status),
            ("GET", req + r"/status/stream", self.stream),
            ("PUT", req + r"/cancel", self.cancel),
            ("GET", req, self.response),
            ("POST", r"/(?P<endpoint>fal-ai/.+)", self.submit),
        ]

    def error(self, status: int, message: str) -> Response:
        headers = {}
        if status >= 500:
            headers["x-fal-error-type"] = SERVER_ERROR_TYPES.get(status, DEFAULT_SERVER_ERROR_TYPE)
        return json_response(status, {"detail": message}, headers)

    def env_lines(self, base_url: str) -> list[str]:
        return [f"FAL_BASE_URL={base_url}", "FAL_KEY=emulator-key"]

    # -- helpers ----------------------------------------------------------------------

    def _authorized(self, ctx: Context) -> bool:
        scheme, _sp, key = (ctx.request.header("authorization") or "").partition(" ")
        return scheme == "Key" and self.emu.check_key(self.name, key.strip())

    def _unauthorized(self) -> Response:
        return self.error(401, "Invalid or missing authorization header; use 'Authorization: Key <FAL_KEY>'.")

    def _urls(self, job: Job) -> dict[str, str]:
        base = f"{self.emu.url}/{app_of(job.model)}/requests/{job.id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def _find(self, ctx: Context) -> tuple[Job | None, str]:
        job = self.emu.jobs.get(ctx.match["id"])
        if job is None or job.protocol != self.name or app_of(job.model) != ctx.match["app"]:
            return None, EXPIRED
        phase = job.phase(self.emu.now(), self.emu.retention_s)
        return (None, phase) if phase == EXPIRED else (job, phase)

    def _logs(self, job: Job, phase: str) -> list[dict[str, Any]]:
        if phase == QUEUED:
            return []
        now = self.emu.now()
        span = max(job.ends_at - job.starts_at, 1e-9)
        done = 1.0 if phase != PROCESSING else min(1.0, max(0.0, (now - job.starts_at) / span))
        steps = int(done / LOG_STEP + 1e-9)
        wall0 = job.created_wall + (job.starts_at - job.submitted_at)
        out = [{"timestamp": _iso(wall0), "level": "INFO", "message": "Starting avatar generation"}]
        for i in range(1, min(steps, int(1 / LOG_STEP)) + 1):
            out.append({"timestamp": _iso(wall0 + i * LOG_STEP * span), "level": "INFO",
                        "message": f"Generating video: {round(i * LOG_STEP * 100)}%"})
        return out

    def status_body(self, job: Job, phase: str, with_logs: bool) -> dict[str, Any]:
        word = job.plan.status_value or STATUS_WORDS[phase]
        body: dict[str, Any] = {"status": word}
        if phase == QUEUED:
            body["queue_position"] = self._queue_position(job)
            return body
        body["logs"] = self._logs(job, phase) if with_logs else None
        if phase in (COMPLETED, FAILED, CANCELLED):
            body["metrics"] = {"inference_time": round(job.inference_s, 3)} if phase == COMPLETED else {}
            if phase == FAILED:
                body["error"] = job.failure
                body["error_type"] = FAILED_ERROR_TYPE
            if phase == CANCELLED:
                body["error"] = "Request was cancelled."
                body["error_type"] = CANCELLED_ERROR_TYPE
        return body

    def _queue_position(self, job: Job) -> int:
        now = self.emu.now()
        ahead = [
            j for j in list(self.emu.jobs.values())
            if j.protocol == self.name and j.id != job.id and j.submitted_at <= job.submitted_at
            and j.phase(now, self.emu.retention_s) == QUEUED
        ]
        return len(ahead)

    # -- routes -----------------------------------------------------------------------

    def submit(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthorized()
        endpoint = ctx.match["endpoint"]
        tier = ENDPOINTS.get(endpoint)
        if tier is None:
            return self.error(404, f"Application '{endpoint}' not found")
        body = ctx.request.json
        missing = self.missing_fields(body, ("image_url", "audio_url"))
        if missing is None:
            return self.error(422, "The request body must be a JSON object")
        if missing:
            detail = [{"loc": ["body", k], "msg": "field required", "type": "value_error.missing"} for k in missing]
            return json_response(422, {"detail": detail})
        job = self.emu.create_job(self.name, endpoint, tier, {"image": body["image_url"], "audio": body["audio_url"]})
        job.extra["prompt"] = body.get("prompt")
        return json_response(200, {"request_id": job.id, **self._urls(job)})

    def status(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthorized()
        job, phase = self._find(ctx)
        if job is None:
            return self.error(404, "Request not found")
        return json_response(200, self.status_body(job, phase, ctx.request.param("logs") == "1"))

    def stream(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthorized()
        job, _phase = self._find(ctx)
        if job is None:
            return self.error(404, "Request not found")
        with_logs = ctx.request.param("logs") == "1"
        return Response(200, self._events(job, with_logs), "text/event-stream", {"Cache-Control": "no-cache"})

    def _events(self, job: Job, with_logs: bool) -> Iterator[bytes]:
        """One event per change, until the request is COMPLETED (or expired, or the stream
        has been open longer than the emulator's sync timeout)."""
        last = None
        until = time.monotonic() + self.emu.sync_timeout_s
        while time.monotonic() < until:
            phase = job.phase(self.emu.now(), self.emu.retention_s)
            if phase == EXPIRED:
                return
            body = self.status_body(job, phase, with_logs)
            text = json.dumps(body)
            if text != last:
                last = text
                yield f"data: {text}\n\n".encode()
            if body["status"] == "COMPLETED":
                return
            time.sleep(STREAM_TICK_S)

    def response(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthorized()
        job, phase = self._find(ctx)
        if job is None:
            return self.error(404, "Request not found")
        if phase in (QUEUED, PROCESSING):
            return self.error(400, "Request is still in progress")
        if phase in (FAILED, CANCELLED):
            kind = FAILED_ERROR_TYPE if phase == FAILED else CANCELLED_ERROR_TYPE
            message = job.failure if phase == FAILED else "Request was cancelled."
            return json_response(422, {"detail": message, "error_type": kind}, {"x-fal-error-type": kind})
        size, duration = self.emu.video_info(job)
        return json_response(200, {
            "video": {
                "url": self.emu.video_url(job),
                "content_type": "video/mp4",
                "file_name": "output.mp4",
                "file_size": size,
            },
            "duration": duration,
        })

    def cancel(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthorized()
        job, _phase = self._find(ctx)
        if job is None:
            return json_response(404, {"status": "NOT_FOUND"})
        if not self.emu.cancel_job(job):
            return json_response(400, {"status": "ALREADY_COMPLETED"})
        return json_response(202, {"status": "CANCELLATION_REQUESTED"})


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
