"""Kling's own API (PROVIDERS.md, "Kling"), served by the emulator core.

- ``Authorization: Bearer <jwt>``: HS256 over ``{"iss", "exp", "nbf"}``, signed with the
  secret key that belongs to the access key in ``iss``. The signature, ``nbf`` and ``exp``
  are checked against :attr:`KlingProtocol.clock` (wall time). By default the pair
  :data:`DEFAULT_ACCESS_KEY` / :data:`DEFAULT_SECRET_KEY` is accepted; set others with
  :meth:`KlingProtocol.set_keys` or ``Emulator(api_keys={"kling": "ACCESS:SECRET"})``.
- ``POST /v1/videos/avatar/image2video`` with ``image`` and ``sound_file`` (URL or raw
  base64, no ``data:`` prefix), ``prompt`` (<= 2500 chars), ``mode`` (``std`` | ``pro``),
  ``callback_url``, ``external_task_id``; ``GET /v1/videos/avatar/image2video/{task_id}``.
- Envelope ``{"code": 0, "message": "SUCCEED", "request_id", "data": {task_id, task_status,
  task_status_msg, created_at, updated_at, task_result: {videos: [{id, url, duration}]}}}``;
  statuses ``submitted``, ``processing``, ``succeed``, ``failed``.
- Errors: HTTP 401 with codes 1000-1004 (1001 no token, 1002 invalid, 1003 not yet valid,
  1004 expired); HTTP 429 with 1100-1102 (script those with ``Fault("body", status=429,
  body={"code": 1102, ...})``).

Choices where the public pages are silent, kept here:

- codes for other HTTP errors (:data:`CODES_FOR_STATUS`), e.g. 400 -> 1201, 404 -> 1203;
- an unknown task id is HTTP 404; a task can also be read by its ``external_task_id``;
- inline files over Kling's limits (audio 5 MB, image 10 MB) are HTTP 400, code 1201;
- ``audio_id`` (audio kept at Kling) is not emulated: HTTP 400, code 1201.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any
from collections.abc import Callable

import jwt

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
    json_response,
)

PATH = "/v1/videos/avatar/image2video"
MODES = {"std": "standard", "pro": "pro"}
STATUS_WORDS = {QUEUED: "submitted", PROCESSING: "processing", COMPLETED: "succeed", FAILED: "failed"}

DEFAULT_ACCESS_KEY = "emulator-access"
DEFAULT_SECRET_KEY = "emulator-secret"

MAX_PROMPT_CHARS = 2500
MAX_AUDIO_BYTES = 5 * 1024 * 1024
MAX_IMAGE_BYTES = 10 * 1024 * 1024

CODES_FOR_STATUS = {400: 1201, 401: 1000, 403: 1103, 404: 1203, 429: 1302, 500: 5000, 503: 5001, 504: 5002}

# Magic numbers -> MIME type, to label raw base64 inputs for the renderer.
_MAGIC = (
    (b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"RIFF", "audio/wav"),
    (b"ID3", "audio/mpeg"), (b"\xff\xfb", "audio/mpeg"), (b"\xff\xf3", "audio/mpeg"), (b"\xff\xf1", "audio/aac"),
)


def sniff(data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[4:8] == b"ftyp":
        return "audio/mp4"
    return "application/octet-stream"


class KlingProtocol(Protocol):
    name = "kling"
    prefixes = ("/v1/videos/",)

    def __init__(self, emulator) -> None:
        super().__init__(emulator)
        #: Wall clock (seconds since the epoch) the JWT's ``nbf``/``exp`` are checked against.
        self.clock: Callable[[], float] = time.time
        self._keys: dict[str, str] = {DEFAULT_ACCESS_KEY: DEFAULT_SECRET_KEY}

    def set_keys(self, access_key: str, secret_key: str) -> None:
        """Accept only this access/secret pair from now on."""
        self._keys = {access_key: secret_key}

    def reset(self) -> None:
        self.clock = time.time
        self._keys = {DEFAULT_ACCESS_KEY: DEFAULT_SECRET_KEY}

    def routes(self):
        return [
            ("POST", PATH, self.submit),
            ("GET", PATH + r"/(?P<id>[^/]+)", self.query),
        ]

    def error(self, status: int, message: str) -> Response:
        return self.fail(status, CODES_FOR_STATUS.get(status, 5000), message)

    def fail(self, status: int, code: int, message: str) -> Response:
        return json_response(status, {"code": code, "message": message, "request_id": str(uuid.uuid4())})

    def env_lines(self, base_url: str) -> list[str]:
        return [
            f"KLING_BASE_URL={base_url}",
            f"KLING_ACCESS_KEY={DEFAULT_ACCESS_KEY}",
            f"KLING_SECRET_KEY={DEFAULT_SECRET_KEY}",
        ]

    # -- auth -------------------------------------------------------------------------

    def _secrets(self) -> dict[str, str]:
        configured = self.emu.api_keys.get(self.name)
        if not configured:
            return self._keys
        pairs = (k.partition(":") for k in configured)
        return {access: secret for access, _sep, secret in pairs}

    def check_token(self, ctx: Context) -> Response | None:
        """None when the JWT is good; else the 401 Kling would send."""
        scheme, _sp, token = (ctx.request.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self.fail(401, 1001, "Authorization is empty")
        try:  # whose token is it? (the signature is checked next, with that one's secret)
            claims = jwt.decode(token.strip(), options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return self.fail(401, 1002, "Authorization is invalid")
        secret = self._secrets().get(claims.get("iss")) if isinstance(claims, dict) else None
        if secret is None:
            return self.fail(401, 1002, "Authorization is invalid")
        try:  # times are judged below, on the emulator's clock, not the machine's
            payload = jwt.decode(token.strip(), secret, algorithms=["HS256"],
                                 options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.InvalidTokenError:
            return self.fail(401, 1002, "Authorization is invalid")
        now = self.clock()
        exp, nbf = payload.get("exp"), payload.get("nbf")
        if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)):
            return self.fail(401, 1002, "Authorization is invalid")
        if now < nbf:
            return self.fail(401, 1003, "Authorization is not yet valid")
        if now >= exp:
            return self.fail(401, 1004, "Authorization has expired")
        return None

    # -- helpers ----------------------------------------------------------------------

    def _input(self, value: Any, what: str, limit: int) -> str:
        """A URL as is, raw base64 as a data: URI for the core; ValueError says what is wrong."""
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} is required")
        if value.startswith(("http://", "https://")):
            return value
        if value.startswith("data:"):
            raise ValueError(f"{what} must be a URL or raw base64 without a 'data:' prefix")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{what} is neither a URL nor valid base64") from None
        if len(raw) > limit:
            raise ValueError(f"{what} is {len(raw)} bytes; the limit is {limit // 2**20} MB")
        return f"data:{sniff(raw)};base64,{value}"

    def _ok(self, data: dict[str, Any]) -> Response:
        return json_response(200, {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data})

    def task_data(self, job: Job, phase: str) -> dict[str, Any]:
        created_ms = round(job.created_wall * 1000)
        offset = {QUEUED: 0.0, PROCESSING: job.starts_at - job.submitted_at}.get(phase, job.ends_at - job.submitted_at)
        data: dict[str, Any] = {
            "task_id": job.id,
            "task_status": job.plan.status_value or STATUS_WORDS[phase],
            "task_status_msg": (job.failure or "") if phase == FAILED else "",
            "task_info": {"external_task_id": job.extra.get("external_task_id") or ""},
            "created_at": created_ms,
            "updated_at": created_ms + round(offset * 1000),
        }
        if phase == COMPLETED:
            _size, duration = self.emu.video_info(job)
            video = {"id": f"{job.id}-0", "url": self.emu.video_url(job)}
            video["duration"] = f"{duration:.1f}" if duration is not None else ""
            data["task_result"] = {"videos": [video]}
        return data

    # -- routes -----------------------------------------------------------------------

    def submit(self, ctx: Context) -> Response:
        refused = self.check_token(ctx)
        if refused:
            return refused
        body = ctx.request.json
        if not isinstance(body, dict):
            return self.fail(400, 1200, "The request body must be a JSON object")
        try:
            if body.get("audio_id") and not body.get("sound_file"):
                raise ValueError("audio_id is not supported by this emulator; send sound_file")
            image = self._input(body.get("image"), "image", MAX_IMAGE_BYTES)
            audio = self._input(body.get("sound_file"), "sound_file", MAX_AUDIO_BYTES)
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
            mode = body.get("mode") or "std"
            if mode not in MODES:
                raise ValueError("mode must be 'std' or 'pro'")
        except ValueError as exc:
            return self.fail(400, 1201, str(exc))
        job = self.emu.create_job(self.name, f"kling-avatar-{mode}", MODES[mode], {"image": image, "audio": audio},
                                  webhook=body.get("callback_url"))
        job.extra.update(prompt=body.get("prompt"), external_task_id=body.get("external_task_id"), mode=mode)
        return self._ok(self.task_data(job, QUEUED))

    def query(self, ctx: Context) -> Response:
        refused = self.check_token(ctx)
        if refused:
            return refused
        wanted = ctx.match["id"]
        job = self.emu.jobs.get(wanted)
        if job is None:
            job = next((j for j in list(self.emu.jobs.values())
                        if j.protocol == self.name and j.extra.get("external_task_id") == wanted), None)
        phase = job.phase(self.emu.now(), self.emu.retention_s) if job and job.protocol == self.name else EXPIRED
        if job is None or phase == EXPIRED:
            return self.fail(404, 1203, "Task not found")
        return self._ok(self.task_data(job, phase))
