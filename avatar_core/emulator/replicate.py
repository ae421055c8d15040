"""Replicate's protocol (PROVIDERS.md, "Replicate"), served by the emulator core.

- ``Authorization: Bearer <token>``; errors are RFC 7807 problem JSON
  ``{"title", "detail", "status"}`` (``application/problem+json``).
- ``POST /v1/models/kwaivgi/kling-avatar-v2/predictions`` with ``{"input": {"image",
  "audio", "prompt"?, "mode": "std"|"pro"}}`` -> 201 and the prediction; ``Prefer: wait=N``
  holds the answer up to N seconds (bounded by the emulator's ``sync_timeout_s``).
- ``GET /v1/predictions/{id}``; ``POST /v1/predictions/{id}/cancel``.
- Prediction statuses ``starting``, ``processing``, ``succeeded``, ``failed``, ``canceled``;
  ``output`` is the video URL, ``error`` the failure text.
- ``POST /v1/files`` (multipart field ``content``) -> the file object whose ``urls.get``
  can be given as an input; data URIs work as inputs too.
- Inputs and outputs are deleted one hour after creation (:data:`RETENTION_S`).

Choices where the public pages are silent, kept here:

- after the hour the prediction itself answers 404 (as do its video and files);
- a missing input or a bad ``mode`` is HTTP 422 with title "Input validation failed";
- ``logs`` grows by one line per quarter of the run.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, UTC
from typing import Any

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
    guess_type,
    json_response,
    upload_limit,
)

MODEL = "kwaivgi/kling-avatar-v2"
MODES = {"std": "standard", "pro": "pro"}
STATUS_WORDS = {QUEUED: "starting", PROCESSING: "processing", COMPLETED: "succeeded", FAILED: "failed",
                CANCELLED: "canceled"}

# Replicate deletes inputs and outputs one hour after a prediction is created.
RETENTION_S = 3600.0
# Log lines: one per this fraction of the run.
LOG_STEP = 0.25
# A version id for the record (Replicate's are 64 hex digits).
VERSION = "0" * 63 + "2"


def problem(status: int, title: str, detail: str | None = None) -> Response:
    """An RFC 7807 problem body, the way Replicate sends errors."""
    body = {"title": title, "detail": detail or title, "status": status}
    return Response(status, json.dumps(body).encode(), "application/problem+json")


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReplicateProtocol(Protocol):
    name = "replicate"
    prefixes = ("/v1/models/", "/v1/predictions", "/v1/files")

    def routes(self):
        return [
            ("POST", r"/v1/models/(?P<model>[^/]+/[^/]+)/predictions", self.create),
            ("GET", r"/v1/predictions/(?P<id>[^/]+)", self.get),
            ("POST", r"/v1/predictions/(?P<id>[^/]+)/cancel", self.cancel),
            ("POST", r"/v1/files", self.upload),
            ("GET", r"/v1/files/(?P<id>[0-9a-f]+)", self.file_info),
        ]

    def error(self, status: int, message: str) -> Response:
        return problem(status, message)

    def env_lines(self, base_url: str) -> list[str]:
        return [f"REPLICATE_BASE_URL={base_url}", "REPLICATE_API_TOKEN=emulator-key"]

    @property
    def retention_s(self) -> float:
        return min(self.emu.retention_s, RETENTION_S)

    # -- helpers ----------------------------------------------------------------------

    def _authorized(self, ctx: Context) -> bool:
        scheme, _sp, key = (ctx.request.header("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and self.emu.check_key(self.name, key.strip())

    def _unauthenticated(self) -> Response:
        return problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def _find(self, ctx: Context) -> tuple[Job | None, str]:
        job = self.emu.jobs.get(ctx.match["id"])
        if job is None or job.protocol != self.name:
            return None, EXPIRED
        phase = job.phase(self.emu.now(), self.retention_s)
        return (None, phase) if phase == EXPIRED else (job, phase)

    def _file_ref(self, ref: Any) -> Any:
        """Our own ``/v1/files/{id}`` URL -> the stored file's plain URL (the core fetches those)."""
        if isinstance(ref, str):
            m = re.fullmatch(re.escape(self.emu.url) + r"/v1/files/([0-9a-f]+)", ref)
            if m and m.group(1) in self.emu.files:
                return self.emu.file_url(self.emu.files[m.group(1)])
        return ref

    def prediction(self, job: Job, phase: str) -> dict[str, Any]:
        base = f"{self.emu.url}/v1/predictions/{job.id}"
        started = job.created_wall + (job.starts_at - job.submitted_at)
        ended = job.created_wall + (job.ends_at - job.submitted_at)
        terminal = phase in (COMPLETED, FAILED, CANCELLED)
        if phase == CANCELLED:
            ended = job.created_wall + (job.cancelled_at - job.submitted_at)
        return {
            "id": job.id,
            "model": job.model,
            "version": VERSION,
            "input": job.extra.get("input", {}),
            "logs": self._logs(job, phase),
            "output": self.emu.video_url(job) if phase == COMPLETED else None,
            "data_removed": False,
            "error": job.failure if phase == FAILED else None,
            "status": job.plan.status_value or STATUS_WORDS[phase],
            "created_at": _iso(job.created_wall),
            "started_at": _iso(started) if phase != QUEUED else None,
            "completed_at": _iso(ended) if terminal else None,
            "urls": {"get": base, "cancel": f"{base}/cancel"},
            "metrics": {"predict_time": round(job.inference_s, 3)} if phase == COMPLETED else {},
        }

    def _logs(self, job: Job, phase: str) -> str:
        if phase == QUEUED:
            return ""
        span = max(job.ends_at - job.starts_at, 1e-9)
        done = 1.0 if phase != PROCESSING else min(1.0, max(0.0, (self.emu.now() - job.starts_at) / span))
        lines = ["Starting avatar generation"]
        lines += [f"Generating video: {round(i * LOG_STEP * 100)}%" for i in range(1, int(done / LOG_STEP + 1e-9) + 1)]
        return "\n".join(lines) + "\n"

    # -- predictions ------------------------------------------------------------------

    def create(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthenticated()
        model = ctx.match["model"]
        if model != MODEL:
            return problem(404, "Not found", f"Model {model} does not exist")
        body = ctx.request.json
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            return problem(422, "Input validation failed", "- input: input is required")
        problems = [f"- input: {k} is required" for k in ("image", "audio") if not inputs.get(k)]
        mode = inputs.get("mode", "std")
        if mode not in MODES:
            problems.append(f"- input.mode: mode must be one of the following: {', '.join(map(repr, MODES))}")
        if problems:
            return problem(422, "Input validation failed", "\n".join(problems))
        job = self.emu.create_job(
            self.name, MODEL, MODES[mode],
            {"image": self._file_ref(inputs["image"]), "audio": self._file_ref(inputs["audio"])},
        )
        job.extra["input"] = dict(inputs)
        job.extra["prompt"] = inputs.get("prompt")
        phase = job.phase(self.emu.now(), self.retention_s)
        wait = _prefer_wait(ctx.request.header("prefer"))
        if wait:
            phase = self.emu.wait_for_job(job, min(wait, self.emu.sync_timeout_s))
        return json_response(201, self.prediction(job, phase))

    def get(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthenticated()
        job, phase = self._find(ctx)
        if job is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        return json_response(200, self.prediction(job, phase))

    def cancel(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthenticated()
        job, _phase = self._find(ctx)
        if job is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        self.emu.cancel_job(job)  # a finished prediction stays as it is
        return json_response(200, self.prediction(job, job.phase(self.emu.now(), self.retention_s)))

    # -- files ------------------------------------------------------------------------

    def upload(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthenticated()
        part = next((p for p in ctx.request.form if p.name == "content"), None)
        if part is None:
            return problem(400, "Bad request", "Missing multipart field 'content'")
        content_type = guess_type(part.filename, part.content_type)
        limit = upload_limit(content_type)
        if part.size > limit:
            return problem(413, "Payload too large", f"File is {part.size} bytes; the limit is {limit} bytes")
        file = self.emu.store_file(part.data, part.filename or "file", content_type)
        return json_response(201, self.file_object(file))

    def file_object(self, file) -> dict[str, Any]:
        now = time.time()
        return {
            "id": file.id,
            "name": file.filename,
            "content_type": file.content_type,
            "size": len(file.data or b""),
            "checksums": {"sha256": file.sha256},
            "metadata": {},
            "created_at": _iso(now),
            "expires_at": _iso(now + timedelta(days=1).total_seconds()),
            "urls": {"get": f"{self.emu.url}/v1/files/{file.id}"},
        }

    def file_info(self, ctx: Context) -> Response:
        if not self._authorized(ctx):
            return self._unauthenticated()
        file = self.emu.files.get(ctx.match["id"])
        if file is None or file.data is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        return json_response(200, self.file_object(file))


def _prefer_wait(value: str | None) -> float:
    """Seconds from ``Prefer: wait=N`` (0 when absent or malformed)."""
    m = re.search(r"\bwait=(\d+(?:\.\d+)?)", value or "")
    return float(m.group(1)) if m else 0.0
