"""Segmind's protocol (PROVIDERS.md, "Segmind"), served by the emulator core.

- ``x-api-key`` auth; error bodies ``{"error": ...}``; ``x-remaining-credits`` on every answer.
- v2 queue: ``POST /v2/{slug}`` -> ``QUEUED`` with poll/status/response URLs;
  ``GET /v2/requests/{id}/status`` and ``GET /v2/requests/{id}``. A FAILED job is
  HTTP 422 ``{"status": "FAILED", "error": ...}`` on both; unknown or expired ids are 404.
- Upload: ``POST /upload-asset`` with ``{"data_urls": [...]}`` -> ``{"file_urls": [...]}``
  (point ``SEGMIND_UPLOAD_URL`` at ``<emulator>/upload-asset``).

Choices where the public pages are silent, kept here:

- ``POST /v1/{slug}`` (sync) waits up to the emulator's ``sync_timeout_s`` and answers
  the MP4 bytes themselves (``Content-Type: video/mp4``), as Segmind's v1 API does for
  media outputs. A FAILED job is the same 422 body as v2; a wait that runs out is
  HTTP 504 ``{"error": ...}``.
- ``GET /v2/requests/{id}`` before completion answers the status body (no ``output``).
- Each submit costs the published average price, taken from :attr:`credits`.
"""

from __future__ import annotations

import threading
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
    decode_data_uri,
    json_response,
    upload_limit,
)

SLUGS = {
    "kling-v1-standard-ai-avatar": "standard",
    "kling-v1-pro-ai-avatar": "pro",
    "kling-v2-standard-avatar": "standard",
    "kling-v2-pro-avatar": "pro",
}

STATUS_WORDS = {QUEUED: "QUEUED", PROCESSING: "PROCESSING", COMPLETED: "COMPLETED", FAILED: "FAILED"}

FAILED_HTTP_STATUS = 422

# Published average price per generation (PROVIDERS.md); v2 prices are not published.
PRICE = {"standard": 2.28, "pro": 4.48}

# A balance large enough that tests never run out by accident (406 is a scripted fault).
START_CREDITS = 1000.0


class SegmindProtocol(Protocol):
    name = "segmind"
    prefixes = ("/v1/", "/v2/", "/upload-asset")

    def __init__(self, emulator) -> None:
        super().__init__(emulator)
        self._credits_lock = threading.Lock()
        self.credits = START_CREDITS

    def reset(self) -> None:
        self.credits = START_CREDITS

    def routes(self):
        return [
            ("POST", r"/upload-asset", self.upload_asset),
            ("GET", r"/v2/requests/(?P<id>[^/]+)/status", self.status),
            ("GET", r"/v2/requests/(?P<id>[^/]+)", self.response),
            ("POST", r"/v2/(?P<slug>[^/]+)", self.submit),
            # Only kling-* slugs: other providers (Replicate's /v1/files) live under /v1 too.
            ("POST", r"/v1/(?P<slug>kling-[^/]+)", self.submit_sync),
        ]

    def error(self, status: int, message: str) -> Response:
        return json_response(status, {"error": message})

    def finalize(self, response: Response) -> Response:
        response.headers.setdefault("x-remaining-credits", f"{self.credits:.2f}")
        return response

    def env_lines(self, base_url: str) -> list[str]:
        return [
            f"SEGMIND_BASE_URL={base_url}",
            f"SEGMIND_UPLOAD_URL={base_url}/upload-asset",
            "SEGMIND_API_KEY=emulator-key",
        ]

    # -- helpers ----------------------------------------------------------------------

    def _authorized(self, ctx: Context) -> bool:
        return self.emu.check_key(self.name, ctx.request.header("x-api-key"))

    def _urls(self, job: Job) -> dict[str, str]:
        base = f"{self.emu.url}/v2/requests/{job.id}"
        return {"status_url": f"{base}/status", "response_url": base}

    def _metrics(self, job: Job, phase: str) -> dict[str, Any]:
        return {"inference_time": round(job.inference_s, 3)} if phase == COMPLETED else {}

    def _failed(self, job: Job) -> Response:
        return json_response(FAILED_HTTP_STATUS, {"status": "FAILED", "error": job.failure or "Job failed"})

    def _live_job(self, ctx: Context) -> tuple[Job | None, str]:
        job = self.emu.jobs.get(ctx.match["id"])
        if job is None or job.protocol != self.name:
            return None, EXPIRED
        phase = job.phase(self.emu.now(), self.emu.retention_s)
        return (None, phase) if phase == EXPIRED else (job, phase)

    def _status_body(self, job: Job, phase: str) -> dict[str, Any]:
        return {
            "status": job.plan.status_value or STATUS_WORDS[phase],
            "request_id": job.id,
            **self._urls(job),
            "metrics": self._metrics(job, phase),
        }

    def _new_job(self, ctx: Context) -> Job | Response:
        if not self._authorized(ctx):
            return self.error(401, "Invalid or missing API key")
        slug = ctx.match["slug"]
        tier = SLUGS.get(slug)
        if tier is None:
            return self.error(404, f"Model {slug} not found")
        body = ctx.request.json
        missing = self.missing_fields(body, ("image_url", "audio_url"))
        if missing is None:
            return self.error(400, "The request body must be a JSON object")
        if missing:
            return self.error(400, f"Missing required parameter(s): {', '.join(missing)}")
        job = self.emu.create_job(self.name, slug, tier, {"image": body["image_url"], "audio": body["audio_url"]})
        job.extra["prompt"] = body.get("prompt")
        with self._credits_lock:
            self.credits = max(0.0, self.credits - PRICE[tier])
        return job

    # -- routes -----------------------------------------------------------------------

    def submit(self, ctx: Context) -> Response:
        job = self._new_job(ctx)
        if isinstance(job, Response):
            return job
        urls = self._urls(job)
        return json_response(
            200,
            {"request_id": job.id, "status": "QUEUED", "poll_url": urls["status_url"], **urls},
        )

    def submit_sync(self, ctx: Context) -> Response:
        job = self._new_job(ctx)
        if isinstance(job, Response):
            return job
        phase = self.emu.wait_for_job(job, self.emu.sync_timeout_s)
        if phase == FAILED:
            return self._failed(job)
        if phase != COMPLETED:
            return self.error(504, "The generation did not finish in time")
        return self.emu.video_response(job)

    def status(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Invalid or missing API key")
        job, phase = self._live_job(ctx)
        if job is None:
            return self.error(404, "Request not found")
        if phase == FAILED:
            return self._failed(job)
        return json_response(200, self._status_body(job, phase))

    def response(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Invalid or missing API key")
        job, phase = self._live_job(ctx)
        if job is None:
            return self.error(404, "Request not found")
        if phase == FAILED:
            return self._failed(job)
        body = self._status_body(job, phase)
        if phase == COMPLETED:
            body["output"] = self.emu.video_url(job)
        return json_response(200, body)

    def upload_asset(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self.error(401, "Invalid or missing API key")
        body = ctx.request.json
        urls = body.get("data_urls") if isinstance(body, dict) else None
        if not isinstance(urls, list) or not urls:
            return self.error(400, "Send JSON {\"data_urls\": [\"data:<mime>;base64,...\"]}")
        out = []
        for i, uri in enumerate(urls):
            try:
                data, mime = decode_data_uri(uri if isinstance(uri, str) else "")
            except ValueError as exc:
                return self.error(400, f"data_urls[{i}] is not a valid data URL ({exc})")
            limit = upload_limit(mime)
            if len(data) > limit:
                return self.error(413, f"data_urls[{i}] is too large: {len(data)} bytes, limit {limit // 2**20} MB")
            ext = (mime.split("/")[-1] or "bin").split("+")[0]
            out.append(self.emu.file_url(self.emu.store_file(data, f"asset-{i}.{ext}", mime)))
        return json_response(200, {"file_urls": out})
